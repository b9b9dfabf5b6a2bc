"""Forgetting metrics on the tidy curves table (pure pandas/numpy; formulas in docs/METRICS.md).

Notation: ``v_t`` is a task's primary metric at step ``t`` and ``v_0`` its value on the base.

* delta ``d_t = v_t - v_0``; relative delta ``d_t / |v_0|``.
* drop (sign-correct, positive = worse): ``v_0 - v_t`` when higher is better, ``v_t - v_0`` when
  lower is better (bits per byte, perplexity); relative drop ``drop_t / |v_0|``.
* gain (the new task, positive = better) ``= -drop_t``.
* general forgetting ``F_t = sum_p w_p * reldrop_{p,t} / sum_p w_p`` over the general probes
  ``p`` (weights ``w_p``, default 1): relative, so probes in different units can be averaged.
  Probes whose base score is not clearly above chance are left out (they cannot show a drop),
  and ``F_t`` exists only at steps where every remaining probe was scored.
* chance-adjusted drop of an accuracy ``(v_0 - v_t) / (v_0 - c)``, ``c`` the chance level: the
  share of the base's above-chance skill lost (``1 -`` the chance-adjusted accuracy
  ``(v_t - c) / (v_0 - c)``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from forgetscope import stats
from forgetscope.curves import primary_metric

CHANCE_ALPHA = 0.05  # a base score is "clearly above chance" when the one-sided binomial p is below this
KL_PROBE = "new_task_kl"  # KL(base || current) on new-task prompts (forgetscope.cascade), role "drift"


def primary_rows(table: pd.DataFrame, alpha: float = CHANCE_ALPHA) -> pd.DataFrame:
    """The rows of each (run, task)'s primary metric, with ``v0`` (its step-0 value), ``delta``,
    ``rel_delta``, ``drop`` and ``rel_drop`` per step; for accuracies with a ``chance`` column (from
    :func:`forgetscope.results.load_runs`) also ``adj_drop`` (the chance-adjusted drop),
    ``p_above_chance`` (:func:`forgetscope.stats.above_chance_p` of the base score) and
    ``at_chance`` (that p is not below ``alpha``)."""
    parts = []
    for _, group in table.groupby(["run", "task"], sort=False):
        metric = primary_metric(list(group["metric"].unique()))
        rows = group[group["metric"] == metric].sort_values("step").copy()
        base = rows[rows["step"] == 0]
        v0 = float(base["value"].iloc[0]) if len(base) else math.nan
        chance = float(rows["chance"].iloc[0]) if "chance" in rows else math.nan
        n0 = base["n"].iloc[0] if len(base) else math.nan
        higher = bool(rows["higher_is_better"].iloc[0])  # guessing is a floor of scores that rise only
        known = higher and not (math.isnan(v0) or math.isnan(chance) or pd.isna(n0))
        p = stats.above_chance_p(v0, int(n0), chance) if known else math.nan
        rows["v0"], rows["p_above_chance"], rows["at_chance"] = v0, p, known and p >= alpha
        parts.append(rows)
    out = pd.concat(parts, ignore_index=True) if parts else table.assign(v0=[], p_above_chance=[], at_chance=[])
    if "chance" not in out:
        out["chance"] = math.nan
    out["delta"] = out["value"] - out["v0"]
    out["rel_delta"] = out["delta"] / out["v0"].abs().replace(0, math.nan)
    sign = np.where(out["higher_is_better"].astype(bool), -1.0, 1.0)
    out["drop"] = sign * out["delta"]
    out["rel_drop"] = sign * out["rel_delta"]
    above = (out["v0"] - out["chance"]).where(lambda gap: gap > 0)
    out["adj_drop"] = out["drop"] / above
    return out


def general_forgetting(
    rows: pd.DataFrame, weights: dict[str, float] | None = None, keep_at_chance: bool = False
) -> pd.DataFrame:
    """Per run and step: ``F_t``, the weighted mean relative drop over the general probes.

    ``rows`` comes from :func:`primary_rows`; ``weights`` maps probe -> weight (missing: 1; a
    probe with weight 0 is left out). Probes at chance at the base are left out unless
    ``keep_at_chance``, and probes whose base is 0 (no relative drop). Steps where only some probes
    were scored (the cheap steps of a cascade) get no ``F_t``; a step where a probe's score is not a
    number gets NaN. Returns columns run, step, tokens, forgetting.
    """
    general = rows[rows["role"] == "general"].copy()
    general["w"] = general["task"].map(lambda t: (weights or {}).get(t, 1.0)).astype(float)
    general = general[(general["w"] > 0) & (keep_at_chance | ~general["at_chance"].astype(bool))]
    general["w"] /= general["w"].max() if len(general) else 1.0  # only ratios matter; huge weights would overflow
    counts = general.groupby(["run", "step"])["task"].transform("nunique")
    general = general[counts == general.groupby("run")["task"].transform("nunique")]
    general = general[general["v0"] != 0]  # no relative drop from a base of 0: such a probe cannot weigh in
    general["wx"] = general["w"] * general["rel_drop"]
    grouped = general.groupby(["run", "step"], sort=True)
    undefined = grouped["wx"].agg(lambda wx: wx.isna().any())  # a score that is not a number (NaN weights)
    out = (grouped["wx"].sum() / grouped["w"].sum()).mask(undefined).rename("forgetting").reset_index()
    return out.merge(grouped["tokens"].first().reset_index(), on=["run", "step"])


def left_out(rows: pd.DataFrame, keep_at_chance: bool = False) -> dict[str, list[str]]:
    """{run: the general probes :func:`general_forgetting` leaves out, each with why: ``"mc (at
    chance)"`` (its base not clearly above chance; kept with ``keep_at_chance``) or ``"gsm8k (base
    0)"`` (no relative drop from 0)}."""
    out: dict[str, list[str]] = {}
    for row in rows[rows["role"] == "general"].drop_duplicates(["run", "task"]).itertuples():
        why = "at chance" if row.at_chance and not keep_at_chance else "base 0" if row.v0 == 0 else None
        if why:
            out.setdefault(row.run, []).append(f"{row.task} ({why})")
    return {run: sorted(tasks) for run, tasks in out.items()}


def drift_vs_forgetting(
    table: pd.DataFrame, probe: str, weights: dict[str, float] | None = None, keep_at_chance: bool = False
) -> pd.DataFrame:
    """Per run and step where both exist: a label-free drift probe's value (e.g. ``new_task_kl``)
    and the general forgetting ``F_t``. Columns run, step, drift, forgetting."""
    rows = primary_rows(table)
    drift = rows[rows["task"] == probe][["run", "step", "value"]].rename(columns={"value": "drift"})
    return drift.merge(
        general_forgetting(rows, weights, keep_at_chance)[["run", "step", "forgetting"]], on=["run", "step"]
    )


def r_squared(x: np.ndarray, y: np.ndarray) -> float:
    """Coefficient of determination of the least-squares line ``y = a + b x``:
    ``R^2 = 1 - sum (y - a - b x)^2 / sum (y - mean y)^2`` (= Pearson's r squared). NaN with fewer
    than 3 points or no spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(1 - np.sum((y - intercept - slope * x) ** 2) / np.sum((y - y.mean()) ** 2))


def crossing(steps: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The first step at which the piecewise-linear curve through (steps, values) reaches
    ``target``: ``s* = s_a + (target - v_a) / (v_b - v_a) * (s_b - s_a)`` on the first segment
    with ``v_a < target <= v_b``; ``s_0`` when the curve starts at or above it; None if never."""
    if len(values) and values[0] >= target:
        return float(steps[0])
    for (s_a, v_a), (s_b, v_b) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        if v_a < target <= v_b:
            return float(s_a + (target - v_a) / (v_b - v_a) * (s_b - s_a))
    return None


def trapezoid_mean(steps: np.ndarray, values: np.ndarray) -> float:
    """``(1 / s_T) * integral of values over steps`` (trapezoid rule): the area under the curve
    divided by the run's length, i.e. the average forgetting over training."""
    if len(steps) < 2 or steps[-1] == steps[0]:
        return float(values[-1]) if len(values) else math.nan
    area = float(np.sum((steps[1:] - steps[:-1]) * (values[1:] + values[:-1]) / 2))
    return area / float(steps[-1] - steps[0])


def run_summary(
    table: pd.DataFrame,
    target: float | None = None,
    weights: dict[str, float] | None = None,
    keep_at_chance: bool = False,
    new_task: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per run (general forgetting as in :func:`general_forgetting`):

    * ``gain_final`` / ``gain_best``: the new task's ``v_T - v_0`` / ``max_t (v_t - v_0)``
      (sign-correct; the run's eval in ``new_task`` (a sequence's last stage), else the first new
      task when there are several);
    * ``forgetting_final``, ``forgetting_max`` (``max_t F_t``), ``forgetting_auc`` (trapezoid
      mean of ``F_t`` over the run);
    * with ``target`` (a new-task score): ``steps_to_target`` and ``tokens_to_target`` (linear
      interpolation between snapshots, :func:`crossing`) and ``forgetting_at_target``:
      ``F`` interpolated linearly at that step (forgetting at matched learning).
    """
    rows = primary_rows(table)
    forgetting = general_forgetting(rows, weights, keep_at_chance)
    out = []
    for run, group in rows.groupby("run", sort=False):
        new = group[group["role"] == "new"]
        new = new[new["task"] == (new_task or {}).get(run, new["task"].iloc[0])] if len(new) else new
        f = forgetting[forgetting["run"] == run]
        entry = {
            "run": run,
            "recipe": group["recipe"].iloc[0],
            "method": group["method"].iloc[0],
            "steps": int(group["step"].max()),
            "new_task": new["task"].iloc[0] if len(new) else None,
            "new_metric": new["metric"].iloc[0] if len(new) else None,
            "new_base": float(new["v0"].iloc[0]) if len(new) else math.nan,
            "new_final": float(new["value"].iloc[-1]) if len(new) else math.nan,
            "gain_final": float(-new["drop"].iloc[-1]) if len(new) else math.nan,
            "gain_best": float((-new["drop"]).max()) if len(new) else math.nan,
            "forgetting_final": float(f["forgetting"].iloc[-1]) if len(f) else math.nan,
            "forgetting_max": float(f["forgetting"].max()) if len(f) else math.nan,
            "forgetting_auc": trapezoid_mean(f["step"].to_numpy(float), f["forgetting"].to_numpy(float))
            if len(f)
            else math.nan,
        }
        if target is not None and len(new):
            higher = bool(new["higher_is_better"].iloc[0])
            sign = 1.0 if higher else -1.0  # cross "at least target" for scores, "at most" for losses
            at = crossing(new["step"].to_numpy(float), sign * new["value"].to_numpy(float), sign * target)
            entry["target"] = target
            entry["steps_to_target"] = at
            entry["tokens_to_target"] = float(np.interp(at, new["step"], new["tokens"])) if at is not None else None
            entry["forgetting_at_target"] = (
                float(np.interp(at, f["step"], f["forgetting"])) if at is not None and len(f) else None
            )
        out.append(entry)
    return pd.DataFrame(out)


def pareto_front(gain: np.ndarray, forgetting: np.ndarray) -> np.ndarray:
    """Mask of the runs no other run dominates: run j dominates i when ``gain_j >= gain_i`` and
    ``forgetting_j <= forgetting_i`` with at least one strict inequality. A run without a gain or a
    forgetting (an audit with no new task) cannot be placed, and is not on the frontier."""
    gain, forgetting = np.asarray(gain, float), np.asarray(forgetting, float)
    front = ~(np.isnan(gain) | np.isnan(forgetting))
    for i in np.flatnonzero(front):
        better_or_equal = (gain >= gain[i]) & (forgetting <= forgetting[i])
        strictly = (gain > gain[i]) | (forgetting < forgetting[i])
        front[i] = not np.any(better_or_equal & strictly)
    return front


def rank_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with ``pareto`` (on the learning-vs-forgetting frontier of final gain and final
    forgetting) and ``rank``: runs that reach the target first, by forgetting at the target
    (less is better; a run without general probes after those with); then the others by final forgetting; ties by final gain (more is better).
    Without a target, by final forgetting among the runs on the frontier, then the rest. With a
    ``status`` column, finished runs rank before the others (a run stopped early has forgotten
    less only because it trained less); with ``sequence_forgetting`` (a sequence's mean forgetting
    of its earlier tasks), that breaks ties of final forgetting (a sequence without general
    probes has none)."""
    out = summary.copy()
    out["pareto"] = pareto_front(out["gain_final"], out["forgetting_final"])
    finals = [out["forgetting_final"], out.get("sequence_forgetting", pd.Series(math.nan, index=out.index))]
    if "forgetting_at_target" in out:
        reached = out["steps_to_target"].notna()  # reached, with general probes or without
        key = [~reached, out["forgetting_at_target"].fillna(np.inf), *finals, -out["gain_final"]]
    else:
        key = [~out["pareto"], *finals, -out["gain_final"]]
    if "status" in out:
        key.insert(0, out["status"] != "finished")
    order = np.lexsort([np.asarray(k, float) for k in reversed(key)])
    out["rank"] = 0
    out.loc[out.index[order], "rank"] = np.arange(1, len(out) + 1)
    return out.sort_values("rank", ignore_index=True)
