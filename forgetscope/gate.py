"""The release gate: a policy of allowed drops, checked against a finished run.

Policy (YAML; example in examples/release_policy.yaml)::

    confidence: 0.95          # one-sided confidence of each probe's non-inferiority test
    decide_on: upper          # upper | estimate: the test decides, or the point estimate (see below)
    correction: holm          # holm | bh | none: adjustment across the general probes tested
    power: 0.8                # for the advice on inconclusive probes: items needed at this power
    at_chance: exclude        # exclude | keep probes whose base is not above chance in max_general_forgetting
    new:                      # scores of the new task(s) at the checked step
      numerals: {min: 0.9}                   # higher-is-better metrics: a minimum
      prose_lines: {max: 5.0}                # lower-is-better (bits_per_byte): a maximum
    general:                  # allowed drops of the general probes ("default" covers the rest)
      prose_ppl: {max_drop: 0.05}            # absolute, in the metric's units
      world_capitals: {max_relative_drop: 0.05}
      gsm8k: {max_drop: 0.02, metric: "exact_match,flexible-extract"}   # a metric other than the primary one
      default: {max_relative_drop: 0.10}
    max_general_forgetting: 0.05   # optional: the mean relative drop over the probes

Each general probe is a **non-inferiority test** (docs/METRICS.md): H0 "the drop is at least the
limit" against H1 "the drop is below it", one-sided at ``confidence``, paired over items: the score
test for accuracies (Tango's; for a group whose subtasks weigh equally, the subtasks' score bounds
combined), the paired bootstrap for other metrics (p-value: the share of bootstrap drops at or
above the limit). The p-values of the probes
are adjusted for testing several (Holm by default: the PASS marks hold jointly with probability
``confidence``; ``bh``: the share of wrong PASS marks is controlled instead), and a probe passes when
its adjusted p-value is at most ``1 - confidence``. The table shows each drop's one-sided upper
bound at the matching adjusted level, so a bound within the limit means a pass. A probe whose
estimate is within the limit but whose test does not pass is *inconclusive*: the gate says how
many items would decide it at ``power`` if the drop and its variance stay as observed, and fails.
(The verdict needs every probe to pass, an intersection-union test that holds its level even
without adjustment; the adjustment is what makes each probe's PASS defensible on its own.)
``decide_on: estimate`` compares the point estimate instead (lenient; for exploratory gates).
A probe whose change has no test (a task's own aggregation that the items do not reproduce;
:func:`forgetscope.stats.paired_bootstrap` says why) has no bound: it is inconclusive under
``decide_on: upper`` and left out of the adjustment, and decided on its estimate under
``decide_on: estimate``. Each eval is checked on its primary metric
(:func:`forgetscope.curves.primary_metric`) unless its entry names one (``metric:``), and so is it
in ``max_general_forgetting``.
New-task limits compare the point estimate: ``min`` for a higher-is-better metric, ``max`` for a
lower-is-better one (the other way round is refused: a model that learned would fail it). Drops
are sign-correct (positive = worse); a relative limit divides the drop and its replicates by
``abs(v_0)``. Every comparison with a limit
counts a value within float rounding of it (1e-9, relative) as at the limit, which is within it:
0.8 -> 0.75 is a drop of 0.05 under ``max_drop: 0.05``, so the test decides it (a drop at the limit
cannot be shown below it: inconclusive), and ``decide_on: estimate`` passes it. A probe whose base score is
not clearly above chance (one-sided binomial test at ``confidence``) is flagged: it cannot show
forgetting, and ``max_general_forgetting`` leaves it out unless ``at_chance: keep`` (and always a
probe whose base is 0: no relative drop), saying which in its note.

Exit codes of ``forgetscope gate``: 0 pass, 1 fail, 2 unusable input (bad policy, not a run,
a probe the policy names but the run lacks or scores in the other role, a policy that checks
nothing in the run).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml

from forgetscope import io, metrics, results, schema, stats
from forgetscope.errors import UserError
from forgetscope.schema import option
from forgetscope.snapshots import RunLayout


class GateError(UserError):
    """The policy or the run cannot be checked."""


@dataclass
class Limit:
    """The limit of one probe (give one of max_drop / max_relative_drop) or new task (min, or max for
    a lower-is-better metric), optionally on a metric named by ``metric``."""

    max_drop: float | None = option(None, "the largest drop allowed, in the metric's units; positive = worse")
    max_relative_drop: float | None = option(None, "the largest drop allowed, relative to the base value, e.g. 0.05")
    min: float | None = option(None, "the smallest score allowed, of a new task whose metric is higher-is-better")
    max: float | None = option(
        None, "the largest value allowed, of a new task whose metric is lower-is-better (bits_per_byte)"
    )
    metric: str | None = option(
        None,
        "the metric to check, as the run names it (default: the task's primary one), e.g. exact_match,flexible-extract",
    )


@dataclass
class Policy:
    """A release policy (see the module documentation)."""

    confidence: float = option(
        0.95, "one-sided confidence of each probe's non-inferiority test (and of the above-chance test)"
    )
    decide_on: Literal["upper", "estimate"] = option(
        "upper", "upper: the (adjusted) non-inferiority test decides; estimate: the point estimate"
    )
    correction: Literal["holm", "bh", "none"] = option(
        "holm", "adjustment across the general probes: holm (family-wise), bh (false discovery rate), none"
    )
    power: float = option(0.8, "power at which the gate says how many items would decide an inconclusive probe")
    at_chance: Literal["exclude", "keep"] = option(
        "exclude", "probes at chance at the base: left out of max_general_forgetting, or kept"
    )
    new: dict[str, Any] = option(
        {}, "new task -> {min: score} (or {max: value} when lower is better), metric: optional"
    )
    general: dict[str, Any] = option(
        {}, "general probe (or 'default') -> {max_drop | max_relative_drop}, metric: optional"
    )
    max_general_forgetting: float | None = option(None, "largest allowed mean relative drop over the general probes")
    limits: dict = field(default_factory=dict, metadata={"internal": True})  # (role, name) -> Limit


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; every problem is reported at once, one per line (and only
    the problem itself: a limit that cannot be read is not also reported as missing)."""
    path = Path(path)
    if path.is_dir():
        raise GateError(
            f"{path}: is a folder, not a policy file; give a policy YAML, e.g. examples/release_policy.yaml"
        )
    if not path.is_file():
        raise GateError(f"{path}: no such policy file; see examples/release_policy.yaml")
    try:
        data = schema.load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise GateError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise GateError(f"{path}: {schema.yaml_problem(err)}") from None
    problems: list[str] = []
    policy = schema.build(Policy, data, "", problems)
    if not 0.5 <= policy.confidence < 1:
        problems.append(f"confidence: {policy.confidence} must be in [0.5, 1), e.g. 0.95")
    if not 0.5 <= policy.power < 1:
        problems.append(f"power: {policy.power} must be in [0.5, 1), e.g. 0.8")
    if policy.max_general_forgetting is not None and policy.max_general_forgetting < 0:  # it would always fail
        problems.append(
            f"max_general_forgetting: {policy.max_general_forgetting:g} must be a number, 0 or more "
            "(the largest mean relative drop allowed)"
        )
    for role in ("new", "general"):
        for name, entry in getattr(policy, role).items():
            limit = _limit(f"{role}.{name}", entry, problems)
            if limit is not None:
                policy.limits[(role, str(name))] = limit
    if isinstance(data, dict) and all(data.get(k) in (None, {}) for k in ("new", "general", "max_general_forgetting")):
        problems.append("the policy sets no limit; add new:, general: or max_general_forgetting:")
    if problems:
        raise GateError("\n".join(f"{path}: {p}" for p in problems))
    return policy


_LIMIT_KEYS = {"new": ["min", "max"], "general": ["max_drop", "max_relative_drop"]}


def _limit(where: str, entry: Any, problems: list[str]) -> Limit | None:
    """The :class:`Limit` of the policy entry at ``where`` (``new.numerals``, ``general.prose_ppl``), or
    None after appending its problems. A limit is a finite number, 0 or more: a negative minimum always
    passes and a negative allowed drop demands a gain, so either is a typo. A relative drop above 1 is
    allowed: a loss (bits per byte) can more than double."""
    role = where.split(".")[0]
    keys = _LIMIT_KEYS[role]
    if not isinstance(entry, dict):
        example = "{min: 0.9}" if role == "new" else "{max_drop: 0.05}"
        problems.append(f"{where}: expected a mapping like {example}, got {entry!r}")
        return None
    meaning = {f.name: f.metadata["help"] for f in fields(Limit)}
    before = len(problems)
    for key, value in entry.items():
        if key == "metric":
            if where == "general.default":
                problems.append(f"{where}.metric: name the metric under each probe, not under default")
            elif not isinstance(value, str) or not value:
                problems.append(f"{where}.metric: {value!r} must be a metric name ({meaning[key]})")
        elif key not in keys:
            hint = schema.did_you_mean(str(key), [*keys, "metric"])
            problems.append(f"{where}.{key}: unknown key{hint} (allowed under {role}: {', '.join(keys)}, metric)")
        elif _number(value) is None or _number(value) < 0:
            problems.append(f"{where}.{key}: {value!r} must be a number, 0 or more ({meaning[key]})")
    if len(problems) > before:
        return None
    given = [key for key in entry if key != "metric"]
    if len(given) != 1:
        problems.append(f"{where}: give exactly one of {' / '.join(keys)}, got {given or 'none'}")
        return None
    # lm-eval's own key of a metric without a filter ("acc,none") is forgetscope's "acc"
    return Limit(
        **{key: value.removesuffix(",none") if key == "metric" else _number(value) for key, value in entry.items()}
    )


def _number(value: Any) -> float | None:
    """``value`` as a finite number, or None (YAML 1.1 reads ``1e-4`` as a string, so numeric strings count)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _compare(x: float, limit: float) -> int:
    """-1, 0 or 1 as ``x`` lies below, at or above ``limit``, where values within float rounding of the
    limit are at it (0.8 - 0.75 is 0.050000000000000044: at a limit of 0.05, not above it). The tolerance
    is that of the bootstrap p-values, which count such replicates as at the limit
    (:func:`forgetscope.stats.p_noninferior`)."""
    if abs(x - limit) <= stats.rounding(limit):
        return 0
    return 1 if x > limit else -1


def check(run: str | Path, policy: Policy, step: int | None = None) -> dict:
    """Check ``run`` at ``step`` (default: its last evaluated step) -> a verdict dict
    ``{"run", "step", "verdict": "pass"|"fail", "checks": [...]}`` (see :func:`render_markdown`)."""
    root = Path(run)
    if not (root / "manifest.json").is_file():
        what = "not a forgetscope run (no manifest.json)" if root.exists() else "no such folder"
        raise GateError(f"{root}: {what}; pass a folder made by `forgetscope run` or `audit`")
    layout = RunLayout(root)
    status = layout.read_manifest().get("status")
    if status != "finished":
        raise GateError(
            f"{root}: the run is {status or 'of unknown status'}, not finished; gate a finished run "
            "(a running one still changes; finish a stopped one by running its command again)"
        )
    table = results.load_results([root])
    if table.empty:
        raise GateError(f"{root}: the run has no finished evaluation yet")
    step = int(table["step"].max()) if step is None else step
    if step == 0:
        raise GateError(
            f"{root}: step 0 is the base itself; gate a later step (--step), or leave --step out for the last"
        )
    if step not in set(table["step"]):
        raise GateError(f"{root}: no evaluation at step {step}; evaluated steps: {sorted(set(table['step']))}")
    alpha = 1 - policy.confidence
    chosen = {name: (f"{role}.{name}", limit.metric) for (role, name), limit in policy.limits.items() if limit.metric}
    rows = metrics.primary_rows(_with_metrics(table[table["step"].isin([0, step])], chosen), alpha=alpha)
    at = rows[rows["step"] == step].set_index("task")
    evals = {role: sorted(at.index[at["role"] == role]) for role in ("new", "general")}
    has = (
        f"it has new evals: {', '.join(evals['new']) or 'none'}; general evals: {', '.join(evals['general']) or 'none'}"
    )
    for role, name in policy.limits:
        if (role, name) == ("general", "default") or name in evals[role]:
            continue
        if name in at.index:
            other = at.loc[name, "role"]
            raise GateError(
                f"policy {role}.{name}: {name!r} is a {other} eval of this run, not a {role} one; "
                f"list it under {other}: with {' or '.join(_LIMIT_KEYS[other])}"
            )
        if name in set(table["task"]):
            full = sorted(set(table[table["task"] == name]["step"]))
            raise GateError(
                f"policy {role}.{name}: step {step} was scored on the cheap probes only (a cascade step); "
                f"pass --step with a full-battery step: {full}"
            )
        raise GateError(f"policy {role}.{name}: the run has no eval {name!r}; {has}")
    if policy.max_general_forgetting is not None and not evals["general"]:
        raise GateError(f"policy max_general_forgetting: the run has no general eval to average at step {step}; {has}")
    limits = {
        task: policy.limits.get((role, task))
        or (policy.limits.get(("general", "default")) if role == "general" else None)
        for task, role in at["role"].items()
    }
    tested = sum(1 for task, limit in limits.items() if limit and at.loc[task, "role"] == "general")
    # bootstrap replicates: enough for the smallest adjusted level (alpha / m) to be reachable, 20 times over
    iters = max(2000, math.ceil(20 * (tested if policy.correction != "none" else 1) / alpha))
    checks, probes = [], []
    for task, row in at.sort_values("role", key=lambda r: r != "new", kind="stable").iterrows():
        if limits[task] is None:
            continue
        if row["role"] == "new":
            checks.append(_new_check(task, row, limits[task]))
            continue
        checks.append(_probe_check(layout, task, row, limits[task], step, iters))
        probes.append(checks[-1])
    tests = _decide(probes, policy)
    if policy.max_general_forgetting is not None:  # on each probe's metric: the policy's, else the primary one
        forgetting = metrics.general_forgetting(rows, keep_at_chance=policy.at_chance == "keep")
        value = forgetting[forgetting["step"] == step]["forgetting"]
        mean = float(value.iloc[0]) if len(value) else math.nan
        ok = not math.isnan(mean) and _compare(mean, policy.max_general_forgetting) <= 0
        if ok:
            note = ""
        elif not len(value):
            note = "no general probe is above chance at the base: nothing can show forgetting"
        elif math.isnan(mean):
            note = "a probe's score is not a number: the model's outputs are undefined"
        else:
            note = "mean relative drop exceeds the limit"
        left = metrics.left_out(rows, policy.at_chance == "keep").get(str(at["run"].iloc[0]), [])
        note = "; ".join(filter(None, [note, f"leaves out {', '.join(left)}" if left else ""]))
        checks.append(
            {
                "name": "general forgetting",
                "role": "general",
                "metric": "mean relative drop",
                "value": mean if len(value) else None,
                "limit": f"<= {policy.max_general_forgetting:g}",
                "passed": bool(ok),
                "note": note,
            }
        )
    if not checks:  # e.g. only `general: {default: ...}` on a run without general evals: a pass would mean nothing
        raise GateError(
            f"{root}: the policy checks nothing in this run at step {step} ({has}); "
            "name those evals under new: or general: in the policy"
        )
    return {
        "run": root.name,
        "path": str(root),
        "step": step,
        "confidence": policy.confidence,
        "decide_on": policy.decide_on,
        "correction": policy.correction,
        "probes_tested": len(tests),
        "verdict": "pass" if all(c["passed"] for c in checks) else "fail",
        "checks": checks,
    }


def _with_metrics(table: pd.DataFrame, chosen: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """``table`` keeping, for each eval in ``chosen`` (eval -> (policy key, metric)), only the rows of
    that metric, so that it stands for the eval; a metric the eval lacks is a :class:`GateError`.
    (An eval the run lacks is reported by the caller.)"""
    keep = pd.Series(True, index=table.index)
    for name, (where, metric) in chosen.items():
        rows = table["task"] == name
        have = list(table[rows]["metric"].unique())
        if have and metric not in have:
            hint = schema.did_you_mean(metric, have)
            raise GateError(f"policy {where}.metric: {name} has no metric {metric!r} (it has {', '.join(have)}){hint}")
        keep &= ~rows | (table["metric"] == metric)
    return table[keep]


def _new_check(task: str, row, limit: Limit) -> dict:
    """A new task's score against its ``min`` (higher-is-better metrics) or ``max`` (lower-is-better:
    bits per byte, perplexity); the other way round is a :class:`GateError`, since a model that
    learned would fail it."""
    metric, higher = row["metric"], bool(row["higher_is_better"])
    if limit.min is not None and not higher:
        raise GateError(
            f"policy new.{task}.min: {metric} is lower-is-better, so a minimum would fail a model that learned; "
            f"give the largest value allowed with max: {limit.min:g}"
        )
    if limit.max is not None and higher:
        raise GateError(
            f"policy new.{task}.max: {metric} is higher-is-better, so a maximum would fail a model that learned; "
            f"give the smallest score allowed with min: {limit.max:g}"
        )
    if limit.min is not None and pd.notna(row.get("chance")) and limit.min > 1:  # a 0/1 metric: above 1 is a typo
        raise GateError(
            f"policy new.{task}.min: {limit.min:g} is above the highest {metric} (1); "
            "scores are fractions, e.g. 0.9 for 90%"
        )
    if limit.min is not None:
        ok, shown, note = _compare(row["value"], limit.min) >= 0, f">= {limit.min:g}", "below the minimum score"
    else:
        ok, shown, note = _compare(row["value"], limit.max) <= 0, f"<= {limit.max:g}", "above the maximum"
    if math.isnan(row["value"]):
        ok, note = False, "the score is not a number: the model's outputs are undefined"
    return {
        "name": task,
        "role": "new",
        "metric": metric,
        "value": float(row["value"]),
        "limit": shown,
        "passed": bool(ok),
        "note": "" if ok else note,
    }


def _probe_check(layout: RunLayout, task: str, row, limit: Limit, step: int, iters: int) -> dict:
    """One general probe's drop (relative when its limit is) and raw non-inferiority p-value
    (:func:`forgetscope.stats.drop_p`: the score test for accuracies, ``iters`` bootstrap replicates
    otherwise); the decision comes later, across probes (:func:`_decide`). A probe whose change
    has no test (``why``) has no p-value and is left out of the adjustment."""
    relative = limit.max_relative_drop is not None
    if relative and row["v0"] == 0:
        raise GateError(
            f"policy general.{task}.max_relative_drop: {task}'s base {row['metric']} is 0, so a relative drop "
            f"is undefined; give an absolute limit with max_drop"
        )
    paired = stats.paired_bootstrap(layout, task, row["metric"], step, iters=iters)
    sign = -1.0 if row["higher_is_better"] else 1.0
    scale = abs(row["v0"]) if relative else 1.0
    allowed = limit.max_relative_drop if relative else limit.max_drop
    chance = None if pd.isna(row["chance"]) else float(row["chance"])
    return {
        "name": task,
        "role": "general",
        "metric": row["metric"],
        "base": float(row["v0"]),
        "value": float(row["value"]),
        "drop": sign * paired.delta / scale,
        "se": stats.drop_se(paired, sign, scale, allowed),
        "n": paired.n,
        "subtasks": len(io.read_json(layout.eval_dir(step) / "results.json")["tasks"][task].get("subtasks") or []),
        "relative": relative,
        "allowed": allowed,
        "p": stats.drop_p(paired, sign, scale, allowed),
        "test": "score" if paired.flips else ("bootstrap" if paired.boot is not None else None),
        "why": paired.why,
        "chance": chance,
        "at_chance": bool(row["at_chance"]),
        "limit": f"<= {allowed:g}{' relative' if relative else ''}",
        "_bound": functools.partial(stats.drop_bound, paired, sign, scale),
    }


def _decide(checks: list[dict], policy: Policy) -> list[dict]:
    """Adjust the probes' p-values across the family (the probes with a test), decide each,
    show the bound at the matching level, and say how many items would decide an inconclusive
    probe. A probe without a test is decided on its estimate with ``decide_on: estimate``,
    else it is inconclusive. Returns the probes tested."""
    alpha = 1 - policy.confidence
    tests = [c for c in checks if c["p"] is not None]
    m = len(tests)
    for test, p_adj in zip(tests, stats.adjust([t["p"] for t in tests], policy.correction)):
        test["p_adj"] = p_adj
    rejected = sum(t["p_adj"] <= alpha for t in tests)
    level = stats.adjusted_alpha(alpha, m, rejected, policy.correction)
    family_alpha = alpha / m if policy.correction != "none" and m else alpha  # enough for any rank, Holm or BH
    for t in checks:
        bound_at = t.pop("_bound")
        t.setdefault("p_adj", None)
        t["bound"] = None if t["p"] is None else bound_at(level)
        t["bound_level"] = None if t["p"] is None else 1 - level
        side = _compare(t["drop"], t["allowed"])
        tested = t["p_adj"] is not None and t["p_adj"] <= alpha
        ok = side <= 0 if policy.decide_on == "estimate" else tested
        notes = []
        if math.isnan(t["drop"]):
            ok = False
            notes.append(f"the score is not a number ({t['why']}): the model's outputs are undefined")
        elif not ok and side > 0:
            notes.append("drop exceeds the limit")
        elif not ok and t["p"] is None:
            notes.append(f"inconclusive: no confidence bound ({t['why']}); `decide_on: estimate` decides on the drop")
        elif not ok and side == 0:
            notes.append("inconclusive: the drop is at the limit, so no number of items would show it below")
        elif not ok:
            t["items_needed"] = stats.items_to_decide(
                t["drop"], t["se"], t["n"], t["allowed"], family_alpha, policy.power
            )
            t["mde"] = stats.detectable(t["se"], family_alpha, policy.power)
            across = f", in all across its {t['subtasks']} subtasks" if t["subtasks"] else ""
            notes.append(
                f"inconclusive: within the limit but not shown to be; about {t['items_needed']} items (now {t['n']}"
                f"{across}) "
                f"would decide it at {policy.power:.0%} power if the drop stays {stats.format_signed(t['drop'])} (raise evals.limit); "
                f"at {t['n']} items only drops {t['mde']:.4f} or more below the limit pass reliably"
            )
        if ok and t["p"] is None:
            notes.append(f"decided on the estimate: no confidence bound ({t['why']})")
        if t["at_chance"]:
            notes.append(
                f"base at chance ({t['base']:.3g}; guessing {t['chance']:.3g}): this probe cannot show forgetting"
            )
        t["passed"], t["note"] = bool(ok), "; ".join(notes)
    return tests


def _row(c: dict) -> list[str]:
    if "drop" in c:
        value = f"{c['base']:.4g} → {c['value']:.4g}"
        bound = "no bound" if c["bound"] is None else "≤ " + stats.format_signed(c["bound"])
        relative = " relative" if c.get("relative") else ""  # a share of the base, as the limit is
        measured = f"{stats.format_signed(c['drop'])}{relative} ({bound})"
        p = stats.format_p(c["p_adj"])
    else:
        value, measured, p = "–" if c["value"] is None else f"{c['value']:.4g}", "", ""
    return [("PASS" if c["passed"] else "FAIL"), c["name"], c["metric"], value, measured, c["limit"], p, c["note"]]


def _head(result: dict) -> list[str]:
    return ["", "check", "metric", "value", "drop (upper bound)", "limit", f"p ({result['correction']})", "note"]


def _method(result: dict) -> str:
    adjusted = {"holm": "Holm-adjusted", "bh": "Benjamini-Hochberg-adjusted", "none": "unadjusted"}[
        result["correction"]
    ]
    return (
        f"non-inferiority at {100 * result['confidence']:g}%, one-sided, {adjusted} across {result['probes_tested']} "
        f"probes; decided on the {'test' if result['decide_on'] == 'upper' else 'estimate'}"
    )


def render_text(result: dict) -> str:
    """The verdict table for a terminal."""
    head = _head(result)
    rows = [head, *map(_row, result["checks"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(
        [
            *lines,
            "",
            f"verdict: {result['verdict'].upper()} ({result['run']}, step {result['step']}, {_method(result)})",
        ]
    )


def render_markdown(result: dict) -> str:
    """The verdict as Markdown, fit for a CI comment."""
    icon = "✅" if result["verdict"] == "pass" else "❌"
    head = _head(result)
    lines = [
        f"### {icon} forgetscope release gate: **{result['verdict'].upper()}**",
        "",
        f"Run `{result['run']}` at step {result['step']}; drops are positive when worse, paired over items; "
        f"{_method(result)}. A bound within the limit is a pass.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _row(c)) + " |" for c in result["checks"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``gate.json`` and ``gate.md`` into ``out_dir``."""
    json_path, md_path = out_dir / "gate.json", out_dir / "gate.md"
    io.write_json(json_path, result)
    io.write_text(md_path, render_markdown(result))
    return json_path, md_path
