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


def test_packed_step_communicates_as_the_unpacked_one(found):
    """Segment ids travel with their rows: packing adds no collective traffic (XLA may group
    the gradient all-reduces into other tuples, so bytes are compared, not instructions; on
    t5_1_1_small the packed step even all-reduces two relative-position-bias gradients less)."""
    packed = hlo_check.collectives(hlo_check.compiled_step_text(
        "t5_1_1_tiny", 1, (2, 2, 2), GLOBAL_BATCH, 12, 4, 6, packed=True, vocab_size=256))
    assert hlo_check.batch_all_gathers(packed, GLOBAL_BATCH) == []
    packed_bytes, unpacked_bytes = hlo_check.result_bytes(packed), hlo_check.result_bytes(found)
    assert unpacked_bytes["all-gather"] > 0 and unpacked_bytes["all-reduce"] > 0
    for kind in hlo_check.COLLECTIVES:
        assert packed_bytes[kind] <= unpacked_bytes[kind], kind


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fsdp_kernels_are_gathered_inside_the_microbatch_loop(scan_layers):
    """With micro-batches, every fsdp all-gather of a parameter runs in the accumulation loop's
    body and no gathered parameter is carried through the loop (live for all of it). emb_dim
    48 keeps gathered shapes (48 x ...) apart from every shard (24 x ...)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 virtual CPU devices of tests/conftest.py")
    settings = {"vocab_size": 256, "emb_dim": 48, "scan_layers": scan_layers}
    text = hlo_check.compiled_step_text("t5_1_1_tiny", 1, (2, 2, 2), 16, 12, 4, 6,
                                        num_microbatches=2, **settings)
    gathered = hlo_check.gathered_shapes_of("t5_1_1_tiny", 1, (2, 2, 2), **settings)
    assert {(48, 16), (16, 48), (48, 32), (32, 48), (128, 48)} <= gathered
    report = hlo_check.loop_report(text, 2, gathered)
    assert report["carried_gathered_params"] == []
    assert report["param_all_gathers_outside_loop"] == []
    assert report["param_all_gathers_in_loop"] > 0


def test_every_result_shape_is_read_tuples_too():
    text = """
  %all-reduce.5 = (f32[2,64]{1,0}, bf16[3]{0}) all-reduce(%a, %b), replica_groups={{0,1}}
  ROOT %all-gather-start.2 = f32[8,4,2]{2,1,0} all-gather-start(%c), dimensions={0}
  %all-gather-done.2 = f32[8,4,2]{2,1,0} all-gather-done(%all-gather-start.2)
  %copy.1 = s32[5]{0} copy(%d)
"""
    found = hlo_check.collectives(text)
    assert hlo_check.result_bytes(found) == {
        "all-reduce": 2 * 64 * 4 + 3 * 2, "all-gather": 8 * 4 * 2 * 4, "copy": 5 * 4,
        "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}
    assert hlo_check.batch_all_gathers(found, 8) == found["all-gather"]
