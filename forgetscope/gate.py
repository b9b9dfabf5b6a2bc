"""The release gate: a policy of allowed drops, checked against a finished run.

Policy (YAML; example in examples/release_policy.yaml)::

    confidence: 0.95          # two-sided level of the paired bootstrap CI of each drop
    decide_on: upper          # upper | estimate: which end of the drop decides (see below)
    new:                      # minimum scores of the new task(s) at the checked step
      numerals: {min: 0.9}
    general:                  # allowed drops of the general probes ("default" covers the rest)
      prose_ppl: {max_drop: 0.05}            # absolute, in the metric's units
      world_capitals: {max_relative_drop: 0.05}
      default: {max_relative_drop: 0.10}
    max_general_forgetting: 0.05   # optional: the mean relative drop over the probes

How the CI enters the verdict: with ``decide_on: upper`` (the default) a probe passes only when
the *upper* end of its drop's confidence interval is within the limit, i.e. the data show, at that
confidence, that the model did not lose more than allowed; a drop whose interval straddles the
limit fails as *inconclusive* (score more items to narrow it). ``decide_on: estimate`` compares
the point estimate instead (lenient; for exploratory gates). New-task minimums compare the point
estimate. Drops are sign-correct (positive = worse; see docs/METRICS.md); a relative limit
divides the drop and its interval by ``abs(v_0)``.

Exit codes of ``forgetscope gate``: 0 pass, 1 fail, 2 unusable input (bad policy, not a run,
a probe the policy names but the run lacks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forgetscope import io, metrics, results, schema, stats
from forgetscope.errors import UserError
from forgetscope.schema import option
from forgetscope.snapshots import RunLayout


class GateError(UserError):
    """The policy or the run cannot be checked."""


@dataclass
class Limit:
    """The limit of one probe (give one of max_drop / max_relative_drop) or new task (min)."""

    max_drop: float | None = option(None, "largest allowed drop, in the metric's units (positive = worse)")
    max_relative_drop: float | None = option(None, "largest allowed drop relative to the base value, e.g. 0.05")
    min: float | None = option(None, "smallest allowed score (new tasks)")


@dataclass
class Policy:
    """A release policy (see the module documentation)."""

    confidence: float = option(0.95, "two-sided confidence level of the paired bootstrap CI of each drop")
    decide_on: Literal["upper", "estimate"] = option("upper", "upper: the CI's upper end must be within the limit; estimate: the point estimate")
    new: dict[str, Any] = option({}, "new task -> {min: score}")
    general: dict[str, Any] = option({}, "general probe (or 'default') -> {max_drop | max_relative_drop}")
    max_general_forgetting: float | None = option(None, "largest allowed mean relative drop over the general probes")
    limits: dict = field(default_factory=dict, metadata={"internal": True})  # (role, name) -> Limit


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; every problem is reported at once, one per line."""
    path = Path(path)
    if not path.is_file():
        raise GateError(f"{path}: no such policy file; see examples/release_policy.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise GateError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise GateError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    problems: list[str] = []
    policy = schema.build(Policy, data, "", problems)
    if not 0.5 <= policy.confidence < 1:
        problems.append(f"confidence: {policy.confidence} must be in [0.5, 1), e.g. 0.95")
    for role in ("new", "general"):
        for name, entry in (getattr(policy, role) or {}).items():
            limit = schema.build(Limit, entry, f"{role}.{name}.", problems)
            given = [k for k, v in asdict(limit).items() if v is not None]
            wanted = ["min"] if role == "new" else ["max_drop", "max_relative_drop"]
            if len(given) != 1 or given[0] not in wanted:
                problems.append(f"{role}.{name}: give exactly one of {' / '.join(wanted)}, got {given or 'none'}")
            policy.limits[(role, str(name))] = limit
    if not policy.new and not policy.general and policy.max_general_forgetting is None:
        problems.append("the policy sets no limit; add new:, general: or max_general_forgetting:")
    if problems:
        raise GateError("\n".join(f"{path}: {p}" for p in problems))
    return policy


def check(run: str | Path, policy: Policy, step: int | None = None) -> dict:
    """Check ``run`` at ``step`` (default: its last evaluated step) -> a verdict dict
    ``{"run", "step", "verdict": "pass"|"fail", "checks": [...]}`` (see :func:`render_markdown`)."""
    root = Path(run)
    if not (root / "manifest.json").is_file():
        raise GateError(f"{root}: not a forgetscope run (no manifest.json); pass a folder made by `forgetscope run` or `audit`")
    layout = RunLayout(root)
    table = results.load_results([root])
    if table.empty:
        raise GateError(f"{root}: the run has no finished evaluation yet")
    step = int(table["step"].max()) if step is None else step
    if step not in set(table["step"]):
        raise GateError(f"{root}: no evaluation at step {step}; evaluated steps: {sorted(set(table['step']))}")
    rows = metrics.primary_rows(table[table["step"].isin([0, step])])
    at = rows[rows["step"] == step].set_index("task")
    for role, name in policy.limits:
        if name != "default" and (name not in at.index or at.loc[name, "role"] != role):
            raise GateError(f"policy {role}.{name}: the run has no {role} eval {name!r}; it has {', '.join(sorted(at.index))}")
    checks = []
    for task, row in at.sort_values("role", key=lambda r: r != "new", kind="stable").iterrows():
        limit = policy.limits.get((row["role"], task)) or (policy.limits.get(("general", "default")) if row["role"] == "general" else None)
        if limit is None:
            continue
        if row["role"] == "new":
            ok = row["value"] >= limit.min
            checks.append({"name": task, "role": "new", "metric": row["metric"], "value": float(row["value"]),
                           "limit": f">= {limit.min:g}", "passed": bool(ok), "note": "" if ok else "below the minimum score"})
            continue
        ci = stats.paired_delta(layout, task, row["metric"], step, confidence=policy.confidence) if step else \
            {"delta": 0.0, "low": 0.0, "high": 0.0}
        drop, low, high = stats.as_drop(ci, bool(row["higher_is_better"]))
        relative = limit.max_relative_drop is not None
        scale = abs(row["v0"]) if relative and row["v0"] else 1.0
        drop, low, high = drop / scale, low / scale, high / scale
        bound = high if policy.decide_on == "upper" else drop
        allowed = limit.max_relative_drop if relative else limit.max_drop
        ok = bound <= allowed
        note = "" if ok else ("inconclusive: the estimate is within the limit but the CI is not; score more items"
                              if drop <= allowed else "drop exceeds the limit")
        checks.append({"name": task, "role": "general", "metric": row["metric"], "base": float(row["v0"]),
                       "value": float(row["value"]), "drop": drop, "low": low, "high": high, "relative": relative,
                       "limit": f"<= {allowed:g}{' relative' if relative else ''}", "passed": bool(ok), "note": note})
    if policy.max_general_forgetting is not None:
        forgetting = metrics.general_forgetting(rows)
        value = float(forgetting[forgetting["step"] == step]["forgetting"].iloc[0]) if len(forgetting) else 0.0
        ok = value <= policy.max_general_forgetting
        checks.append({"name": "general forgetting", "role": "general", "metric": "mean relative drop", "value": value,
                       "limit": f"<= {policy.max_general_forgetting:g}", "passed": bool(ok),
                       "note": "" if ok else "mean relative drop exceeds the limit"})
    return {"run": root.name, "path": str(root), "step": step, "confidence": policy.confidence,
            "decide_on": policy.decide_on, "verdict": "pass" if all(c["passed"] for c in checks) else "fail",
            "checks": checks}


def _row(c: dict) -> list[str]:
    if "drop" in c:
        value = f"{c['base']:.4g} → {c['value']:.4g}"
        measured = f"{c['drop']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
    else:
        value, measured = f"{c['value']:.4g}", ""
    return [("PASS" if c["passed"] else "FAIL"), c["name"], c["metric"], value, measured, c["limit"], c["note"]]


HEAD = ["", "check", "metric", "value", "drop [CI]", "limit", "note"]


def render_text(result: dict) -> str:
    """The verdict table for a terminal."""
    rows = [HEAD, *map(_row, result["checks"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([*lines, "", f"verdict: {result['verdict'].upper()} ({result['run']}, step {result['step']}, "
                      f"{result['confidence']:.0%} CI, decided on the {result['decide_on']})"])


def render_markdown(result: dict) -> str:
    """The verdict as Markdown, fit for a CI comment."""
    icon = "✅" if result["verdict"] == "pass" else "❌"
    lines = [f"### {icon} forgetscope release gate: **{result['verdict'].upper()}**", "",
             f"Run `{result['run']}` at step {result['step']}; drops are positive when worse, with paired "
             f"{result['confidence']:.0%} bootstrap CIs; decided on the CI's {result['decide_on']} end.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _row(c)) + " |" for c in result["checks"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``gate.json`` and ``gate.md`` into ``out_dir``."""
    json_path, md_path = out_dir / "gate.json", out_dir / "gate.md"
    io.write_json(json_path, result)
    io.write_text(md_path, render_markdown(result))
    return json_path, md_path

