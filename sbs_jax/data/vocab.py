"""Train and load T5-convention SentencePiece vocabularies.

Nothing can be downloaded at run time, so tests and the quickstart train their own vocabulary.
Conventions match T5's spiece.model: pad=0, eos=1, unk=2, no bos; byte fallback plus identity
normalisation (and no whitespace collapsing) so every string round-trips exactly.

The normalisation rule is not sentencepiece's built-in `identity` but a one-entry rule table that
maps the noncharacter U+10FFFF (reserved, never in interchanged text) to U+FFFD. Every other string
encodes exactly as under `identity`; the point is a non-empty compiled rule table, because the
sentencepiece copy inside tf-text logs "precompiled_charsmap is empty" to stderr every time
TensorFlow loads an identity-normalised model (once per dataset pipeline), with no way to
silence it.

Piece scores are rounded to multiples of 2**-8. Unigram segmentation picks the path with the
highest sum of scores; sentencepiece sums in float32, HF `tokenizers` in float64, so where two
paths hold the same pieces in another order ("00" + "0" and "0" + "00") rounding alone chose,
differently in each. With rounded scores every sum is exact in both, ties stay ties, and both
break them alike: the HF tokenizer we export (`sbs_jax.models.hf_tokenizer`) gives our ids.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

# sentencepiece is imported where a vocabulary is trained: the model and decoding need only the
# ids below, on hosts (a bare GPU box) that may not have it.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# Source and target code points of the single normalisation rule (see the module docstring).
QUIET_IDENTITY_RULE = "10FFFF\tFFFD\n"
SCORE_RESOLUTION = 2.0 ** -8  # exact float32 path sums up to 2**15 in magnitude
EMBEDDING_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, multiple: int = EMBEDDING_MULTIPLE) -> int:
    """Rows of the embedding table: the vocabulary rounded up (as T5's 32100 -> 32128).

    Rounding makes every mesh axis divide the table evenly.
    """
    return -(-vocab_size // multiple) * multiple


def train_vocab(texts: Iterable[str], output_prefix: str, vocab_size: int = 512) -> str:
    """Trains a unigram SentencePiece model on `texts`; returns the path of the `.model` file.

    `vocab_size` counts the three specials and the 256 byte pieces, so use at least 512. The
    limit is soft: a small corpus yields fewer pieces rather than an error.
    """
    import sentencepiece as spm

    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for pieces; use >= 512")
    sentences = [t for t in texts if t]
    if not sentences:
        raise ValueError("train_vocab needs at least one non-empty text")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as rule_dir:
        rule_path = os.path.join(rule_dir, "quiet_identity.tsv")
        with open(rule_path, "w", encoding="utf-8") as rule_file:
            rule_file.write(QUIET_IDENTITY_RULE)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=output_prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            byte_fallback=True,
            normalization_rule_tsv=rule_path,
            remove_extra_whitespaces=False,
            hard_vocab_limit=False,
            character_coverage=1.0,
            max_sentence_length=1 << 16,
            # Digits are not split (as T5's spiece): split, each digit of a spaced number
            # (`3 4 7`) is two tokens (`▁`, `3`), which doubles the synthetic inputs and labels
            # and the cost of a step; whole `▁3` pieces keep the quickstart's inputs short.
            split_digits=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    _round_scores(output_prefix + ".model")
    return output_prefix + ".model"


def _round_scores(model_path: str) -> None:
    """Rewrites the model with every piece score a multiple of SCORE_RESOLUTION."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        model.ParseFromString(f.read())
    for piece in model.pieces:
        piece.score = round(piece.score / SCORE_RESOLUTION) * SCORE_RESOLUTION
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())


def load_vocab(model_path: str):
    """A `seqio.SentencePieceVocabulary` for a model file (ours or a HF T5 spiece.model)."""
    import seqio

    if not os.path.exists(model_path):
        raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
    return seqio.SentencePieceVocabulary(model_path)
