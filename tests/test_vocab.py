import sentencepiece as spm
import pytest

from sbs_jax.vocab import load_vocab, padded_vocab_size, train_vocab

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
