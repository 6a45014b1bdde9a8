"""A HF tokenizer that gives the same ids as our SentencePiece vocabulary, for HF exports.

transformers' T5Tokenizer rebuilds its pipeline from spiece.model with whitespace splitting
and no byte fallback: newlines and runs of spaces vanish and unseen characters become <unk>,
so a CQA input ("...\\nAnswer Choices:\\n(a) ...") gets other ids than in training. The export
therefore ships a `tokenizer.json` that replays SentencePiece's own encoding: the model's
normaliser rules (precompiled charsmap), its whitespace settings, the dummy "▁" prefix, the
unigram pieces and scores with byte fallback; "</s>" in the text is the EOS id (the NLI
separator) and EOS ends each input, as the tasks do. `tokenizer_config.json` names the
generic fast tokenizer class, which loads tokenizer.json as written (transformers 4 and 5).
As with hub T5 tokenizers, the literal texts "<pad>", "</s>" and "<unk>" are special tokens.
"""

from __future__ import annotations

import json
import pathlib

SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(spm_path: str):
    """A `tokenizers.Tokenizer` equivalent to encoding with the SentencePiece model + EOS."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import Unigram

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(pathlib.Path(spm_path).read_bytes())
    trainer, spec = model.trainer_spec, model.normalizer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(f"{spm_path}: only unigram SentencePiece models are supported")
    pieces = [(piece.piece, piece.score) for piece in model.pieces]
    for name, token in SPECIALS.items():
        if token not in {p for p, _ in pieces[:3]}:
            raise ValueError(f"{spm_path}: {name} {token!r} is not among the first three pieces "
                             "(T5 convention: <pad> 0, </s> 1, <unk> 2)")
    tokenizer = Tokenizer(Unigram(pieces, unk_id=trainer.unk_id,
                                  byte_fallback=trainer.byte_fallback))
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1 if spec.add_dummy_prefix else 0, 0)])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in SPECIALS.values()])
    eos = SPECIALS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
        special_tokens=[(eos, tokenizer.token_to_id(eos))])
    return tokenizer


def write_tokenizer_files(spm_path: str, directory: pathlib.Path,
                          model_max_length: int = 512) -> list[pathlib.Path]:
    """Writes spiece.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json;
    returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "spiece.model", directory / "tokenizer.json",
               directory / "tokenizer_config.json", directory / "special_tokens_map.json"]
    written[0].write_bytes(pathlib.Path(spm_path).read_bytes())
    build_tokenizer(spm_path).save(str(written[1]))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **SPECIALS}
    written[2].write_text(json.dumps(config, indent=2) + "\n")
    written[3].write_text(json.dumps(SPECIALS, indent=2) + "\n")
    return written
