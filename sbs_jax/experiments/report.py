"""Results of the experiment grid: aggregation over seeds, CSV / markdown tables and plots.

Each finished grid cell leaves one `results.json` (see `sbs_jax.experiments`). This module only
reads those files, so a report can be rebuilt at any time, also while a grid is still running.
Cells are repeated over seeds (the paper averages 4 runs), so every number is reported as the
mean and the standard error of the mean over the seeds that finished.

Three statistics of test accuracy per cell (STATISTICS): at the checkpoint that was best on
valid (ours: test is decoded once, nothing is chosen on it), at the last step, and the maximum
over the evals. The reference decodes test every 250 steps and selects nothing, so its logs
give the last two; they need `RunConfig.test_every_eval` (the paper preset turns it on).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

RESULTS_FILE = "results.json"

# Human-readable method names, in the order tables and legends list them.
METHOD_TITLES = {
    "standard_ft": "standard fine-tuning (gold labels)",
    "standard_distill": "standard distillation (teacher labels)",
    "single_task_gt": "single task: rationale + label in one target (gold labels)",
    "single_task": "single task: rationale + label in one target (teacher labels)",
    "sbs_gt": "step-by-step (gold labels)",
    "sbs_llm": "step-by-step (teacher labels)",
}

PUBLISHED_SOURCE = (
    "Hsieh et al., 2023, 'Distilling Step-by-Step! Outperforming Larger Language Models with "
    "Less Training Data and Smaller Model Sizes' (arXiv:2305.02301), T5-Base, 100% of the data, "
    "as listed in dss_data/README.md 'Published results'"
)
# Accuracy (%) published for T5-Base trained on 100% of each dataset.
PUBLISHED_T5_BASE = {
    "standard fine-tuning": {"esnli": 88.38, "anli1": 43.58, "cqa": 62.19, "svamp": 62.63},
    "single task (rationale and label in one target)": {
        "esnli": 88.88, "anli1": 43.50, "cqa": 61.37, "svamp": 63.00,
    },
    "step-by-step, GPT-NeoX-20B rationales": {
        "esnli": 89.12, "anli1": 48.15, "cqa": 63.25, "svamp": 63.00,
    },
    "step-by-step, PaLM 540B rationales": {
        "esnli": 89.51, "anli1": 49.58, "cqa": 63.29, "svamp": 65.50,
    },
}

# Known model names from small to large; unknown names sort after these, alphabetically.
MODEL_SIZE_ORDER = (
    "t5_1_1_tiny", "t5_small", "t5_1_1_small", "flan_t5_small", "t5_base", "t5_1_1_base",
    "flan_t5_base", "t5_large", "t5_1_1_large", "flan_t5_large", "t5_1_1_xl", "flan_t5_xl",
    "t5_1_1_xxl", "flan_t5_xxl",
)

GROUP_KEYS = ("dataset", "model", "method", "fraction")

# (key in results.json, column prefix in results.csv, title in results.md)
STATISTICS = (
    ("accuracy", "test_at_best_valid",
     "Test accuracy at the best-valid checkpoint (ours, the default)"),
    ("test_at_last_step", "test_at_last_step", "Test accuracy at the last step"),
    ("max_test_over_evals", "max_test_over_evals",
     "Maximum test accuracy over the evals (what the reference's test logs allow)"),
)


def test_statistics(history_path: str | os.PathLike) -> dict:
    """Test at the last eval and the best test over evals from a run's eval_history.jsonl
    (None when test was not scored at every eval). A resumed run may repeat a step: the
    last line of a step counts."""
    path = pathlib.Path(history_path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    by_step = {}
    for line in lines:
        entry = json.loads(line) if line.strip() else {}
        if entry.get("split") == "test" and "accuracy" in entry:
            by_step[int(entry["step"])] = float(entry["accuracy"])
    if not by_step:
        return {"test_at_last_step": None, "last_step": None, "max_test_over_evals": None,
                "max_test_step": None}
    last = max(by_step)
    best = max(sorted(by_step), key=by_step.get)  # the earliest step of the maximum
    return {"test_at_last_step": by_step[last], "last_step": last,
            "max_test_over_evals": by_step[best], "max_test_step": best}


def initialisation(records: Iterable[dict]) -> str:
    """'random init', 'pretrained' (every cell from a checkpoint), 'mixed' or '' (unrecorded)."""
    starts = [r.get("initial_checkpoint", "unrecorded") for r in records]
    if not starts or "unrecorded" in starts:
        return ""
    if all(start is None for start in starts):
        return "random init"
    return "pretrained" if None not in starts else "mixed"


def load_results(grid_dir: str | os.PathLike) -> list[dict]:
    """Every finished cell's results under `grid_dir` (any depth), in a stable order."""
    results = []
    for path in sorted(pathlib.Path(grid_dir).rglob(RESULTS_FILE)):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable results file {path}: {e}") from e
        missing = [k for k in (*GROUP_KEYS, "seed", "accuracy") if k not in record]
        if missing:
            raise ValueError(f"results file {path} lacks {missing}")
        results.append(record)
    return results


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); no error for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _model_rank(model: str) -> tuple[int, str]:
    if model in MODEL_SIZE_ORDER:
        return MODEL_SIZE_ORDER.index(model), model
    return len(MODEL_SIZE_ORDER), model


def _method_rank(method: str) -> tuple[int, str]:
    order = list(METHOD_TITLES)
    return (order.index(method) if method in order else len(order)), method


def aggregate(results: Iterable[dict]) -> list[dict]:
    """One row per (dataset, model, method, fraction): seeds, initialisation, and per statistic
    the mean, stderr and number of seeds that have it (`{column}_mean/_stderr/_n`)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in results:
        groups[tuple(record[k] for k in GROUP_KEYS)].append(record)
    rows = []
    for key, records in groups.items():
        records.sort(key=lambda r: r["seed"])
        row = {**dict(zip(GROUP_KEYS, key)), "num_seeds": len(records),
               "seeds": [r["seed"] for r in records], "init": initialisation(records)}
        for field, column, _ in STATISTICS:
            values = [float(r[field]) for r in records if r.get(field) is not None]
            mean, stderr = mean_and_stderr(values) if values else (None, None)
            row.update({f"{column}_mean": mean, f"{column}_stderr": stderr,
                        f"{column}_n": len(values)})
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], _model_rank(r["model"]), _method_rank(r["method"]),
                             r["fraction"]))
    return rows


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """The aggregated rows as CSV: test accuracy in %, a mean/stderr/n triple per statistic
    (stderr empty for one seed; mean empty where no seed has the statistic)."""
    numbers = [f"{column}_{part}" for _, column, _ in STATISTICS
               for part in ("mean", "stderr", "n")]
    fields = [*GROUP_KEYS, "init", "num_seeds", "seeds", *numbers]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({
                **{k: row[k] for k in (*GROUP_KEYS, "init", "num_seeds")},
                "seeds": " ".join(str(s) for s in row["seeds"]),
                **{k: ("" if row[k] is None else row[k] if k.endswith("_n") else f"{row[k]:.4f}")
                   for k in numbers},
            })
    os.replace(tmp, path)


def _format_cell(row: dict, column: str) -> str:
    if row[f"{column}_mean"] is None:
        return "—"
    text = f"{row[f'{column}_mean']:.2f}"
    if row[f"{column}_stderr"] is not None:
        text += f" ± {row[f'{column}_stderr']:.2f}"
    return f"{text} (n={row[f'{column}_n']})"


def _fraction_title(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def markdown_table(rows: Sequence[dict], with_published: bool = True) -> str:
    """Per dataset and model, one table per recorded statistic: methods as rows, data fractions
    as columns, mean ± stderr (n); the title says how the models were initialised.

    The paper's published T5-Base numbers (100% of the data) follow each dataset as reference
    rows, with their source named, so a reader can see how far a small-scale run is from them.
    They sit under the maximum over evals when it was recorded (the paper's numbers come from
    its test logs), else under test at best-valid.
    """
    init = initialisation_title(rows)
    lines = [f"# Grid results{': T5 from ' + init if init else ''}", "",
             "Test accuracy (%), mean ± standard error over seeds (n = seeds with the value)."]
    by_table: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_table[(row["dataset"], row["model"])].append(row)
    cited = False
    for (dataset, model), table_rows in by_table.items():
        fractions = sorted({r["fraction"] for r in table_rows})
        methods = sorted({r["method"] for r in table_rows}, key=_method_rank)
        lines += ["", f"### {dataset}, {model}"]
        recorded = [(column, title) for _, column, title in STATISTICS
                    if any(r[f"{column}_mean"] is not None for r in table_rows)]
        for column, title in recorded:
            lines += ["", f"{title}:", "",
                      "| method | " + " | ".join(_fraction_title(f) for f in fractions) + " |",
                      "|---|" + "---|" * len(fractions)]
            cells = {(r["method"], r["fraction"]): _format_cell(r, column) for r in table_rows}
            for method in methods:
                values = [cells.get((method, f), "—") for f in fractions]
                lines.append(f"| {METHOD_TITLES.get(method, method)} | "
                             + " | ".join(values) + " |")
            if (with_published and column == recorded[-1][0]
                    and any(dataset in v for v in PUBLISHED_T5_BASE.values())):
                cited = True
                lines += _published_rows(dataset, fractions)
        if len(recorded) < len(STATISTICS):
            lines += ["", ("Test at the last step and its maximum over evals were not recorded "
                           "(RunConfig.test_every_eval is off).")]
    if cited:
        lines += ["", f"[1] {PUBLISHED_SOURCE}."]
    return "\n".join(lines) + "\n"


def initialisation_title(rows: Sequence[dict]) -> str:
    """The models' start for the title: 'random init', 'pretrained checkpoints', or ''."""
    inits = {r["init"] for r in rows}
    if inits == {"random init"}:
        return "random init"
    return "pretrained checkpoints" if inits == {"pretrained"} else ""


def _published_rows(dataset: str, fractions: list[float]) -> list[str]:
    lines = []
    for title, values in PUBLISHED_T5_BASE.items():
        row = ["—"] * len(fractions)
        if 1.0 in fractions:
            row[fractions.index(1.0)] = f"{values[dataset]:.2f}"
        else:
            row[-1] = f"{values[dataset]:.2f} (at 100%)"
        lines.append(f"| paper, T5-Base: {title} [1] | " + " | ".join(row) + " |")
    return lines


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, rows, label):
    ys = [r["test_at_best_valid_mean"] for r in rows]
    errs = [r["test_at_best_valid_stderr"] or 0.0 for r in rows]
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)


def plot_accuracy_vs_fraction(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """One panel per (dataset, model): accuracy against data fraction, a line per method."""
    plt = pyplot()
    panels = sorted({(r["dataset"], r["model"]) for r in rows},
                    key=lambda p: (p[0], _model_rank(p[1])))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6),
                             squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels):
        panel = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
        for method in sorted({r["method"] for r in panel}, key=_method_rank):
            line = sorted((r for r in panel if r["method"] == method), key=lambda r: r["fraction"])
            _errorbar(ax, [r["fraction"] * 100 for r in line], line,
                      METHOD_TITLES.get(method, method))
        ax.set_xscale("log", base=2)
        ax.set_xticks([r * 100 for r in sorted({r["fraction"] for r in panel})])
        ax.set_xticklabels([_fraction_title(f) for f in sorted({r["fraction"] for r in panel})])
        ax.set_title(f"{dataset}, {model}")
        finish_axis(ax, "training data used", "test accuracy at best valid (%)")
    save_figure(fig, path)


def plot_accuracy_vs_model_size(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """One panel per dataset: accuracy against model (small to large) at the largest fraction."""
    plt = pyplot()
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(4.5 * max(len(datasets), 1), 3.6),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        panel = [r for r in rows if r["dataset"] == dataset]
        fraction = max(r["fraction"] for r in panel)
        panel = [r for r in panel if r["fraction"] == fraction]
        models = sorted({r["model"] for r in panel}, key=_model_rank)
        for method in sorted({r["method"] for r in panel}, key=_method_rank):
            line = sorted((r for r in panel if r["method"] == method),
                          key=lambda r: _model_rank(r["model"]))
            _errorbar(ax, [models.index(r["model"]) for r in line], line,
                      METHOD_TITLES.get(method, method))
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, fontsize=8)
        ax.set_title(f"{dataset}, {_fraction_title(fraction)} of the data")
        finish_axis(ax, "model", "test accuracy at best valid (%)")
    save_figure(fig, path)


def finish_axis(ax, xlabel: str, ylabel: str) -> None:
    """The labels, grid and legend every plot of ours shares."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Writes a PNG and frees the figure (plots are made in loops over cells)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def write_report(grid_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None
                 ) -> dict[str, str]:
    """Aggregates every finished cell under `grid_dir`; writes CSV, markdown and both plots.

    Returns the paths written, keyed by kind. Raises ValueError when no cell has finished.
    """
    output_dir = pathlib.Path(output_dir or grid_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(load_results(grid_dir))
    if not rows:
        raise ValueError(f"no finished cell ({RESULTS_FILE}) under {grid_dir}")
    paths = {
        "csv": str(output_dir / "results.csv"),
        "markdown": str(output_dir / "results.md"),
        "fraction_plot": str(output_dir / "accuracy_vs_fraction.png"),
        "model_size_plot": str(output_dir / "accuracy_vs_model_size.png"),
    }
    write_csv(rows, paths["csv"])
    pathlib.Path(paths["markdown"]).write_text(markdown_table(rows), encoding="utf-8")
    plot_accuracy_vs_fraction(rows, paths["fraction_plot"])
    plot_accuracy_vs_model_size(rows, paths["model_size_plot"])
    return paths
