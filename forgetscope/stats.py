"""Paired statistics over items: the same items are scored at every step, so deltas pair up.

A change is lm-eval's own corpus value at one step minus at the other (``results.json``). Its
uncertainty comes from the per-item values lm-eval logged (``samples_<task>.jsonl``): the paired
bootstrap resamples *items* (the same resample at both steps) and applies lm-eval's aggregation
of the metric to each resample at both steps; the 2.5 and 97.5 percentiles of the difference form
the 95% CI. The aggregation is the one lm-eval registers for the metric (``perplexity``: exp(-mean
log-likelihood); ``word_perplexity``, ``byte_perplexity``: exp(-sum(ll) / sum(words or bytes));
``bits_per_byte``: -sum(ll) / sum(bytes) / ln 2; ``mcc``, ``f1``, ``brier_score``, ``bleu``:
corpus functions of (gold, prediction) items), else a mean, and it is used only when it
reproduces lm-eval's value at both steps: a task with its own aggregation gets its delta and no
CI, with the reason. A group's items carry their subtask (``mmlu_anatomy/12``): each subtask is
aggregated on its own and the subtasks combined as lm-eval combined them (equally, or weighted
by size: as the run recorded, and it must reproduce lm-eval's group value), and the bootstrap
resamples within each subtask. Accuracies (means of 0/1 items) get score intervals and tests
instead of the bootstrap (:func:`score_z`).

Tests on top of it (formulas in docs/METRICS.md): bootstrap p-values (two-sided against no change,
one-sided against a non-inferiority margin), Holm / Benjamini-Hochberg adjustment across probes,
exact binomial tests (McNemar; a base score against chance), chance levels and chance-adjusted
flips of multiple-choice probes, and the number of items a test needs (power).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from forgetscope import io
from forgetscope.snapshots import RunLayout

PAIRED = ("weighted_perplexity", "bits_per_byte", "ratio")
"""Aggregations whose items are pairs: lm-eval's (log-likelihood, words or bytes), and
forgetscope's (numerator, denominator) of a ratio of sums."""

OWN_METRICS = {"kl": "ratio"}
"""forgetscope's own metrics and their aggregation: the KL probe's summed KL over summed tokens
(:func:`forgetscope.cascade.measure_kl`)."""


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _perplexity(x: np.ndarray) -> np.ndarray:
    return np.exp(-x.mean(axis=-1))


def _weighted_perplexity(x: np.ndarray) -> np.ndarray:
    return np.exp(-x[..., 0].sum(axis=-1) / x[..., 1].sum(axis=-1))


def _bits_per_byte(x: np.ndarray) -> np.ndarray:
    return -x[..., 0].sum(axis=-1) / x[..., 1].sum(axis=-1) / math.log(2)


def _ratio(x: np.ndarray) -> np.ndarray:
    return x[..., 0].sum(axis=-1) / x[..., 1].sum(axis=-1)


VECTORISED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": _mean,
    "perplexity": _perplexity,
    "weighted_perplexity": _weighted_perplexity,
    "bits_per_byte": _bits_per_byte,
    "ratio": _ratio,
}
"""lm-eval's numeric aggregations in numpy, over the items' axis (the last; the one before the
pair's for ``PAIRED``), so that every bootstrap replicate is computed at once (tested against
lm-eval's own functions)."""


@functools.cache  # asked once per item by results.load_items
def registered_aggregation(metric: str) -> tuple[str, Callable] | None:
    """(name, function) of the aggregation lm-eval registers for ``metric`` (its filter dropped:
    ``exact_match,strict-match`` is ``exact_match``), or None for a metric it does not know."""
    from lm_eval.api import metrics as _  # noqa: F401  (registers lm-eval's metrics and aggregations)
    from lm_eval.api.registry import AGGREGATION_REGISTRY, METRIC_AGGREGATION_REGISTRY

    fn = METRIC_AGGREGATION_REGISTRY.get(metric.partition(",")[0], None)
    if fn is None:
        return None
    return next((name for name, known in AGGREGATION_REGISTRY.items() if known is fn), fn.__name__), fn


def revived(value: Any) -> Any:
    """A per-item value as lm-eval computed it, from the JSON forgetscope stored: numpy scalars and
    arrays were written with ``str`` (``"2"``, ``"True"``, ``"[0.9 0.1]"``) and tuples as lists;
    numbers, booleans and arrays come back, other strings stay."""
    if isinstance(value, list):
        return tuple(revived(v) for v in value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("True", "False"):  # a numpy bool
        return text == "True"
    try:
        if text.startswith("[") and text.endswith("]"):
            return np.array(text[1:-1].split(), dtype=float)
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return value


def raw_items(layout: RunLayout, step: int, task: str, metric: str) -> dict[str, Any]:
    """{item_id: the item's value of ``metric`` as stored} for one task at one step."""
    path = layout.eval_dir(step) / f"samples_{task}.jsonl"
    return {str(s["item_id"]): s[metric] for s in io.read_jsonl(path) if metric in s}


def item_values(layout: RunLayout, step: int, task: str, metric: str) -> dict[str, tuple[float, float]]:
    """{item_id: (numerator, denominator)} for one task and metric at one step: ``(score, 1)`` for
    a per-item number (an accuracy, a log-likelihood), ``(log-likelihood, words or bytes)`` for
    the pairs of word/byte perplexity and bits per byte. Empty for a corpus-level metric, whose
    items are not scores (``mcc``: (gold, prediction))."""
    out = {}
    for item, value in raw_items(layout, step, task, metric).items():
        score = item_score(metric, value)
        if score is None:
            return {}
        out[item] = score
    return out


def item_score(metric: str, value: Any) -> tuple[float, float] | None:
    """An item's stored ``value`` of ``metric`` as (numerator, denominator): ``(score, 1)`` for a
    number (booleans and numbers stored as text included), the pair itself for the ``PAIRED``
    aggregations' (log-likelihood, words or bytes); None where items are not scores (``mcc``:
    (gold, prediction))."""
    value = revived(value)
    registered = registered_aggregation(metric)
    if registered is not None and registered[0] in PAIRED:
        pair = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
        return (float(value[0]), float(value[1])) if pair else None
    return (float(value), 1.0) if isinstance(value, (int, float)) else None


def item_change(metric: str, base: tuple[float, float], final: tuple[float, float], higher: bool) -> float:
    """One item's change between two of its :func:`item_score` values, positive = worse: for the
    perplexity-type aggregations, whose items are log-likelihoods (per word or byte for ``PAIRED``),
    the fall of the log-likelihood (in bits for ``bits_per_byte``); else the score's change, signed
    by ``higher`` (higher is better)."""
    registered = registered_aggregation(metric)
    kind = registered[0] if registered else "mean"
    fall = base[0] / base[1] - final[0] / final[1]
    if kind in PAIRED:
        return fall / (math.log(2) if kind == "bits_per_byte" else 1.0)
    if kind == "perplexity":
        return fall
    return fall if higher else -fall


def group_weighting(layout: RunLayout, task: str, metric: str) -> bool | None:
    """How ``task`` combines its subtasks when it is a group of lm-eval tasks scored as one eval
    (its ``subtasks`` recorded in ``results.json`` at step 0): True by size, False equally, None
    when not recorded (runs scored before forgetscope recorded it); not a group: None too."""
    entry = io.read_json(layout.eval_dir(0) / "results.json")["tasks"][task]
    by_size = entry.get("weight_by_size", {}).get(metric.partition(",")[0])
    return by_size if entry.get("subtasks") and isinstance(by_size, bool) else None


def is_group(layout: RunLayout, task: str) -> bool:
    """Whether ``task`` is a group of lm-eval tasks scored as one eval (its ``subtasks`` recorded
    in ``results.json`` at step 0)."""
    return bool(io.read_json(layout.eval_dir(0) / "results.json")["tasks"][task].get("subtasks"))


def lm_eval_value(layout: RunLayout, step: int, task: str, metric: str) -> float:
    """lm-eval's corpus value of ``metric`` for ``task`` at ``step`` (``results.json``)."""
    return float(io.read_json(layout.eval_dir(step) / "results.json")["tasks"][task]["metrics"][metric]["value"])


@dataclass
class Aggregation:
    """How lm-eval's corpus value is computed from the per-item values: ``fn`` over a subtask's
    items (vectorised over bootstrap replicates when ``vectorised``), the subtasks (lists of item
    positions; one for a task) combined with ``weights``."""

    name: str  # lm-eval's aggregation ("mean", "perplexity", "matthews_corrcoef", ...)
    fn: Callable
    vectorised: bool
    revive: bool  # the items are read back as numbers first (:func:`revived`)
    subtasks: list[np.ndarray]
    weights: np.ndarray  # one per subtask: 1 each (equal), or its number of items (by size)

    def prepare(self, values: list) -> Any:
        """The items in the form ``fn`` takes: a float array for a vectorised aggregation (of
        numbers, or of pairs for ``PAIRED``; a ValueError for anything else)."""
        values = [revived(v) for v in values] if self.revive else values
        if not self.vectorised:
            return values
        array = np.asarray(values, dtype=float)
        if array.ndim != (2 if self.name in PAIRED else 1):
            raise ValueError(f"{self.name} takes {'pairs' if self.name in PAIRED else 'numbers'}")
        return array

    def value(self, items: Any, draws: list[np.ndarray] | None = None) -> np.ndarray:
        """The corpus value on ``items`` (prepared), or one per bootstrap replicate: ``draws[s]``
        (replicates x items of subtask ``s``) holds the positions drawn within subtask ``s``."""
        parts = []
        for s, positions in enumerate(self.subtasks):
            rows = positions[None, :] if draws is None else positions[draws[s]]
            if self.vectorised:
                parts.append(self.fn(items[rows]))
            else:
                parts.append(np.array([self.fn([items[i] for i in row]) for row in rows], dtype=float))
        combined = np.tensordot(self.weights, np.array(parts), axes=1) / self.weights.sum()
        return combined if draws is not None else combined[0]


def _subtasks(items: list[str], group: bool, by_size: bool | None = None) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """The ways lm-eval may have combined these items, as (subtasks' item positions, weights): for
    a group's items (``subtask/id``, two subtasks or more) each subtask weighted by size, or
    equally (``by_size``: the group's recorded ``weight_by_size`` first; both can reproduce its
    value, when every subtask scores alike, yet they test differently); and one pool (a task,
    whose own ids may hold a "/" too)."""
    pool = [([np.arange(len(items))], np.ones(1))]
    names = [item.partition("/")[0] if "/" in item else None for item in items]
    if not group or None in names or len(set(names)) < 2:
        return pool
    groups = [np.array([i for i, name in enumerate(names) if name == sub]) for sub in dict.fromkeys(names)]
    sizes = np.array([len(g) for g in groups], dtype=float)
    weightings = [(groups, sizes), (groups, np.ones(len(groups)))]
    return [*(weightings[::-1] if by_size is False else weightings), *pool]


def _fits(ours: float, theirs: float) -> bool:
    """``ours`` recomputes lm-eval's ``theirs`` up to float rounding."""
    return math.isfinite(ours) and math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-12)


def find_aggregation(
    metric: str,
    items: list[str],
    steps_values: list[tuple[list, float]],
    group: bool = False,
    by_size: bool | None = None,
) -> Aggregation | None:
    """The :class:`Aggregation` that turns each step's per-item values into lm-eval's value of that
    step (``steps_values``: (values in ``items`` order, lm-eval's value); ``group``: the eval is a
    group, its items ``subtask/id``, weighted as ``by_size`` says when recorded); None when none
    does (a task's own aggregation function, items that are not numbers)."""
    registered = registered_aggregation(metric)
    if registered is None and metric in OWN_METRICS:
        registered = OWN_METRICS[metric], VECTORISED[OWN_METRICS[metric]]
    candidates = [registered] if registered else []
    if not registered or registered[0] != "mean":
        candidates.append(("mean", None))  # a task's own metric under lm-eval's usual aggregation
    for name, fn in candidates:
        vectorised = name in VECTORISED
        for revive in (False, True):
            for subtasks, weights in _subtasks(items, group, by_size):
                agg = Aggregation(name, VECTORISED.get(name, fn), vectorised, revive, subtasks, weights)
                try:
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore")
                        if all(_fits(float(agg.value(agg.prepare(v))), lm) for v, lm in steps_values):
                            return agg
                except Exception:  # lm-eval's function refusing these items (or these as numbers): not this one
                    continue
    return None


@dataclass
class Paired:
    """The change of one metric between two steps, paired over items."""

    delta: float  # lm-eval's value at the later step minus at the base step
    boot: np.ndarray | None  # paired bootstrap replicates of the delta; None when they cannot be drawn
    n: int  # items scored at both steps
    why: str = ""  # why there are no replicates
    flips: Flips | None = None
    """The right -> wrong and wrong -> right items when the metric is a mean of 0/1 items (an
    accuracy, or a group of them): its tests and intervals then come from the score statistic
    (:func:`score_z`), sound at any number of items, where the bootstrap is not (with no item
    changed, every replicate is 0 and a 5-item probe would "show" that it forgot nothing)."""


@dataclass(frozen=True)
class Flips:
    """An accuracy's paired change, per stratum: one for a task or a group weighted by size (one
    pool of items), one per subtask for a group whose subtasks weigh equally. Arrays, one entry
    per stratum."""

    lost: np.ndarray  # items right at the base step, wrong at the later one
    gained: np.ndarray  # wrong -> right
    n: np.ndarray  # items
    weights: np.ndarray  # the stratum's share of the metric (summing to 1)

    @property
    def changes(self) -> np.ndarray:
        return (self.gained - self.lost) / self.n


def paired_bootstrap(
    layout: RunLayout, task: str, metric: str, step: int, base_step: int = 0, iters: int = 2000, seed: int = 0
) -> Paired:
    """``value(step) - value(base_step)`` from lm-eval's values, and its ``iters`` paired bootstrap
    replicates (the same resample of items at both steps, within each subtask of a group) computed
    with lm-eval's aggregation (:func:`find_aggregation`) on the items both steps scored."""
    values = (lm_eval_value(layout, base_step, task, metric), lm_eval_value(layout, step, task, metric))
    delta = values[1] - values[0]
    if not all(map(math.isfinite, values)):
        return Paired(delta, None, 0, f"lm-eval's {metric} is {values[0]:g} -> {values[1]:g}")
    base, later = raw_items(layout, base_step, task, metric), raw_items(layout, step, task, metric)
    for at, stored_items in ((base_step, base), (step, later)):
        if not stored_items and io.read_json(layout.eval_dir(at) / "results.json")["tasks"][task].get("n"):
            raise io.damaged(layout.eval_dir(at) / f"samples_{task}.jsonl", f"holds no item's {metric}")
    items = sorted(set(base) & set(later))
    if not items:
        return Paired(delta, None, 0, "no item was scored at both steps")
    stored = ([base[i] for i in items], [later[i] for i in items])
    agg = find_aggregation(
        metric, items, list(zip(stored, values)), is_group(layout, task), group_weighting(layout, task, metric)
    )
    if agg is None:
        return Paired(
            delta, None, len(items), f"the items do not reproduce lm-eval's {metric} (the task's own aggregation?)"
        )
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(positions), size=(iters, len(positions))) for positions in agg.subtasks]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            boot = agg.value(agg.prepare(stored[1]), draws) - agg.value(agg.prepare(stored[0]), draws)
    except Exception as err:  # lm-eval's function refusing a resample (sklearn, sacrebleu): no CI, with the reason
        return Paired(delta, None, len(items), f"lm-eval's {agg.name} fails on resampled items ({err})")
    if not np.isfinite(boot).all():
        return Paired(delta, None, len(items), f"{metric} is not finite on some resamples of the items")
    return Paired(delta, boot, len(items), flips=_binary_flips(agg, stored))


def _binary_flips(agg: Aggregation, stored: tuple[list, list]) -> Flips | None:
    """The :class:`Flips` when ``agg`` is a mean and every item is 0 or 1 at both steps (one pool
    when the subtasks weigh by size, as lm-eval's pooled mean does; else a stratum per subtask);
    else None."""
    if agg.name != "mean":
        return None
    try:
        before, after = (np.asarray(agg.prepare(v), dtype=float) for v in stored)
    except (TypeError, ValueError):
        return None
    if before.ndim != 1 or not (np.isin(before, (0, 1)).all() and np.isin(after, (0, 1)).all()):
        return None
    sizes = np.array([len(p) for p in agg.subtasks], dtype=float)
    pooled = np.allclose(agg.weights / agg.weights.sum(), sizes / sizes.sum())
    strata = [np.concatenate(agg.subtasks)] if pooled else agg.subtasks
    weights = np.ones(1) if pooled else agg.weights / agg.weights.sum()
    lost = np.array([np.sum((before[p] == 1) & (after[p] == 0)) for p in strata], dtype=float)
    gained = np.array([np.sum((before[p] == 0) & (after[p] == 1)) for p in strata], dtype=float)
    return Flips(lost, gained, np.array([len(p) for p in strata], dtype=float), weights)


def _restricted_q(flips: Flips, d0: float | np.ndarray) -> np.ndarray:
    """Each stratum's maximum-likelihood share of right -> wrong items when its change is ``d0``:
    the root of ``2n q^2 + (d0 (2n - gained + lost) - gained - lost) q - lost d0 (1 - d0) = 0``."""
    lost, gained, n = flips.lost, flips.gained, flips.n
    b = d0 * (2 * n - gained + lost) - gained - lost
    return (np.sqrt(np.maximum(b * b + 8 * n * lost * d0 * (1 - d0), 0.0)) - b) / (4 * n)


def _tango_z(flips: Flips, d0: float | np.ndarray) -> np.ndarray:
    """Tango's (1998) score statistic of each stratum for H0 "its paired change is ``d0``" (one
    value, or one per stratum): ``(gained - lost - n d0) / sqrt(n (2 q + d0 (1 - d0)))``, ``q`` the
    maximum-likelihood share of right -> wrong items when the change is ``d0``
    (:func:`_restricted_q`). Decreasing in ``d0``; at ``d0 = 0`` McNemar's ``(gained - lost) /
    sqrt(gained + lost)``."""
    lost, gained, n = flips.lost, flips.gained, flips.n
    gap, variance = gained - lost - n * d0, n * (2 * _restricted_q(flips, d0) + d0 * (1 - d0))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = gap / np.sqrt(variance)
    flat = variance <= 1e-12 * n  # no item can move: only the observed change is possible
    return np.where(flat, np.where(np.abs(gap) <= 1e-9 * n, 0.0, np.copysign(np.inf, gap)), z)


def _tango_bounds(flips: Flips, z: float) -> np.ndarray:
    """Each stratum's change where its :func:`_tango_z` equals ``z`` (bisection in [-1, 1])."""
    low, high = np.full(len(flips.n), -1.0), np.full(len(flips.n), 1.0)
    for _ in range(60):
        middle = (low + high) / 2
        above = _tango_z(flips, middle) > z
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    return (low + high) / 2


def score_bound(flips: Flips, z: float) -> float:
    """The confidence bound of the accuracy's change at ``z``: with ``z = z_{1-a}`` the one-sided
    ``1 - a`` lower bound, with ``-z_{1-a}`` the upper. One stratum: Tango's score bound (the change
    where its statistic equals ``z``). A group whose subtasks weigh equally: Zou and Donner's
    (2008) MOVER combination of the subtasks' Tango bounds, ``D - sqrt(sum_s w_s^2 (D_s - l_s)^2)``
    (upper: ``D + sqrt(sum_s w_s^2 (u_s - D_s)^2)``), which lets every subtask change by its own
    amount (a score test of one common change was anti-conservative when they differ). Decreasing
    in ``z``, equal to the observed change at 0."""
    bounds = _tango_bounds(flips, z)
    if len(flips.n) == 1:
        return float(bounds[0])
    spread = math.sqrt(float(flips.weights**2 @ (bounds - flips.changes) ** 2))
    return float(flips.weights @ flips.changes) - math.copysign(spread, z)


def score_z(flips: Flips, d0: float) -> float:
    """The standard-normal statistic of H0 "the accuracy's change is ``d0``": the ``z`` at which
    :func:`score_bound` reaches ``d0`` (so that a test at level ``a`` rejects exactly when the bound
    at ``z_{1-a}`` excludes ``d0``). One stratum: Tango's statistic itself (:func:`_tango_z`); a
    group of equal weights: found by bisection. Decreasing in ``d0``."""
    if len(flips.n) == 1:
        return float(_tango_z(flips, d0)[0])
    reach = 40.0  # beyond: a p-value below 1e-300
    if d0 >= score_bound(flips, -reach):
        return -math.inf
    if d0 <= score_bound(flips, reach):
        return math.inf
    low, high = -reach, reach
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if score_bound(flips, middle) > d0 else (low, middle)
    return (low + high) / 2


def score_variance(flips: Flips, d0: float) -> float:
    """The variance of the weighted change when every stratum's change is ``d0`` (each
    ``(2 q + d0 (1 - d0)) / n``, ``q`` from :func:`_restricted_q`): for one stratum the variance under
    Tango's H0; for a group, the standard error the power advice uses (:func:`drop_se`)."""
    return float(flips.weights**2 @ ((2 * _restricted_q(flips, d0) + d0 * (1 - d0)) / flips.n))


def _change_at(sign: float, margin: float, scale: float) -> float:
    """The change of a proportion at which the drop (``sign * change / scale``) equals ``margin``,
    within the changes a proportion can make (-1 to 1)."""
    return min(max(sign * margin * scale, -1.0), 1.0)


def drop_p(paired: Paired, sign: float, scale: float, margin: float) -> float | None:
    """One-sided p-value of the non-inferiority test H0: drop >= ``margin`` (drop = ``sign *
    change / scale``; ``sign`` -1 for a higher-is-better metric, ``scale`` the base value for a
    relative limit, else 1): the score test for accuracies (:attr:`Paired.flips`), the bootstrap
    otherwise (:func:`p_noninferior`); None without either."""
    if paired.flips:
        return NormalDist().cdf(sign * score_z(paired.flips, _change_at(sign, margin, scale)))
    return None if paired.boot is None else p_noninferior(sign * paired.boot / scale, margin)


def drop_bound(paired: Paired, sign: float, scale: float, level: float) -> float | None:
    """The one-sided ``1 - level`` upper bound of the drop (see :func:`drop_p`): below ``margin``
    exactly when ``drop_p(margin) <= level``. For the bootstrap, the replicate ranked so that at most
    ``floor(level (B + 1)) - 1`` replicates lie above it (``inf`` when ``B`` is too small for ``level``)."""
    if paired.flips:
        return sign * score_bound(paired.flips, -sign * NormalDist().inv_cdf(1 - level)) / scale
    if paired.boot is None:
        return None
    drops = np.sort(sign * paired.boot / scale)
    above = math.floor(level * (len(drops) + 1) + 1e-9) - 1  # replicates allowed at or above the margin
    return float(drops[len(drops) - 1 - above]) if above >= 0 else math.inf


def drop_se(paired: Paired, sign: float, scale: float, margin: float) -> float | None:
    """The drop's standard error, for power: under H0 at ``margin`` for the score test (an
    accuracy whose items did not change still has one), else the bootstrap's."""
    if paired.flips:
        return math.sqrt(max(score_variance(paired.flips, _change_at(sign, margin, scale)), 0.0)) / scale
    return None if paired.boot is None else float((paired.boot / scale).std(ddof=1))


def paired_delta(
    layout: RunLayout,
    task: str,
    metric: str,
    step: int,
    base_step: int = 0,
    iters: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``value(step) - value(base_step)`` (lm-eval's values), with a paired CI (two-sided, at
    ``confidence``: ``low``, ``high``) and the two-sided p-value ``p`` of "no change": for an
    accuracy the score interval and its test at 0 (Tango's; McNemar's score test; :func:`score_z`),
    for other metrics the paired bootstrap's percentile interval and :func:`p_two_sided`; the
    standard error ``se`` (for an accuracy, per stratum ``((lost + gained) / n - change^2) / n``,
    weighted like the variance; else the bootstrap's);
    the number of items ``n``. Without replicates (:func:`paired_bootstrap`)
    those are None and ``why`` says why."""
    paired = paired_bootstrap(layout, task, metric, step, base_step, iters, seed)
    if paired.boot is None:
        return {
            "delta": paired.delta,
            "low": None,
            "high": None,
            "n": paired.n,
            "se": None,
            "p": None,
            "why": paired.why,
        }
    if paired.flips:  # an accuracy: the score interval and the score test
        flips = paired.flips
        z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
        low, high = (score_bound(flips, side * z) for side in (1, -1))
        p = min(1.0, 2 * NormalDist().cdf(-abs(score_z(flips, 0.0))))
        per_stratum = np.maximum((flips.lost + flips.gained) / flips.n - flips.changes**2, 0.0) / flips.n
        se = math.sqrt(float(flips.weights**2 @ per_stratum))
    else:
        tail = (1 - confidence) / 2 * 100
        low, high = np.percentile(paired.boot, [tail, 100 - tail])
        p, se = p_two_sided(paired.boot), float(paired.boot.std(ddof=1))
    return {
        "delta": paired.delta,
        "low": float(low),
        "high": float(high),
        "n": paired.n,
        "se": se,
        "p": p,
        "why": "",
    }


def as_drop(ci: dict, higher_is_better: bool) -> tuple[float, float, float]:
    """A paired delta and its CI (from :func:`paired_delta`) -> the drop (positive = worse, for
    every metric) and its CI (NaN where there is no CI)."""
    low, high = (math.nan if ci[k] is None else ci[k] for k in ("low", "high"))
    if higher_is_better:
        return -ci["delta"], -high, -low
    return ci["delta"], low, high


ALPHA = 0.05
"""Level of the "worse / better beyond noise" verdicts (run summary and report), after adjustment."""


def final_vs_base(layout: RunLayout, table) -> list[dict]:
    """For every task's primary metric: base value, last-step value, paired delta, 95% CI and
    p-value, ``p_adj`` (Holm across the general probes with a CI, the report's default; the new
    task's own p) and ``worse`` = ``p_adj <= ALPHA`` on the side of getting worse (sign-correct per
    metric; never without a CI), so the run's summary and its report give the same verdicts."""
    from forgetscope.curves import primary_metric

    last = int(table["step"].max())
    rows = []
    for task, group in table.groupby("task", sort=False):
        metric = primary_metric(list(group["metric"].unique()))
        line = group[group["metric"] == metric].set_index("step")
        rows.append(
            {
                "task": task,
                "role": line["role"].iloc[0],
                "metric": metric,
                "higher_is_better": bool(line["higher_is_better"].iloc[0]),
                "base": float(line.loc[0, "value"]),
                "final": float(line.loc[last, "value"]),
                "step": last,
                **paired_delta(layout, task, metric, last),
            }
        )
    family = [r for r in rows if r["role"] == "general" and r["low"] is not None]
    for r, p_adj in zip(family, adjust([r["p"] for r in family], "holm")):
        r["p_adj"] = p_adj
    for r in rows:
        r.setdefault("p_adj", r.get("p"))
        r["worse"] = r["low"] is not None and r["p_adj"] <= ALPHA and as_drop(r, r["higher_is_better"])[0] > 0
    return sorted(rows, key=lambda r: r["role"] != "new")


def format_signed(x: float) -> str:
    """``x`` to 4 decimals with its sign, "+0.0000" for zero (never "-0.0000"); 4 significant digits
    when large (a perplexity that exploded). As the run summary, the report and the gate print changes."""
    return f"{round(x, 4) + 0.0:+.4f}" if abs(x) < 1e5 else f"{x:+.4g}"


def format_summary(rows: list[dict]) -> str:
    """The rows of :func:`final_vs_base` as a small aligned text table, with what "worse" means
    (columns as wide as their longest cell: ``exact_match,strict-match``)."""
    table = [["task", "role", "metric", "base", "final", "delta [95% CI]", "p (Holm)", ""]]
    for r in rows:
        if r["low"] is None:
            ci = f"{format_signed(r['delta'])} (no CI: {r['why']})"
        else:
            ci = f"{format_signed(r['delta'])} [{format_signed(r['low'])}, {format_signed(r['high'])}]"
        base, final = (format_signed(r[k]).lstrip("+") for k in ("base", "final"))
        p = format_p(r["p_adj"]) if r["role"] == "general" else ""
        metric = r["metric"] + ("↑" if r["higher_is_better"] else "↓")
        table.append([r["task"], r["role"], metric, base, final, ci, p, "worse" if r["worse"] else ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {3, 4, 5, 6}  # numbers
    lines = [
        " ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in table
    ]
    if any(r["role"] == "general" and r["low"] is not None for r in rows):
        lines.append(
            f"worse: beyond noise, p <= {ALPHA:g} (general probes: adjusted across them by Holm, as the report does)"
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
    if not values or any(den != 1.0 or num not in (0.0, 1.0) for num, den in values.values()):
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


CORRECTIONS = ("holm", "bh", "none")
"""The adjustments :func:`adjust` knows."""


def adjust(pvalues: list[float | None], method: str) -> list[float]:
    """Adjusted p-values of a family of tests (reject where adjusted p <= alpha), in input order.

    * ``holm`` (family-wise error): with ``p_(1) <= ... <= p_(m)``,
      ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    * ``bh`` (Benjamini-Hochberg, false discovery rate): ``p~_(i) = min_{j >= i} min(1, m p_(j) / j)``;
    * ``none``: unchanged.

    A missing p-value (None or NaN: a change without a CI) counts as 1, no evidence.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}: one of {', '.join(CORRECTIONS)}")
    pvalues = [1.0 if p is None or math.isnan(p) else float(p) for p in pvalues]
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
