"""Paired statistics over items: the same items are scored at every step, so deltas pair up.

Per item, lm-eval stores either a value (``acc``: 0/1) or a pair ``[log-likelihood, weight]``
(``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``: weight = words or bytes). A corpus
metric is an aggregate of the items; we write each item as (numerator, denominator):

* mean metrics:        value = sum(num) / sum(den), with num = value, den = 1
* word/byte perplexity: value = exp(-sum(num) / sum(den)),     num = log-likelihood, den = words/bytes
* bits_per_byte:        value = -sum(num) / sum(den) / ln 2

The paired bootstrap resamples *items* (the same resample at both steps) and recomputes the
aggregate at each step; the 2.5 and 97.5 percentiles of the difference form the 95% CI.

Tests on top of it (formulas in docs/METRICS.md): bootstrap p-values (two-sided against no change,
one-sided against a non-inferiority margin), Holm / Benjamini-Hochberg adjustment across probes,
exact binomial tests (McNemar; a base score against chance), chance levels and chance-adjusted
flips of multiple-choice probes, and the number of items a test needs (power).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from forgetscope import io
from forgetscope.snapshots import RunLayout


def item_values(layout: RunLayout, step: int, task: str, metric: str) -> dict[str, tuple[float, float]]:
    """{item_id: (numerator, denominator)} for one task and metric at one step."""
    path = layout.eval_dir(step) / f"samples_{task}.jsonl"
    out = {}
    for sample in io.read_jsonl(path):
        value = sample[metric]
        out[str(sample["item_id"])] = (
            (float(value[0]), float(value[1])) if isinstance(value, list) else (float(value), 1.0)
        )
    return out


def aggregate(metric: str, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """The corpus value from per-item (num, den); works along the last axis (for bootstrap batches)."""
    ratio = num.sum(axis=-1) / den.sum(axis=-1)
    if metric in ("word_perplexity", "byte_perplexity"):
        return np.exp(-ratio)
    if metric == "bits_per_byte":
        return -ratio / math.log(2)
    return ratio


def paired_bootstrap(
    layout: RunLayout, task: str, metric: str, step: int, base_step: int = 0, iters: int = 2000, seed: int = 0
) -> tuple[float, np.ndarray, int]:
    """``value(step) - value(base_step)`` on the items both scored, its ``iters`` paired bootstrap
    replicates (the same resample of items at both steps), and the number of items."""
    base = item_values(layout, base_step, task, metric)
    later = item_values(layout, step, task, metric)
    items = sorted(set(base) & set(later))
    b = np.array([base[i] for i in items])
    s = np.array([later[i] for i in items])
    delta = float(aggregate(metric, s[:, 0], s[:, 1]) - aggregate(metric, b[:, 0], b[:, 1]))
    idx = np.random.default_rng(seed).integers(0, len(items), size=(iters, len(items)))
    boot = aggregate(metric, s[idx, 0], s[idx, 1]) - aggregate(metric, b[idx, 0], b[idx, 1])
    return delta, boot, len(items)


def paired_delta(
    layout: RunLayout,
    task: str,
    metric: str,
    step: int,
    base_step: int = 0,
    iters: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """``value(step) - value(base_step)`` on the items both scored, with a paired bootstrap CI
    (two-sided, at ``confidence``), the bootstrap standard error ``se`` and the two-sided
    bootstrap p-value ``p`` of "no change" (:func:`p_two_sided`)."""
    delta, boot, n = paired_bootstrap(layout, task, metric, step, base_step, iters, seed)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return {
        "delta": delta,
        "low": float(low),
        "high": float(high),
        "n": n,
        "se": float(boot.std(ddof=1)),
        "p": p_two_sided(boot),
    }


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
        rows.append(
            {
                "task": task,
                "role": line["role"].iloc[0],
                "metric": metric,
                "higher_is_better": higher,
                "base": float(line.loc[0, "value"]),
                "final": float(line.loc[last, "value"]),
                "step": last,
                **ci,
                "worse": worse,
            }
        )
    return sorted(rows, key=lambda r: r["role"] != "new")


def format_summary(rows: list[dict]) -> str:
    """The rows of :func:`final_vs_base` as a small aligned text table."""
    lines = [f"{'task':18s} {'role':8s} {'metric':15s} {'base':>9s} {'final':>9s} {'delta [95% CI]':>30s}"]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        flag = "  worse" if r["worse"] else ""
        ci = f"{r['delta']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(
            f"{r['task']:18s} {r['role']:8s} {r['metric'] + arrow:15s} {r['base']:9.4f} {r['final']:9.4f} {ci:>30s}{flag}"
        )
    return "\n".join(lines)


def binom_sf(k: int, n: int, p: float) -> float:
    """``P[X >= k]`` for ``X ~ Binomial(n, p)``, summed exactly (in log space, so large ``n`` is fine)."""
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(k, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def mcnemar(forgotten: int, learned: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs of a paired 0/1 metric: ``b`` items
    right at the base and wrong later, ``c`` wrong then right. Under no change each discordant
    item is equally likely to go either way, so ``p = min(1, 2 * P[X <= min(b, c)])`` with
    ``X ~ Binomial(b + c, 1/2)``; ``p = 1`` when there is no discordant item."""
    n, k = forgotten + learned, min(forgotten, learned)
    return min(1.0, 2 * binom_sf(n - k, n, 0.5))  # P[X <= k] = P[X >= n - k] at p = 1/2


def correctness(layout: RunLayout, step: int, task: str, metric: str) -> dict[str, bool] | None:
    """{item_id: right?} for a 0/1 metric (accuracy, exact match); None for a continuous one."""
    values = item_values(layout, step, task, metric)
    if any(den != 1.0 or num not in (0.0, 1.0) for num, den in values.values()):
        return None
    return {item: num == 1.0 for item, (num, _) in values.items()}


def flips(layout: RunLayout, task: str, metric: str, step: int, base_step: int = 0) -> dict | None:
    """Items that flipped between ``base_step`` and ``step`` for a 0/1 metric: ``forgotten``
    (right -> wrong) and ``learned`` (wrong -> right) item ids, McNemar's exact p-value, and the
    chance-adjusted counts ``forgotten_adj`` / ``learned_adj`` (:func:`chance_flips`)."""
    base, later = correctness(layout, base_step, task, metric), correctness(layout, step, task, metric)
    if base is None or later is None:
        return None
    items = sorted(set(base) & set(later))
    forgotten = [i for i in items if base[i] and not later[i]]
    learned = [i for i in items if not base[i] and later[i]]
    n = len(items)
    by_chance = (
        chance_flips(
            n,
            sum(base[i] for i in items) / n,
            sum(later[i] for i in items) / n,
            chance_level(layout, task, metric, base_step) or 0.0,
        )
        if n
        else 0.0
    )
    return {
        "forgotten": forgotten,
        "learned": learned,
        "n": n,
        "p_mcnemar": mcnemar(len(forgotten), len(learned)),
        "by_chance": by_chance,
        "forgotten_adj": max(0.0, len(forgotten) - by_chance),
        "learned_adj": max(0.0, len(learned) - by_chance),
    }


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


# ---------------------------------------------------------------- chance


def chance_level(layout: RunLayout, task: str, metric: str, step: int = 0) -> float | None:
    """The accuracy of guessing, for a 0/1 metric: the mean over items of ``1 / k_i``, ``k_i`` the
    item's number of choices (lm-eval keeps one request per choice in the item's ``arguments``); 0
    for items with a single answer (greedy match, exact match). None for a continuous metric."""
    path = layout.eval_dir(step) / f"samples_{task}.jsonl"
    samples = io.read_jsonl(path) if path.is_file() else []
    if not samples or any(not isinstance(s.get(metric), (int, float)) or s[metric] not in (0, 1) for s in samples):
        return None
    choices = [len(s.get("arguments") or []) for s in samples]
    return float(np.mean([1 / k if k >= 2 else 0.0 for k in choices]))


def above_chance_p(value: float, n: int, chance: float) -> float:
    """One-sided exact binomial p-value that a score ``value`` on ``n`` items is above ``chance``:
    ``P[X >= round(value * n)]``, ``X ~ Binomial(n, chance)``."""
    return binom_sf(round(value * n), n, chance)


def chance_flips(n: int, base_acc: float, final_acc: float, chance: float) -> float:
    """The number of right -> wrong (and of wrong -> right) flips that guessing alone produces
    (Harmon et al. 2025): an item is known or guessed uniformly among its ``k`` choices; the share
    guessed is ``g = (1 - acc) / (1 - c)`` (``c = 1/k``), a guess is right with probability ``c``,
    so ``n * g_0 * g_t * c * (1 - c) = n * (1 - acc_0) * (1 - acc_t) * c / (1 - c)``."""
    if chance <= 0 or chance >= 1:
        return 0.0
    return n * (1 - base_acc) * (1 - final_acc) * chance / (1 - chance)


# ---------------------------------------------------------------- tests across probes and power


def rounding(value: float) -> float:
    """How far from ``value`` a result may land by float rounding alone (a difference of two means
    of 0/1 scores lands on a limit's lattice point give or take 1e-16): 1e-9, relative above 1."""
    return 1e-9 * max(1.0, abs(value))


def _reaches(boot: np.ndarray, value: float) -> np.ndarray:
    """``boot >= value``, counting replicates within float :func:`rounding` of ``value`` as reaching it."""
    return boot >= value - rounding(value)


def p_two_sided(boot: np.ndarray, value: float = 0.0) -> float:
    """Two-sided percentile-bootstrap p-value of "the change is ``value``": twice the smaller tail
    of the replicates beyond ``value``, ``min(1, 2 * (1 + min(#{b <= v}, #{b >= v})) / (B + 1))``."""
    tail = min(int(np.count_nonzero(_reaches(-boot, -value))), int(np.count_nonzero(_reaches(boot, value))))
    return min(1.0, 2 * (1 + tail) / (len(boot) + 1))


def p_noninferior(boot_drop: np.ndarray, margin: float) -> float:
    """One-sided p-value of the non-inferiority test H0: drop >= margin against H1: drop < margin,
    by inverting the percentile bootstrap: ``(1 + #{b >= margin}) / (B + 1)`` over the replicates
    ``b`` of the drop. It is below ``alpha`` exactly when the ``1 - alpha`` upper bound of the drop
    is below the margin."""
    return (1 + int(np.count_nonzero(_reaches(boot_drop, margin)))) / (len(boot_drop) + 1)


def adjust(pvalues: list[float], method: str) -> list[float]:
    """Adjusted p-values of a family of tests (reject where adjusted p <= alpha), in input order.

    * ``holm`` (family-wise error): with ``p_(1) <= ... <= p_(m)``,
      ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    * ``bh`` (Benjamini-Hochberg, false discovery rate): ``p~_(i) = min_{j >= i} min(1, m p_(j) / j)``;
    * ``none``: unchanged.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = list(map(float, pvalues))
    if method == "holm":
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * pvalues[i]))
            out[i] = running
    elif method == "bh":
        running = 1.0
        for rank in reversed(range(m)):
            i = order[rank]
            running = min(running, m * pvalues[i] / (rank + 1))
            out[i] = min(1.0, running)
    return out


def adjusted_alpha(alpha: float, m: int, rejected: int, method: str) -> float:
    """The one-sided level at which to show every probe's bound so that each bound is within the
    margin exactly when the procedure rejects (passes) that probe: ``alpha / max(m - R, 1)``
    (Holm), ``alpha * max(R, 1) / m`` (Benjamini-Hochberg; the false-coverage-rate level of
    Benjamini & Yekutieli 2005), ``alpha`` (none), where ``R`` of the ``m`` tests reject."""
    if method == "holm":
        return alpha / max(m - rejected, 1)
    if method == "bh":
        return alpha * max(rejected, 1) / max(m, 1)
    return alpha


def detectable(se: float, alpha: float, power: float) -> float:
    """Minimum detectable effect of a one-sided level-``alpha`` test with standard error ``se``:
    ``(z_{1-alpha} + z_power) * se``. A non-inferiority test passes with probability ``power`` only
    when the true drop is at least this far below the margin."""
    normal = NormalDist()
    return (normal.inv_cdf(1 - alpha) + normal.inv_cdf(power)) * se


def items_to_decide(drop: float, se: float, n: int, margin: float, alpha: float, power: float) -> int | None:
    """Items a non-inferiority test needs to pass with probability ``power`` if the drop and the
    per-item variance stay as observed: the standard error shrinks as ``se * sqrt(n / n')``, so
    ``n' = n * ((z_{1-alpha} + z_power) * se / (margin - drop))^2``. None when the observed drop
    is not below the margin (more items would confirm the failure instead)."""
    if drop >= margin or n <= 0:
        return None
    return max(n, math.ceil(n * (detectable(se, alpha, power) / (margin - drop)) ** 2))


def format_p(p: float | None) -> str:
    """A p-value as the report and the gate print it: three decimals, "<0.001" below, "–" for none."""
    return "–" if p is None or math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
