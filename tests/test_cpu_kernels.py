"""The decoding kernels (bf16 projections of a step's rows and its cross-attention on AVX-512
BF16 CPUs): the same products as XLA's dots, logits as close to float32, the same decoded
tokens, and clear refusals where they cannot run."""

import dataclasses
import functools
import pathlib
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_t5_fixtures import make_hf_dir

from sbs_jax import decoding
from sbs_jax.models import T5, cpu_kernels, load_hf, stack_layers

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.rows_kernel_usable("bfloat16"),
    reason="the rows kernel cannot run here (no AVX-512 BF16, no C++ compiler, or not CPU)")


@needs_kernel
@pytest.mark.parametrize("x_shape,fan_out", [
    ((8, 512), 384),     # a decoding step's attention projection
    ((8, 512), 1024),    # over the threading threshold: columns split over the pool
    ((13, 33), 70),      # rows past one pass of 8, odd fan-in, a partial last panel
    ((1, 64), 32), ((3, 2), 5), ((2, 3, 64), 96),
])
def test_rows_matmul_equals_the_dot(x_shape, fan_out):
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (x_shape[-1], fan_out))
    expected = jnp.dot(x, kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    packed = cpu_kernels.pack_rows_kernel(kernel)
    got = jax.jit(cpu_kernels.rows_matmul, static_argnums=2)(x, packed, fan_out)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def bf16_model(request, tmp_path_factory):
    """A bf16 T5 (tied v1.0 head / separate v1.1 head) and inputs, some padded."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf_dir(request.param, path, 512, eos_bias=3.2)
    config, params = load_hf(path)
    enc = np.random.default_rng(0).integers(2, 512, (8, 20)).astype(np.int32)
    enc[1, 10:] = 0
    return dataclasses.replace(config, dtype="bfloat16"), params, enc


@needs_kernel
@pytest.mark.parametrize("batch,heads,length,head_dim", [(3, 2, 20, 8), (2, 3, 130, 34)])
def test_cross_attention_kernels_equal_the_einsums(batch, heads, length, head_dim):
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    q, k, v = (jax.random.normal(key, (batch, heads, n, head_dim)).astype(jnp.bfloat16)
               for key, n in zip(keys, (1, length, length)))
    weights = jax.nn.softmax(jax.random.normal(keys[3], (batch, heads, length)), axis=-1)
    f32 = jnp.float32
    scores = jnp.einsum("bhqd,bhkd->bhk", q, k, preferred_element_type=f32)
    out = jnp.einsum("bhk,bhkd->bhd", weights, v.astype(f32))
    got_scores = jax.jit(cpu_kernels.attention_scores, static_argnums=2)(
        q[:, :, 0], cpu_kernels.pack_keys(k), length)
    got_out = jax.jit(cpu_kernels.weighted_values, static_argnums=2)(
        weights, cpu_kernels.pack_values(v), head_dim)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-5 * float(abs(scores).max()))
    np.testing.assert_allclose(got_out, out, rtol=1e-5, atol=1e-6)


def _first_step_logits(config, params, enc, rows_kernel):
    model = T5(config, rows_kernel=rows_kernel)
    step = functools.partial(model.apply, method=T5.decode, decode=True, max_decode_length=4,
                             mutable=["cache"])

    @jax.jit
    def logits(params, enc):
        encoded = model.apply({"params": params}, enc, method=T5.encode)
        start = jnp.zeros((enc.shape[0], 1), jnp.int32)
        _, made = step({"params": params}, encoded, enc, start)
        return step({"params": params, "cache": made["cache"]}, encoded, enc, start)[0]
    return np.asarray(logits(params, enc), np.float32)


@needs_kernel
def test_decoding_with_the_kernels(bf16_model, monkeypatch):
    """Logits as close to float32 as XLA's bf16 step; the same tokens (up to bf16 ties)."""
    config, params, enc = bf16_model
    exact = _first_step_logits(dataclasses.replace(config, dtype="float32"), params, enc, False)
    xla_error = np.abs(_first_step_logits(config, params, enc, False) - exact).max()
    kernel_error = np.abs(_first_step_logits(config, params, enc, True) - exact).max()
    assert kernel_error <= 1.5 * xla_error + 1e-6
    runs = [(config, params, "greedy")]
    if not config.logits_via_embedding:  # the untied model also runs beam search and scanned
        scanned = dataclasses.replace(config, scan_layers=True)
        runs += [(config, params, "beam"), (scanned, stack_layers(params), "greedy")]
    for cfg, prm, method in runs:
        with_kernel = np.asarray(decoding.generate(cfg, prm, enc, 12, method=method))
        monkeypatch.setenv("SBS_JAX_ROWS_KERNEL", "0")
        without = np.asarray(decoding.generate(cfg, prm, enc, 12, method=method))
        monkeypatch.delenv("SBS_JAX_ROWS_KERNEL")
        assert (with_kernel == without).mean() >= 0.9
        assert (with_kernel == 1).any() and with_kernel.any(axis=1).all()


@needs_kernel
def test_the_decoding_step_runs_the_kernels(bf16_model):
    config, params, enc = bf16_model
    fn = decoding._compiled(config, "greedy", 12, 0, 0.0, False, 0, 1, True)
    hlo = fn.lower(params, jnp.asarray(enc), jnp.float32(1.0), jax.random.PRNGKey(0)).as_text()
    layers = config.num_decoder_layers
    per_layer = 4 + 2 + len(config.mlp_activations) + 1  # self q k v o, cross q o, mlp
    assert hlo.count(cpu_kernels.TARGET) == layers * per_layer + 1  # + the LM head
    assert hlo.count("sbs_attention_scores_bf16") == layers
    assert hlo.count("sbs_weighted_values_bf16") == layers


def test_where_the_kernel_is_not_used(monkeypatch):
    assert not cpu_kernels.rows_kernel_usable("float32")
    devices = jax.devices()[:2]
    if len(devices) == 2:  # arrays over several devices keep XLA's partitioned dot
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)),
                                              jax.sharding.PartitionSpec("data"))
        tokens = jax.device_put(np.ones((8, 4), np.int32), sharding)
        assert not cpu_kernels.rows_kernel_usable("bfloat16", {"tokens": tokens})
    monkeypatch.setenv("SBS_JAX_ROWS_KERNEL", "0")
    assert not cpu_kernels.rows_kernel_usable("bfloat16")


def test_a_failed_build_names_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("SBS_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no-such-compiler-xyz"):
        cpu_kernels.build_library()
    monkeypatch.setenv("CXX", "false")  # found, but fails
    with pytest.raises(RuntimeError, match="decode_kernels.cc failed"):
        cpu_kernels.build_library()
    assert not list(tmp_path.rglob("*.so"))


@needs_kernel
def test_the_build_is_cached_and_shipped():
    path = cpu_kernels.build_library()  # built when the kernels were first used here
    built = path.stat().st_mtime_ns
    assert cpu_kernels.build_library() == path and path.stat().st_mtime_ns == built
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    package = pathlib.Path(cpu_kernels.__file__).parents[1]
    shipped = {p for pattern in pyproject["tool"]["setuptools"]["package-data"]["sbs_jax"]
               for p in package.glob(pattern)}
    assert cpu_kernels._SOURCE in shipped  # an installed sbs-jax can build the kernels too
