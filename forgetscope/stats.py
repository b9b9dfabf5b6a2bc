"""Paired statistics over items: the same items are scored at every step, so deltas pair up.

Per item, lm-eval stores either a value (``acc``: 0/1) or a pair ``[log-likelihood, weight]``
(``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``: weight = words or bytes). A corpus
metric is an aggregate of the items; we write each item as (numerator, denominator):

* mean metrics:        value = sum(num) / sum(den), with num = value, den = 1
* word/byte perplexity: value = exp(-sum(num) / sum(den)),     num = log-likelihood, den = words/bytes
* bits_per_byte:        value = -sum(num) / sum(den) / ln 2

The paired bootstrap resamples *items* (the same resample at both steps) and recomputes the
aggregate at each step; the 2.5 and 97.5 percentiles of the difference form the 95% CI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from forgetscope.snapshots import RunLayout


def item_values(layout: RunLayout, step: int, task: str, metric: str) -> dict[str, tuple[float, float]]:
    """{item_id: (numerator, denominator)} for one task and metric at one step."""
    path = layout.eval_dir(step) / f"samples_{task}.jsonl"
    out = {}
    for line in Path(path).read_text().splitlines():
        sample = json.loads(line)
        value = sample[metric]
        out[str(sample["item_id"])] = (float(value[0]), float(value[1])) if isinstance(value, list) else (float(value), 1.0)
    return out


def aggregate(metric: str, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """The corpus value from per-item (num, den); works along the last axis (for bootstrap batches)."""
    ratio = num.sum(axis=-1) / den.sum(axis=-1)
    if metric in ("word_perplexity", "byte_perplexity"):
        return np.exp(-ratio)
    if metric == "bits_per_byte":
        return -ratio / math.log(2)
    return ratio


def paired_delta(layout: RunLayout, task: str, metric: str, step: int, base_step: int = 0,
                 iters: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """``value(step) - value(base_step)`` on the items both scored, with a paired bootstrap CI
    (two-sided, at ``confidence``)."""
    base = item_values(layout, base_step, task, metric)
    later = item_values(layout, step, task, metric)
    items = sorted(set(base) & set(later))
    b = np.array([base[i] for i in items])
    s = np.array([later[i] for i in items])
    delta = float(aggregate(metric, s[:, 0], s[:, 1]) - aggregate(metric, b[:, 0], b[:, 1]))
    idx = np.random.default_rng(seed).integers(0, len(items), size=(iters, len(items)))
    boot = aggregate(metric, s[idx, 0], s[idx, 1]) - aggregate(metric, b[idx, 0], b[idx, 1])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return {"delta": delta, "low": float(low), "high": float(high), "n": len(items)}


def as_drop(ci: dict, higher_is_better: bool) -> tuple[float, float, float]:
    """A paired delta and its CI (from :func:`paired_delta`) -> the drop (positive = worse, for
    every metric) and its CI."""
    if higher_is_better:
        return -ci["delta"], -ci["high"], -ci["low"]
    return ci["delta"], ci["low"], ci["high"]


def final_vs_base(layout: RunLayout, table) -> list[dict]:
    """For every task's primary metric: base value, last-step value, paired delta and 95% CI, and
    ``worse`` = the CI lies entirely on the side of getting worse (sign-correct per metric)."""
    from forgetscope.curves import primary_metric

    last = int(table["step"].max())
    rows = []
    for task, group in table.groupby("task", sort=False):
        metric = primary_metric(list(group["metric"].unique()))
        line = group[group["metric"] == metric].set_index("step")
        higher = bool(line["higher_is_better"].iloc[0])
        ci = paired_delta(layout, task, metric, last)
        worse = bool(ci["high"] < 0 if higher else ci["low"] > 0)
        rows.append({"task": task, "role": line["role"].iloc[0], "metric": metric, "higher_is_better": higher,
                     "base": float(line.loc[0, "value"]), "final": float(line.loc[last, "value"]), "step": last, **ci,
                     "worse": worse})
    return sorted(rows, key=lambda r: r["role"] != "new")


def format_summary(rows: list[dict]) -> str:
    """The rows of :func:`final_vs_base` as a small aligned text table."""
    lines = [f"{'task':18s} {'role':8s} {'metric':15s} {'base':>9s} {'final':>9s} {'delta [95% CI]':>30s}"]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        flag = "  worse" if r["worse"] else ""
        ci = f"{r['delta']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(f"{r['task']:18s} {r['role']:8s} {r['metric'] + arrow:15s} {r['base']:9.4f} {r['final']:9.4f} {ci:>30s}{flag}")
    return "\n".join(lines)


def at_learning(layout: RunLayout, table, target: float) -> dict | None:
    """Forgetting at matched learning, at snapshot resolution: the first snapshot where the new
    task's primary metric reaches ``target``, and every general probe's paired change from the
    base there. ``None`` when the run never reaches ``target``."""
    from forgetscope.curves import primary_metric

    new = table[table["role"] == "new"]
    if new.empty:
        return None
    task = new["task"].iloc[0]
    metric = primary_metric(list(new[new["task"] == task]["metric"].unique()))
    line = new[(new["task"] == task) & (new["metric"] == metric)].sort_values("step")
    reached = line[line["value"] >= target]
    if reached.empty:
        return None
    step = int(reached["step"].iloc[0])
    general = []
    for probe, group in table[table["role"] == "general"].groupby("task", sort=True):
        probe_metric = primary_metric(list(group["metric"].unique()))
        general.append({"task": probe, "metric": probe_metric, **paired_delta(layout, probe, probe_metric, step)})
    return {"step": step, "new_task": task, "new_metric": metric, "new_value": float(reached["value"].iloc[0]), "general": general}


def mcnemar(forgotten: int, learned: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs of a paired 0/1 metric: ``b`` items
    right at the base and wrong later, ``c`` wrong then right. Under no change each discordant
    item is equally likely to go either way, so ``p = min(1, 2 * P[X <= min(b, c)])`` with
    ``X ~ Binomial(b + c, 1/2)``; ``p = 1`` when there is no discordant item."""
    n, k = forgotten + learned, min(forgotten, learned)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def correctness(layout: RunLayout, step: int, task: str, metric: str) -> dict[str, bool] | None:
    """{item_id: right?} for a 0/1 metric (accuracy, exact match); None for a continuous one."""
    values = item_values(layout, step, task, metric)
    if any(den != 1.0 or num not in (0.0, 1.0) for num, den in values.values()):
        return None
    return {item: num == 1.0 for item, (num, _) in values.items()}


def flips(layout: RunLayout, task: str, metric: str, step: int, base_step: int = 0) -> dict | None:
    """Items that flipped between ``base_step`` and ``step`` for a 0/1 metric: ``forgotten``
    (right -> wrong) and ``learned`` (wrong -> right) item ids, and McNemar's exact p-value."""
    base, later = correctness(layout, base_step, task, metric), correctness(layout, step, task, metric)
    if base is None or later is None:
        return None
    items = sorted(set(base) & set(later))
    forgotten = [i for i in items if base[i] and not later[i]]
    learned = [i for i in items if not base[i] and later[i]]
    return {"forgotten": forgotten, "learned": learned, "n": len(items), "p_mcnemar": mcnemar(len(forgotten), len(learned))}


def first_forgotten(layout: RunLayout, task: str, metric: str, steps: list[int]) -> dict[str, int]:
    """{item_id: the first step after 0 at which an item right at the base is wrong} (0/1
    metrics; items never forgotten are left out)."""
    base = correctness(layout, 0, task, metric) or {}
    out: dict[str, int] = {}
    for step in sorted(s for s in steps if s > 0):
        now = correctness(layout, step, task, metric) or {}
        for item, right in now.items():
            if base.get(item) and not right and item not in out:
                out[item] = step
    return out
