"""T5 architecture configs: T5X field names, published sizes of T5 v1.0 / 1.1 / Flan-T5."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture and numerics of a T5 model (T5X field names)."""

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: tuple[str, ...] = ("relu",)
    dropout_rate: float = 0.1
    logits_via_embedding: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        for act in self.mlp_activations:
            if act not in ACTIVATIONS:
                raise ValueError(
                    f"T5Config.mlp_activations: unknown activation {act!r}; "
                    f"known: {sorted(ACTIVATIONS)}"
                )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"T5Config.remat_policy: unknown policy {self.remat_policy!r}; "
                f"known: {sorted(REMAT_POLICIES)}"
            )
        # Canonical, hashable, JSON-friendly forms (configs key jit caches and are saved).
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=True),  # HF "gelu_new", T5X "gelu"
    "gelu_exact": functools.partial(nn.gelu, approximate=False),  # HF "gelu"
    "silu": nn.silu,
    "linear": lambda x: x,
}

# What each layer keeps for the backward pass (`jax.checkpoint` policies; "none": no remat, keep
# everything). "minimal" (T5X's) keeps the projections' outputs (dots without batch dimensions)
# and recomputes the rest (norms, activations, attention); "dots" also keeps the attention dots;
# "full" keeps only the layer's inputs; "offload" keeps minimal's dots in pinned host memory.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}

_V1_0 = {"mlp_activations": ("relu",), "logits_via_embedding": True}
_V1_1 = {"mlp_activations": ("gelu", "linear"), "logits_via_embedding": False}


def _sizes(emb, heads, layers, mlp, head_dim=64):
    return {"emb_dim": emb, "num_heads": heads, "num_encoder_layers": layers,
            "num_decoder_layers": layers, "mlp_dim": mlp, "head_dim": head_dim}


# Published sizes (T5 paper, T5 1.1 and Flan-T5 releases); tiny ones are for tests.
_CONFIGS: dict[str, dict[str, Any]] = {
    "t5_tiny": {**_V1_0, **_sizes(32, 4, 2, 64, 8)},
    "t5_small": {**_V1_0, **_sizes(512, 8, 6, 2048)},
    "t5_base": {**_V1_0, **_sizes(768, 12, 12, 3072)},
    "t5_large": {**_V1_0, **_sizes(1024, 16, 24, 4096)},
    "t5_1_1_tiny": {**_V1_1, **_sizes(32, 4, 2, 64, 8)},
    "t5_1_1_small": {**_V1_1, **_sizes(512, 6, 8, 1024)},
    "t5_1_1_base": {**_V1_1, **_sizes(768, 12, 12, 2048)},
    "t5_1_1_large": {**_V1_1, **_sizes(1024, 16, 24, 2816)},
    "t5_1_1_xl": {**_V1_1, **_sizes(2048, 32, 24, 5120)},
    "t5_1_1_xxl": {**_V1_1, **_sizes(4096, 64, 24, 10240)},
}
for _size in ("tiny", "small", "base", "large", "xl", "xxl"):
    _CONFIGS[f"flan_t5_{_size}"] = _CONFIGS[f"t5_1_1_{_size}"]


def config_names() -> list[str]:
    return sorted(_CONFIGS)


def get_config(name: str, **overrides: Any) -> T5Config:
    """The named config (e.g. "t5_1_1_small", "flan_t5_base", "t5_tiny") with field overrides."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown T5 config {name!r}; known: {', '.join(config_names())}")
    fields = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown T5Config field(s) {unknown} for {name!r}")
    return T5Config(**{**_CONFIGS[name], **overrides})


def config_to_json(config: T5Config) -> str:
    """The config as JSON (what MODEL_DIR/model_config.json holds)."""
    return json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True) + "\n"


def config_from_json(text: str, source: str) -> T5Config:
    """A config from `config_to_json`'s text; a ValueError names `source` and what is wrong."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    known = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown T5Config field(s) {unknown}")
    return T5Config(**fields)
