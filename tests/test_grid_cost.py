"""benchmarks/grid_cost.py: the paper grid's per-run FLOPs from the released data."""

import os
import sys

import pytest

# benchmarks/ holds scripts, not a package: its modules import each other by path.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import grid_cost


def test_costs_follow_the_methods_views(dss_data_dir, tiny_vocab_path):
    rows = grid_cost.cell_costs(str(dss_data_dir), "t5_1_1_base", tiny_vocab_path,
                                train_mfu=0.25, decode_mfu=0.03, samples=5)
    by_cell = {(r["dataset"], r["method"]): r for r in rows}
    assert len(by_cell) == 4 * 6
    for dataset in ("esnli", "anli1", "cqa", "svamp"):
        train = {m: by_cell[(dataset, m)]["train_flops"] for m in ("standard_ft", "single_task_gt",
                                                                     "sbs_gt")}
        # A rationale target costs more than a label; sbs trains both views, each with its encoder.
        assert train["standard_ft"] < train["single_task_gt"] < train["sbs_gt"]
        assert by_cell[(dataset, "sbs_gt")]["eval_flops"] > 0
    esnli, svamp = by_cell[("esnli", "sbs_gt")], by_cell[("svamp", "sbs_gt")]
    assert esnli["eval_flops"] > 10 * svamp["eval_flops"]  # ~19.7k valid+test rows vs 280
    totals = grid_cost.totals(rows)
    table = totals["the table's 48 runs"]
    assert table["train_flops"] == pytest.approx(4 * sum(
        r["train_flops"] for r in rows if r["method"] in grid_cost.TABLE_METHODS))
    assert totals["the grid's 384 runs for this size"]["H100 hours"] > table["H100 hours"]


def test_token_counts_come_from_the_vocabulary_when_given(tiny_vocab_path):
    import sentencepiece

    text = "Tom has 6 cards. He buys 5 more."
    pieces = sentencepiece.SentencePieceProcessor(model_file=tiny_vocab_path).encode(text)
    assert grid_cost.TokenCounter(tiny_vocab_path)(text) == len(pieces) + 1
    assert grid_cost.TokenCounter(None)(text) == -(-len(text) // 4) + 1
