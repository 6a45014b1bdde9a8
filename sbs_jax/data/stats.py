"""Per-split figures of the released data: rows, teacher parse failures, teacher accuracy.

`python -m sbs_jax.data.stats --data_dir ../shared/dss_data` reproduces the reference figures in
dss_data/README.md (teacher accuracy on test: esnli 73.0, anli1 65.6, cqa 77.2, svamp 74.0;
parse failures: anli1 train 123 completions without a label, svamp train 11 empty rationales).
Teacher labels are compared as parsed (no normalisation); svamp compares expression values
with the reference's rule (`metrics.arithmetic_accuracy`: train 73.5, test 74.0).
Missing train inputs (e-SNLI, ANLI) are reported as a warning saying which public split to place
where; the completions of that split are still counted. Rows get the build job's checks (types,
UTF-8, unique ids); every bad row is listed as FILE:LINE and left out of the figures. Exit status
0 unless a file or a row is bad (`--skip_bad`: 0 with bad rows too).
"""

from __future__ import annotations

import math
import os

from sbs_jax.data import dss
from sbs_jax.data.parse import parse_completion
from sbs_jax.infer import metrics

COLUMNS = ("dataset", "split", "rows", "completions", "parse_failures", "empty_rationales",
           "teacher_accuracy")


def teacher_accuracy(dataset: str, records: list) -> float:
    """Percent of teacher labels equal to gold (svamp: equal values)."""
    metric = metrics.arithmetic_accuracy if dataset == "svamp" else metrics.accuracy
    return metric([r.label for r in records], [r.llm_label for r in records])["accuracy"]


def split_stats(root: str, dataset: str, split: str) -> dict:
    """The figures of one released split; `warning` is set when its gold inputs are missing.

    Rows are checked as the build job checks them; bad ones are left out of the figures and
    listed in `bad_rows` (FILE:LINE: why), so one run reports all of them.
    """
    row = {"dataset": dataset, "split": split, "rows": None, "completions": None,
           "parse_failures": None, "empty_rationales": None, "teacher_accuracy": None}
    try:
        data = dss.read_split(root, dataset, split, skip_bad=True)
    except FileNotFoundError as error:
        row["warning"] = str(error)
        completions = dss.read_completions(root, dataset, split)
        if completions is not None:
            parsed = [parse_completion(dataset, c) for c in completions]
            row.update(completions=len(parsed),
                       parse_failures=sum(p.label is None for p in parsed),
                       empty_rationales=sum(not p.rationale.strip() for p in parsed))
        return row
    row["rows"] = len(data.records)
    if data.skipped:
        row["skipped"] = len(data.skipped)
        row["bad_rows"] = data.skipped
    if data.has_completions:
        row.update(completions=len(data.records), parse_failures=data.parse_failures,
                   empty_rationales=data.empty_rationales,
                   teacher_accuracy=round(teacher_accuracy(dataset, data.records), 2))
    if dataset in ("cqa", "svamp") and split == "train":
        train, valid = dss.carve_valid(data.records)
        row["carved_train_valid"] = [len(train), len(valid)]
    return row


def collect(root: str, datasets: list[str] | None = None) -> list[dict]:
    """Rows for every released split of the datasets present under `root` (or those named)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"released-data folder not found: {root}")
    names = datasets or [d for d in dss.DSS_DATASETS if os.path.isdir(os.path.join(root, d))]
    return [split_stats(root, d, s) for d in names for s in dss.RELEASED_SPLITS[d]]


def format_table(rows: list[dict]) -> str:
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) and not math.isnan(value) else str(value)

    table = [COLUMNS] + [tuple(cell(r[c]) for c in COLUMNS) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    for r in rows:
        if "carved_train_valid" in r:
            train, valid = r["carved_train_valid"]
            lines.append(f"{r['dataset']}: valid carved from train (seed {dss.VALID_SEED}, "
                         f"{dss.VALID_FRACTION:.0%}): train {train}, valid {valid}")
        if r.get("skipped"):
            lines.append(f"{r['dataset']}/{r['split']}: {r['skipped']} bad rows left out")
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m sbs_jax.data.stats`: runs sbs_jax.cli.data_stats
    import sys

    from sbs_jax.cli import data_stats

    sys.exit(data_stats.main())
