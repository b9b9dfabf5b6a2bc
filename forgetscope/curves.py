"""Results per snapshot -> one tidy table (``curves.csv``).

One row per step x task x metric::

    run, recipe, method, step, tokens, task, role, metric, value, stderr, n, higher_is_better

``role`` is ``new`` (the task being learned) or ``general`` (held-out capabilities, where a drop
from step 0 is forgetting).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from forgetscope import io
from forgetscope.snapshots import RunLayout

COLUMNS = [
    "run",
    "recipe",
    "method",
    "step",
    "tokens",
    "task",
    "role",
    "metric",
    "value",
    "stderr",
    "n",
    "higher_is_better",
]


def build_table(layout: RunLayout, run: str, recipe: str, method: str) -> pd.DataFrame:
    """Every finished evaluation of a run as tidy rows, sorted by role, task, metric and step; a
    task's metrics stay in lm-eval's order (:func:`in_lm_eval_order`)."""
    rows = []
    for step in layout.eval_steps():
        result = io.read_json(layout.eval_dir(step) / "results.json")
        for task, entry in result["tasks"].items():
            for metric, m in entry["metrics"].items():
                rows.append(
                    {
                        "run": run,
                        "recipe": recipe,
                        "method": method,
                        "step": step,
                        "tokens": result["tokens"],
                        "task": task,
                        "role": entry["role"],
                        "metric": metric,
                        "value": m["value"],
                        "stderr": m["stderr"],
                        "n": entry["n"],
                        "higher_is_better": m["higher_is_better"],
                    }
                )
    return in_lm_eval_order(pd.DataFrame(rows, columns=COLUMNS), layout)


def in_lm_eval_order(table: pd.DataFrame, layout: RunLayout) -> pd.DataFrame:
    """``table`` sorted by role, task, metric and step, each task's metrics in lm-eval's order (its
    YAML's metrics and filters, as the run's ``results.json`` files list them), which decides its
    primary metric (:func:`primary_metric`). Also for a ``curves.csv`` written before the table kept
    that order (it sorted metrics by name, so gsm8k's primary metric was ``flexible-extract``)."""
    order: dict[tuple[str, str], int] = {}
    for step in layout.eval_steps():
        for task, entry in io.read_json(layout.eval_dir(step) / "results.json")["tasks"].items():
            for metric in entry["metrics"]:
                order.setdefault((task, metric), len(order))
    rank = [order.get(pair, len(order)) for pair in zip(table["task"], table["metric"])]
    return (
        table.assign(_order=rank)
        .sort_values(["role", "task", "_order", "step"], ignore_index=True, kind="stable")
        .drop(columns="_order")
    )


def write_curves(layout: RunLayout, run: str, recipe: str, method: str) -> pd.DataFrame:
    """Build the table and write it to ``curves.csv`` (atomically)."""
    table = build_table(layout, run, recipe, method)
    io.write_text(layout.curves, table.to_csv(index=False))
    return table


PRIMARY_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte", "word_perplexity", "perplexity")


def primary_metric(metrics: list[str]) -> str:
    """The metric that stands for a task in figures, summaries, reports and the gate: the first of
    ``PRIMARY_METRICS`` it has, under any filter, taking the task's own order among filters
    (``metrics`` in lm-eval's order: gsm8k's ``exact_match,strict-match`` before
    ``exact_match,flexible-extract``), else its first. A gate policy can name another (``metric:``)."""
    return next((m for name in PRIMARY_METRICS for m in metrics if m.partition(",")[0] == name), metrics[0])


FRACTIONS = ("acc", "acc_norm", "exact_match")
"""Metrics whose scores are fractions of items, 0 to 1."""


def target_problem(target: float | None, metric: str, of: str = "") -> str | None:
    """The one-line error for a ``--target`` score outside 0..1 on ``metric`` when its scores are
    fractions (``of``: where the metric comes from, for the message), else None."""
    if target is None or metric.partition(",")[0] not in FRACTIONS or 0 <= target <= 1:
        return None
    return f"--target {target:g}: outside the range of {metric} (0 to 1){of}; scores are fractions, e.g. 0.9 for 90%"


def headline(results: dict[str, Any]) -> str:
    """A one-line summary of one evaluation: the primary metric of every task."""
    parts = []
    for task, entry in results.items():
        metric = primary_metric(list(entry["metrics"]))
        parts.append(f"{task} {metric}={entry['metrics'][metric]['value']:.4g}")
    return ", ".join(parts)
