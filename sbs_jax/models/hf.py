"""HF T5 checkpoint interop: a `T5ForConditionalGeneration` directory <-> (T5Config, params).

Import reads config.json plus model.safetensors (single or sharded via its index) or
pytorch_model.bin, the latter with `torch.load(weights_only=True)` so no arbitrary object is
ever unpickled. Export writes what the hub ships for T5 1.1 / Flan-T5 (untied: separate
`lm_head.weight` and `"tie_word_embeddings": false`) or v1.0 (tied, scaled logits), so both
transformers 4.x and 5.x load it right, plus generation_config.json and, given a vocabulary,
spiece.model with a tokenizer.json that encodes as our pipeline does (`hf_tokenizer`). Every
exported file is world-readable. Unreadable inputs raise CheckpointError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from sbs_jax.models.t5 import T5Config, abstract_params, stack_layers, unstack_layers

PathLike = str | os.PathLike

# HF feed_forward_proj activation name -> ours (HF special-cases "gated-gelu" to gelu_new).
_HF_TO_OUR_ACT = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu", "silu": "silu"}
_OUR_TO_HF_ACT = {v: k for k, v in _HF_TO_OUR_ACT.items()}
# Tensors HF checkpoints may carry that hold nothing of their own.
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


class CheckpointError(ValueError):
    """A HF directory that is not (or does not match) a T5 encoder-decoder checkpoint."""


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> T5Config:
    """Our T5Config from a HF T5 config.json dict."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != "t5" or any(a not in ("T5ForConditionalGeneration", "T5Model")
                                 for a in archs):
        raise CheckpointError(f"{source}: model_type={model_type!r}, architectures={archs}; only "
                              "T5 encoder-decoders (model_type 't5') are supported")
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated" and len(parts) == 2
    act_name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if (len(parts) > 1 and not gated) or act_name not in _HF_TO_OUR_ACT:
        raise CheckpointError(f"{source}: unsupported feed_forward_proj={proj!r}")
    act = _HF_TO_OUR_ACT[act_name]
    if "scale_decoder_outputs" in hf:
        tied = bool(hf["scale_decoder_outputs"])
    else:
        tied = hf.get("tie_word_embeddings", True) is not False
    num_layers = hf.get("num_layers", 6)
    return T5Config(
        vocab_size=hf.get("vocab_size", 32128),
        emb_dim=hf.get("d_model", 512),
        num_heads=hf.get("num_heads", 8),
        num_encoder_layers=num_layers,
        num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        head_dim=hf.get("d_kv", 64),
        mlp_dim=hf.get("d_ff", 2048),
        mlp_activations=(act, "linear") if gated else (act,),
        dropout_rate=hf.get("dropout_rate", 0.1),
        logits_via_embedding=tied,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
    )


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """The config.json dict for `config` (hub conventions)."""
    acts = config.mlp_activations
    if len(acts) == 2 and acts[1] == "linear" and acts[0] in _OUR_TO_HF_ACT:
        proj = "gated-gelu" if acts[0] == "gelu" else f"gated-{_OUR_TO_HF_ACT[acts[0]]}"
    elif len(acts) == 1 and acts[0] in _OUR_TO_HF_ACT:
        proj = _OUR_TO_HF_ACT[acts[0]]
    else:
        raise CheckpointError(f"mlp_activations={acts} has no HF T5 equivalent")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": proj,
        "tie_word_embeddings": config.logits_via_embedding,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "use_cache": True,
    }


def _tensor_map(config: T5Config) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(HF name, our unrolled param path, transpose?) for every tensor of `config`."""
    yield "shared.weight", ("token_embedder", "embedding"), False
    if not config.logits_via_embedding:
        yield "lm_head.weight", ("decoder", "logits_dense", "kernel"), True
    mlp = (["wi"] if len(config.mlp_activations) == 1
           else [f"wi_{i}" for i in range(len(config.mlp_activations))]) + ["wo"]
    stacks = (("encoder", config.num_encoder_layers,
               [("SelfAttention", "attention", "pre_attention_layer_norm")]),
              ("decoder", config.num_decoder_layers,
               [("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                ("EncDecAttention", "encoder_decoder_attention",
                 "pre_cross_attention_layer_norm")]))
    for stack, num_layers, attentions in stacks:
        yield (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
               (stack, "relpos_bias", "rel_embedding"), True)
        yield f"{stack}.final_layer_norm.weight", (stack, f"{stack}_norm", "scale"), False
        for i in range(num_layers):
            block, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            for j, (hf_attn, our_attn, our_norm) in enumerate(attentions):
                yield f"{block}.{j}.layer_norm.weight", ours + (our_norm, "scale"), False
                for hf_proj, our_proj in zip("qkvo", ("query", "key", "value", "out")):
                    yield (f"{block}.{j}.{hf_attn}.{hf_proj}.weight",
                           ours + (our_attn, our_proj, "kernel"), True)
            j = len(attentions)
            yield f"{block}.{j}.layer_norm.weight", ours + ("pre_mlp_layer_norm", "scale"), False
            for name in mlp:
                yield (f"{block}.{j}.DenseReluDense.{name}.weight",
                       ours + ("mlp", name, "kernel"), True)


def _expected_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Unrolled param path -> shape, from the model itself (no arrays allocated)."""
    unrolled = dataclasses.replace(config, scan_layers=False)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(unrolled)))[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf_state(state: dict[str, np.ndarray], config: T5Config,
                         source: str = "checkpoint") -> dict:
    """Our params (numpy, param_dtype) from a HF state dict; names every bad tensor."""
    shapes = _expected_shapes(config)
    params: dict = {}
    used = set(_IGNORED)
    dtype = jax.numpy.dtype(config.param_dtype)
    for hf_name, path, transpose in _tensor_map(config):
        if hf_name not in state:
            if hf_name == "lm_head.weight":
                raise CheckpointError(
                    f"{source}: config says the output projection is untied "
                    "(tie_word_embeddings false) but there is no 'lm_head.weight'")
            raise CheckpointError(f"{source}: missing tensor {hf_name!r} (expected shape "
                                  f"{tuple(reversed(shapes[path])) if transpose else shapes[path]})")
        value = np.asarray(state[hf_name])
        value = value.T if transpose else value
        if value.shape != shapes[path]:
            shown = tuple(reversed(value.shape)) if transpose else value.shape
            want = tuple(reversed(shapes[path])) if transpose else shapes[path]
            raise CheckpointError(f"{source}: tensor {hf_name!r} has shape {shown}, but the "
                                  f"config needs {want}")
        value = value.astype(dtype)
        _set(params, path, np.ascontiguousarray(value))
        used.add(hf_name)
    if config.logits_via_embedding and "lm_head.weight" in state:
        if not np.array_equal(np.asarray(state["lm_head.weight"]), np.asarray(state["shared.weight"])):
            raise CheckpointError(
                f"{source}: config ties the output projection to the embedding (v1.0, scaled "
                "logits) but 'lm_head.weight' differs from 'shared.weight'")
        used.add("lm_head.weight")
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) for this config: "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    return stack_layers(params) if config.scan_layers else params


def hf_state_from_params(params: dict, config: T5Config) -> dict[str, np.ndarray]:
    """HF state dict (float32 numpy, [out, in] linear weights) from our params."""
    if config.scan_layers:
        params = unstack_layers(params)
    state = {}
    for hf_name, path, transpose in _tensor_map(config):
        value = np.asarray(_get(params, path), dtype=np.float32)
        state[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    return state


def _read_state(directory: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (directory / "pytorch_model.bin").exists():
        return _read_torch_bin(directory / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors(.index.json) or "
                                "pytorch_model.bin")
    state = {}
    for name in files:
        try:
            with safe_open(str(directory / name), framework="flax") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    state[key] = np.asarray(f.get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{directory / name}: unreadable safetensors file ({e}); "
                                  "truncated or damaged?") from None
    return state


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to unpickle non-tensor objects "
                              f"(weights_only=True): {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable PyTorch file ({e}); truncated or "
                              "damaged?") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v.float().numpy() for k, v in state.items()}


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_hf(path: PathLike, **config_overrides: Any) -> tuple[T5Config, dict]:
    """(T5Config, params) from a HF T5 directory; overrides e.g. dtype, scan_layers."""
    directory = pathlib.Path(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: not a HF model directory")
    hf_config = _read_json(config_file)
    config = config_from_hf(hf_config, str(config_file))
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    state = _read_state(directory)
    if (not config.logits_via_embedding and "lm_head.weight" not in state
            and hf_config.get("tie_word_embeddings", True) is not False):
        # transformers 5.x saves an unscaled (1.1-style) model built in memory with its
        # lm_head tied to the embedding: only shared.weight is in the file.
        state["lm_head.weight"] = state.get("shared.weight")
    return config, params_from_hf_state(state, config, str(directory))


def save_hf(config: T5Config, params: dict, path: PathLike, vocab: PathLike | None = None) -> None:
    """Writes a HF `from_pretrained` directory (safetensors, configs, the tokenizer when a
    vocabulary is given), every file mode 0644."""
    from safetensors.numpy import save_file

    from sbs_jax.models.hf_tokenizer import write_tokenizer_files

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = hf_state_from_params(jax.device_get(params), config)
    written = [directory / "model.safetensors", directory / "config.json",
               directory / "generation_config.json"]
    save_file(state, str(written[0]), metadata={"format": "pt"})
    written[1].write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    written[2].write_text(json.dumps(generation, indent=2) + "\n")
    if vocab is not None:
        written += write_tokenizer_files(str(vocab), directory)
    for file in written:
        file.chmod(0o644)
