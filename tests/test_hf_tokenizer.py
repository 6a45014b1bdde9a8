"""The exported HF tokenizer gives the input ids our tasks give, on the released inputs of every
dataset (newlines, double spaces, unseen characters by byte fallback, the NLI EOS separator)."""

import pathlib

import pytest

from sbs_jax.data import dss, synthetic
from sbs_jax.data.vocab import train_vocab
from sbs_jax.infer.inputs import input_set
from sbs_jax.models.hf_tokenizer import write_tokenizer_files
from tasks import LABEL_PREFIX
from tasks import config as tasks_config

ROWS = 400  # inputs compared per dataset
# Text our pipeline keeps exactly that a whitespace-splitting tokenizer would not.
EDGE_CASES = ["two  spaces", " leading", "trailing ", "tab\there", "line\nbreak\n\n",
              "crlf\r\nend", "unseen ✓ 😀 ü", "sep\u2028arator", "x", "Premise.</s> hypothesis"]


@pytest.fixture(scope="module")
def released(dss_data_dir) -> dict[str, list[str]]:
    """Record inputs of the released test splits, and of the synthetic dataset."""
    inputs = {ds: [r.input for r in dss.read_split(str(dss_data_dir), ds, "test").records]
              for ds in dss.DSS_DATASETS}
    inputs["synthetic"] = [r.input for r in synthetic.generate(ROWS, seed=1, split="test")]
    return inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dss_data_dir):
    """(our vocabulary, AutoTokenizer of its export), the vocabulary trained on other splits
    than the ones compared, so test inputs hold pieces it has never seen."""
    from transformers import AutoTokenizer

    texts = [r.input.replace(dss.NLI_SEPARATOR, " ") for ds, split in
             (("esnli", "valid"), ("anli1", "valid"), ("cqa", "train"), ("svamp", "train"))
             for r in dss.read_split(str(dss_data_dir), ds, split).records[:300]]
    texts += synthetic.vocabulary_texts(synthetic.generate(200, seed=0, split="train"))
    work = tmp_path_factory.mktemp("hf_tokenizer")
    vocab = train_vocab(texts, str(work / "spm"), vocab_size=1000)
    write_tokenizer_files(vocab, work / "export")
    return vocab, AutoTokenizer.from_pretrained(str(work / "export"))


@pytest.mark.parametrize("dataset", [*dss.DSS_DATASETS, "synthetic"])
def test_hf_tokenizer_ids_equal_ours(dataset, released, exported):
    vocab, tokenizer = exported
    texts = released[dataset][:ROWS] + EDGE_CASES
    if dataset == "cqa":
        assert all("\n" in text for text in texts[:ROWS])
    with tasks_config.overrides_restored():
        tasks_config.set_vocabulary_path(vocab)
        ours = input_set(f"{dataset}_label_gt", [(str(i), t) for i, t in enumerate(texts)],
                         1 << 16)
    theirs = tokenizer([LABEL_PREFIX + text for text in texts]).input_ids
    mismatched = [(texts[i], list(ours.inputs[i]), theirs[i]) for i in range(len(texts))
                  if list(ours.inputs[i]) != theirs[i]]
    assert not mismatched, mismatched[:2]
    pieces = [piece for ids in theirs for piece in tokenizer.convert_ids_to_tokens(ids)]
    assert any(piece.startswith("<0x") for piece in pieces)  # byte fallback was needed


def test_decoding_round_trips_text(exported):
    _, tokenizer = exported
    for text in ["7 + 8\nAnswer Choices:\n(a) x", "two  spaces ✓"]:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_hf_tokenizer_is_a_t5_tokenizer(exported):
    _, tokenizer = exported
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer("x").input_ids[-1] == 1
    assert pathlib.Path(tokenizer.name_or_path, "spiece.model").exists()
