import random

import pytest
import sentencepiece as spm

from sbs_jax.data.vocab import load_vocab, padded_vocab_size, train_vocab

ROUND_TRIP = [
    "Premise: A man plays a guitar. Hypothesis: A person performs.",
    "  leading and   repeated spaces, tabs\tand\nnewlines  ",
    "Zürich — naïve café, 東京, emoji 🤖, Ελληνικά",
    "( 84.0 / 2.0 ) - 3",
    "",
]


def test_special_ids_follow_t5(tiny_vocab_path):
    sp = spm.SentencePieceProcessor(model_file=tiny_vocab_path)
    assert sp.pad_id() == 0 and sp.eos_id() == 1 and sp.unk_id() == 2 and sp.bos_id() == -1
    assert sp.id_to_piece(0) == "<pad>" and sp.id_to_piece(1) == "</s>"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_seqio_round_trip_exact(tiny_vocab_path, text):
    vocab = load_vocab(tiny_vocab_path)
    ids = vocab.encode(text)
    assert 2 not in ids, "byte fallback means nothing maps to unk"
    assert vocab.decode(ids) == text


def test_unseen_characters_use_byte_pieces(tiny_vocab_path):
    sp = spm.SentencePieceProcessor(model_file=tiny_vocab_path)
    pieces = sp.encode("ⓩ", out_type=str)
    assert [p for p in pieces if p != "\u2581"] == ["<0xE2>", "<0x93>", "<0xA9>"], pieces


def test_vocab_is_soft_limited_and_padded(tmp_path):
    path = train_vocab(["a b c"] * 10, str(tmp_path / "small"), vocab_size=4000)
    size = spm.SentencePieceProcessor(model_file=path).vocab_size()
    assert 259 < size < 4000
    assert padded_vocab_size(32100) == 32128
    assert padded_vocab_size(size) % 128 == 0 and padded_vocab_size(size) >= size


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_vocab(["x"], str(tmp_path / "v"), vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_vocab(str(tmp_path / "missing.model"))


def test_encoding_equals_identity_normalisation(tmp_path, tiny_vocab_path):
    """Our one-rule table changes nothing but U+10FFFF: same pieces and ids as `identity`."""
    from sentencepiece import sentencepiece_model_pb2

    with open(tiny_vocab_path, "rb") as model_file:
        ours = sentencepiece_model_pb2.ModelProto.FromString(model_file.read())
    assert ours.normalizer_spec.precompiled_charsmap, "a non-empty table keeps tf-text quiet"
    identity = sentencepiece_model_pb2.ModelProto.FromString(ours.SerializeToString())
    identity.normalizer_spec.name = "identity"
    identity.normalizer_spec.precompiled_charsmap = b""
    ours_sp = spm.SentencePieceProcessor(model_proto=ours.SerializeToString())
    identity_sp = spm.SentencePieceProcessor(model_proto=identity.SerializeToString())
    rng = random.Random(0)
    code_points = [*range(127), *range(0x80, 0x3000), *range(0xFF00, 0xFFFE), 0x1F916, 0x10FFFE]
    for _ in range(2000):
        text = "".join(chr(rng.choice(code_points)) for _ in range(rng.randint(0, 24)))
        assert ours_sp.encode(text) == identity_sp.encode(text), repr(text)
    assert ours_sp.decode(ours_sp.encode("a\U0010ffffb")) == "a\ufffdb"


def test_tensorflow_loads_our_vocabulary_without_logging(tiny_vocab_path, capfd):
    vocab = load_vocab(tiny_vocab_path)
    assert vocab.tf_tokenizer is not None  # builds the tf-text sentencepiece op
    assert list(vocab.encode_tf("x + 1").numpy()) == vocab.encode("x + 1")
    assert "precompiled_charsmap" not in capfd.readouterr().err
