"""The compiled sbs step on the 2x2x2 CPU mesh: the communication benchmarks/hlo_check.py lists."""

import pathlib
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import hlo_check  # benchmarks/ holds scripts, not a package

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def found():
    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 virtual CPU devices of tests/conftest.py")
    text = hlo_check.compiled_step_text("t5_1_1_tiny", 1, (2, 2, 2), GLOBAL_BATCH, 12, 4, 6,
                                        vocab_size=256)
    return hlo_check.collectives(text)


def _modules(entries):
    """The module of each entry's source, e.g. "wo" for ".../mlp/wo/dot_general"."""
    return {e["source"].split("/")[-2] for e in entries if "/" in e["source"]}


def test_step_gathers_kernels_over_fsdp_and_reduces_over_model(found):
    assert {"wi_0", "wi_1", "wo", "query", "key", "value", "out"} <= _modules(found["all-gather"])
    assert {"out", "wo"} <= _modules(found["all-reduce"])


def test_no_activation_is_gathered_over_the_global_batch(found):
    assert hlo_check.batch_all_gathers(found, GLOBAL_BATCH) == []
