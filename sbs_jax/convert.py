"""Convert between a HF T5 directory and our orbax checkpoint (MODEL_DIR).

    python -m sbs_jax.convert --to=hf --model_dir=RUN [--step=N] --hf_dir=OUT [--overwrite]
    python -m sbs_jax.convert --to=ours --hf_dir=HF --model_dir=RUN

--to=hf exports a trained student so `T5ForConditionalGeneration.from_pretrained(OUT)` gives
the same logits and `AutoTokenizer.from_pretrained(OUT)` the same input ids as training: the
run's own vocabulary (MODEL_DIR/spiece.model) goes with it as spiece.model + tokenizer.json.
The architecture comes from MODEL_DIR/model_config.json when present, else from the run's
run_config.json (model_name + overrides) or --model_name, with every size read from the
checkpoint's own parameter shapes. --vocab names the vocabulary of a MODEL_DIR that recorded
none (one that differs from the run's is refused). A non-empty OUT is refused unless
--overwrite. Exported files are world-readable (0644).
--to=ours writes step 0 of MODEL_DIR (params plus the fresh AdamW state that step 0 of
training starts from), model_config.json and the HF folder's spiece.model (pinned as in
training); use it as INITIAL_CHECKPOINT_PATH or with eval / infer. (Training also reads a HF
directory as INITIAL_CHECKPOINT_PATH directly.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from etils import epath

from sbs_jax.models.t5 import T5Config, get_config

MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "run_config.json"  # written by sbs_jax.run_config


def config_from_params(params: dict, base: T5Config) -> T5Config:
    """`base` with every size taken from the parameter shapes (unrolled or scanned)."""
    scanned = "layers" in params["encoder"]

    def layer(stack: str) -> dict:
        return params[stack]["layers"] if scanned else params[stack]["layers_0"]

    def num_layers(stack: str) -> int:
        if scanned:
            return int(layer(stack)["pre_mlp_layer_norm"]["scale"].shape[0])
        return sum(1 for k in params[stack] if k.startswith("layers_"))

    vocab, emb = params["token_embedder"]["embedding"].shape
    heads, buckets = params["encoder"]["relpos_bias"]["rel_embedding"].shape
    mlp = layer("encoder")["mlp"]
    gated = "wi_0" in mlp
    joined = layer("encoder")["attention"]["query"]["kernel"].shape[-1]
    activations = base.mlp_activations
    if gated != (len(activations) == 2):
        activations = ("gelu", "linear") if gated else ("relu",)
    return dataclasses.replace(
        base, vocab_size=int(vocab), emb_dim=int(emb), num_heads=int(heads),
        head_dim=int(joined) // int(heads),
        mlp_dim=int((mlp["wi_0"] if gated else mlp["wi"])["kernel"].shape[-1]),
        num_encoder_layers=num_layers("encoder"), num_decoder_layers=num_layers("decoder"),
        mlp_activations=activations, relative_attention_num_buckets=int(buckets),
        logits_via_embedding="logits_dense" not in params["decoder"], scan_layers=scanned)


def config_to_json(config: T5Config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True) + "\n"


def config_from_json(text: str, source: str) -> T5Config:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    known = {f.name for f in dataclasses.fields(T5Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown T5Config field(s) {unknown}")
    return T5Config(**fields)


def base_config(model_dir: str, model_name: str | None) -> T5Config:
    """The architecture of MODEL_DIR before sizes are read from its parameters."""
    directory = epath.Path(model_dir)
    if (directory / MODEL_CONFIG_FILE).exists():
        path = directory / MODEL_CONFIG_FILE
        return config_from_json(path.read_text(), str(path))
    overrides: dict[str, Any] = {}
    if model_name is None and (directory / RUN_CONFIG_FILE).exists():
        run = json.loads((directory / RUN_CONFIG_FILE).read_text())
        model_name, overrides = run.get("model_name"), dict(run.get("model_overrides") or {})
    if model_name is None:
        raise ValueError(f"{model_dir}: no {MODEL_CONFIG_FILE} or {RUN_CONFIG_FILE}; pass "
                         "--model_name (e.g. t5_1_1_small) to say which architecture it holds")
    overrides.pop("vocab_size", None)
    return get_config(model_name, **overrides)


def export_vocabulary(model_dir: str, vocab: str | None) -> str | None:
    """The vocabulary to ship with an export: the run's pinned one (--vocab must have its
    bytes), else --vocab, else None (a warning says the export has no tokenizer)."""
    from sbs_jax import run_files
    from sbs_jax.runtime import console

    pinned = run_files.run_vocabulary(model_dir)
    if pinned and vocab:
        run_files.check_same_vocabulary((f"MODEL_DIR={model_dir} was trained with", pinned),
                                        ("--vocab", vocab))
    if not (pinned or vocab):
        console.say(f"sbs-convert: warning: {model_dir} records no vocabulary "
                    f"({run_files.VOCAB_FILE}) and no --vocab was given: the export has no "
                    "tokenizer", file=sys.stderr)
    return pinned or vocab


def export_to_hf(model_dir: str, hf_dir: str, step: int | None = None,
                 model_name: str | None = None, vocab: str | None = None,
                 overwrite: bool = False) -> T5Config:
    """Our checkpoint (a step, default the latest) -> HF directory with the run's tokenizer;
    returns the config."""
    from sbs_jax import checkpoints
    from sbs_jax.models.hf import save_hf

    target = epath.Path(hf_dir)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"--hf_dir {hf_dir} is not empty; pass --overwrite to write into "
                              "it, or choose an empty folder")
    vocab = export_vocabulary(model_dir, vocab)
    params = checkpoints.load_params(model_dir, step)
    config = config_from_params(params, base_config(model_dir, model_name))
    save_hf(config, params, hf_dir, vocab=vocab)
    return config


def import_from_hf(hf_dir: str, model_dir: str) -> T5Config:
    """HF directory -> step 0 of our checkpoint plus model_config.json and the folder's
    vocabulary; returns the config."""
    import optax

    from sbs_jax import checkpoints, optim, run_files
    from sbs_jax.models.hf import load_hf

    if checkpoints.latest_step(model_dir) is not None:
        raise FileExistsError(f"{model_dir} already holds checkpoints; choose an empty MODEL_DIR")
    config, params = load_hf(hf_dir)
    opt_state = optim.make_optimizer(optax.constant_schedule(0.0)).init(params)
    checkpointer = checkpoints.Checkpointer(model_dir, async_save=False)
    try:
        checkpointer.save(0, params, opt_state, {})
    finally:
        checkpointer.close()
    (epath.Path(model_dir) / MODEL_CONFIG_FILE).write_text(config_to_json(config))
    run_files.pin(model_dir, run_files.checkpoint_vocabulary(hf_dir), None)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sbs-convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--to", required=True, choices=("hf", "ours"),
                        help="hf: MODEL_DIR -> HF directory; ours: HF directory -> MODEL_DIR")
    parser.add_argument("--model_dir", required=True, help="our run / checkpoint directory")
    parser.add_argument("--hf_dir", required=True, help="HF T5 directory (config.json + weights)")
    parser.add_argument("--step", type=int, default=None, help="--to=hf: step (default latest)")
    parser.add_argument("--model_name", default=None,
                        help="--to=hf: architecture name when MODEL_DIR does not record it")
    parser.add_argument("--vocab", default=None,
                        help="--to=hf: SentencePiece model to ship when MODEL_DIR records none")
    parser.add_argument("--overwrite", action="store_true",
                        help="--to=hf: write into a non-empty --hf_dir")
    args = parser.parse_args(argv)
    try:
        if args.to == "hf":
            config = export_to_hf(args.model_dir, args.hf_dir, args.step, args.model_name,
                                  args.vocab, args.overwrite)
            target = args.hf_dir
        else:
            config = import_from_hf(args.hf_dir, args.model_dir)
            target = args.model_dir
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sbs-convert: error: {e}", file=sys.stderr)
        return 2
    from sbs_jax.runtime import console

    console.say(f"wrote {target}: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
