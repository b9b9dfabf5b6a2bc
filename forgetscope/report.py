"""Comparison reports: one self-contained HTML page (figures embedded, opens offline, no
scripts) and a Markdown summary fit for a pull request, from any number of finished runs."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from forgetscope import continual, curves, figures, io, metrics, results, session, stats
from forgetscope.errors import UserError
from forgetscope.snapshots import RunLayout

TOP_ITEMS = 6  # most-forgotten items listed per probe


@dataclass
class Analysis:
    """Everything a report shows, as tables (also handy in a notebook)."""

    table: pd.DataFrame  # tidy curves of all runs
    summary: pd.DataFrame  # one row per run, ranked (metrics.run_summary + rank_runs), + status, planned_steps,
    # sequence_forgetting (a sequence's mean forgetting of its earlier stages)
    drops: pd.DataFrame  # run, task, metric, step, drop, low, high: general probes, paired 95% CI
    finals: (
        pd.DataFrame
    )  # run, task, role, metric, base, final, drop, low, high, p, p_adj, chance, adj_drop, at_chance, flips
    items: pd.DataFrame  # probe, item_id, text, runs, first_step, change: the most-forgotten items
    sequences: list[dict]  # runs with stages: run, figure (sequence.png), matrix metrics
    correction: str  # holm | bh | none: adjustment of each run's general probes' p-values
    left_out: dict[str, list[str]]  # run -> general probes left out of general forgetting, with why
    drift: pd.DataFrame  # run, step, drift, forgetting: the KL probe against general forgetting, per snapshot
    cascades: list[dict]  # runs with a cascade: run, probe steps, full-battery steps and why, evaluation time
    replay: dict[str, pd.DataFrame] = field(default_factory=dict)  # runs with replay: their training log (replay_logs)
    weights: dict[str, float] = field(default_factory=dict)  # general probe -> weight in general forgetting (else 1)
    keep_at_chance: bool = False  # probes at chance kept in general forgetting


def analyse(
    paths: str | Path | list[str | Path],
    target: float | None = None,
    weights: dict[str, float] | None = None,
    correction: str = "holm",
    keep_at_chance: bool = False,
) -> Analysis:
    """Load the runs in ``paths`` and compute the report's tables (see docs/METRICS.md).

    ``correction`` (holm | bh | none) adjusts the p-values of each run's general probes at its last
    step, which decide the "worse / better beyond noise" verdicts; probes whose base is not clearly
    above chance are left out of general forgetting unless ``keep_at_chance``."""
    if correction not in stats.CORRECTIONS:
        raise UserError(f"correction {correction!r}: use one of {', '.join(stats.CORRECTIONS)}")
    runs = results.load_runs(paths)
    table = pd.concat([t for _, t in runs], ignore_index=True)
    rows = metrics.primary_rows(table)
    probes = sorted(rows.loc[rows["role"] == "general", "task"].unique())
    for metric in rows.loc[rows["role"] == "new", "metric"].unique():
        if problem := curves.target_problem(target, metric):
            raise UserError(problem)
    unknown = sorted(set(weights or {}) - set(probes))
    if unknown:
        theirs = f"theirs: {', '.join(probes)}" if probes else "they have none"
        raise UserError(f"a weight for {unknown[0]!r} names no general probe of these runs; {theirs}")
    last_stage = {  # a sequence is summarised on its last stage's task: what it was fine-tuned for last
        run_table["run"].iloc[0]: stages[-1]["evals"][0]
        for root, run_table in runs
        if (stages := RunLayout(root).read_manifest().get("stages"))
    }
    summary = metrics.run_summary(
        table, target=target, weights=weights, keep_at_chance=keep_at_chance, new_task=last_stage
    )
    manifests = {root.name: RunLayout(root).read_manifest() for root, _ in runs}
    roots = {root.name: root for root, _ in runs}
    summary["status"] = [_status(roots[run], manifests[run]) for run in summary["run"]]
    summary["planned_steps"] = [max(manifests[run].get("snapshot_steps") or [0]) or None for run in summary["run"]]
    sequences = [  # recomputed: older runs' may be wrong
        {"run": root.name, "figure": root / "sequence.png", **continual.summary(run_table, manifest["stages"])[1]}
        for root, run_table in runs
        if (manifest := manifests[root.name]).get("stages") and manifest.get("sequence")
        if (root / "sequence.png").is_file()
    ]
    forgot = {entry["run"]: entry["mean_forgetting"] for entry in sequences}
    summary["sequence_forgetting"] = [forgot.get(run, math.nan) for run in summary["run"]]
    summary = metrics.rank_runs(summary)
    drops, finals, forgotten, cascades = [], [], [], []
    for root, run_table in runs:
        layout = RunLayout(root)
        run = run_table["run"].iloc[0]
        manifest = manifests[root.name]
        if manifest.get("cascade"):
            cascades.append(_cascade_entry(run, manifest["cascade"]))
        mine = rows[rows["run"] == run]
        last = int(mine["step"].max())
        for (task, metric, role, higher), line in mine.groupby(
            ["task", "metric", "role", "higher_is_better"], sort=False
        ):
            for step in sorted(line["step"]):
                if role != "general" and step != last:
                    continue
                ci = (
                    stats.paired_delta(layout, task, metric, step)
                    if step
                    else {"delta": 0.0, "low": 0.0, "high": 0.0, "n": 0, "p": 1.0}
                )
                drop, low, high = stats.as_drop(ci, bool(higher))
                if role == "general":
                    drops.append(
                        {
                            "run": run,
                            "task": task,
                            "metric": metric,
                            "step": step,
                            "drop": drop,
                            "low": low,
                            "high": high,
                        }
                    )
                if step == last:
                    flip = stats.flips(layout, task, metric, step) or {}
                    end = line.set_index("step").loc[step]
                    finals.append(
                        {
                            "run": run,
                            "task": task,
                            "role": role,
                            "metric": metric,
                            "higher_is_better": bool(higher),
                            "base": float(end["v0"]),
                            "final": float(end["value"]),
                            "drop": drop,
                            "low": low,
                            "high": high,
                            "n": ci["n"],
                            "p": ci["p"],
                            "p_adj": ci["p"],
                            "why": ci.get("why", ""),  # why there is no CI, when there is none
                            "chance": end["chance"],
                            "adj_drop": end["adj_drop"],
                            "at_chance": bool(end["at_chance"]) and role == "general",
                            "p_mcnemar": flip.get("p_mcnemar"),
                            "forgotten": len(flip["forgotten"]) if flip else None,
                            "learned": len(flip["learned"]) if flip else None,
                            "forgotten_adj": flip.get("forgotten_adj"),
                            "learned_adj": flip.get("learned_adj"),
                        }
                    )
            if role == "general":
                forgotten.extend(_forgotten_items(layout, run, task, metric, bool(higher), sorted(line["step"])))
        # probes without a CI have no test, and stay out of the family (as in the gate)
        family = [f for f in finals if f["run"] == run and f["role"] == "general" and f["p"] is not None]
        for entry, p_adj in zip(family, stats.adjust([f["p"] for f in family], correction)):
            entry["p_adj"] = p_adj
    drift = metrics.drift_vs_forgetting(table, metrics.KL_PROBE, weights, keep_at_chance)
    return Analysis(
        table,
        summary,
        pd.DataFrame(drops, columns=["run", "task", "metric", "step", "drop", "low", "high"]),
        pd.DataFrame(finals),
        _top_items(pd.DataFrame(forgotten)),
        sequences,
        correction,
        metrics.left_out(rows, keep_at_chance),
        drift,
        cascades,
        replay_logs([root for root, _ in runs]),
        dict(weights or {}),
        keep_at_chance,
    )


def _status(root: Path, manifest: dict) -> str:
    """A run's status as its manifest says it, but ``interrupted`` for one that reads ``running``
    while no process writes it (killed without a chance to say so: SIGKILL, a power cut)."""
    status = manifest.get("status") or "unfinished"
    return "interrupted" if status == "running" and not session.being_written(root) else status


def _cascade_entry(run: str, record: dict) -> dict:
    """A run's cascade from its manifest: how many probe steps, which got the full battery and why,
    and the evaluation time against an estimate of the full battery at every probe step (the
    cheap probes' measured time everywhere, plus the mean time of the rest of the battery at the
    full steps after step 0, whose scores are often cached, at every step)."""
    steps = {int(s): e for s, e in record["steps"].items()}
    full = [s for s in sorted(steps) if steps[s]["full"]]
    rest = [steps[s]["full_s"] for s in full if s > 0] or [steps[s]["full_s"] for s in full]
    spent = sum(e["cheap_s"] + e["kl_s"] + e["full_s"] for e in steps.values())
    everywhere = sum(e["cheap_s"] for e in steps.values()) + (sum(rest) / len(rest)) * len(steps)
    return {
        "run": run,
        "probe_steps": len(steps),
        "full_steps": full,
        "triggered": [f"{s}: {steps[s]['reason']}" for s in full if steps[s]["reason"] != "scheduled"],
        "eval_s": spent,
        "eval_s_everywhere": everywhere,
    }


def replay_logs(roots: list[Path]) -> dict[str, pd.DataFrame]:
    """Per run with replay (by name): its training log from the manifest, rows of losses
    (step, new_loss, replay_loss) and rows of buffer draws (step, replay_refresh)."""
    out = {}
    for root in roots:
        manifest = RunLayout(root).read_manifest()
        log = pd.DataFrame(manifest.get("train_log") or [])
        if manifest.get("replay") and "replay_loss" in log:
            out[root.name] = log
    return out


def _forgotten_items(layout: RunLayout, run: str, task: str, metric: str, higher: bool, steps: list[int]) -> list[dict]:
    """Per item of one probe in one run: for 0/1 metrics the items forgotten by the end (with the
    first step they were wrong); for the others the items that got worse, with their change at the
    end (positive = worse: bits per byte, or minus the accuracy-like score)."""
    last = steps[-1]
    texts = results.item_texts(layout, task)
    flip = stats.flips(layout, task, metric, last)
    if flip is not None:
        first = stats.first_forgotten(layout, task, metric, steps)
        return [
            {
                "probe": task,
                "item_id": i,
                "text": texts.get(i, ""),
                "run": run,
                "first_step": first.get(i, last),
                "change": 1.0,
            }
            for i in flip["forgotten"]
        ]
    base, final = stats.item_values(layout, 0, task, metric), stats.item_values(layout, last, task, metric)
    out = []
    for item in set(base) & set(final):
        change = stats.item_change(metric, base[item], final[item], higher)
        if not change > 0:  # no worse in this run: it forgot nothing of the item
            continue
        out.append(
            {
                "probe": task,
                "item_id": item,
                "text": texts.get(item, ""),
                "run": run,
                "first_step": None,
                "change": change,
            }
        )
    return out


def _top_items(items: pd.DataFrame) -> pd.DataFrame:
    """The most-forgotten items per probe: forgotten (or, for continuous metrics, made worse) by
    the most runs, then by the largest mean change over those runs."""
    if items.empty:
        return pd.DataFrame(columns=["probe", "item_id", "text", "runs", "first_step", "change"])
    out = []
    for (probe, item), group in items.groupby(["probe", "item_id"], sort=False):
        steps = [f"{r} (step {int(s)})" if pd.notna(s) else r for r, s in zip(group["run"], group["first_step"])]
        out.append(
            {
                "probe": probe,
                "item_id": item,
                "text": group["text"].iloc[0],
                "runs": ", ".join(steps),
                "n_runs": len(group),
                "first_step": group["first_step"].min(),
                "change": group["change"].mean(),
            }
        )
    table = pd.DataFrame(out).sort_values(["probe", "n_runs", "change"], ascending=[True, False, False])
    table = table[table["change"] > 0]
    return table.groupby("probe", sort=False).head(TOP_ITEMS).reset_index(drop=True)


# ---------------------------------------------------------------- writing


def write(
    paths: list[str | Path],
    out_dir: str | Path,
    target: float | None = None,
    weights: dict[str, float] | None = None,
    title: str = "forgetscope report",
    correction: str = "holm",
    keep_at_chance: bool = False,
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ its PNG figures) into ``out_dir``."""
    analysis = analyse(paths, target, weights, correction, keep_at_chance)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_figures(out)
    pngs = {}
    colors = figures.run_colors(analysis.summary["run"])  # one colour per run in every figure
    if _has_new_task(analysis):  # audits score a new task only when asked
        pngs["learning"] = figures.save(learning_figure(analysis, target, colors), out / "learning.png")
    if _has_frontier(analysis):
        pngs["frontier"] = figures.save(figures.plot_frontier(analysis.summary, colors), out / "frontier.png")
    if not analysis.drops.empty:
        pngs["forgetting"] = figures.save(
            figures.plot_forgetting(analysis.drops, colors, _left_out_by_probe(analysis)), out / "forgetting.png"
        )
    if analysis.replay:
        pngs["replay"] = figures.save(figures.plot_replay(analysis.replay), out / "replay.png")
    if len(analysis.drift):
        r2 = metrics.r_squared(analysis.drift["drift"], analysis.drift["forgetting"])
        pngs["drift"] = figures.save(
            figures.plot_drift_forgetting(analysis.drift, r2, metrics.KL_PROBE, colors), out / "drift.png"
        )
    for entry in analysis.sequences:  # copied beside the report, for the Markdown
        copy = out / f"sequence-{entry['run']}.png"
        io.write_bytes(copy, entry["figure"].read_bytes())
        pngs[f"sequence-{entry['run']}"] = copy
    html_path, md_path = out / "report.html", out / "report.md"
    io.write_text(html_path, render_html(analysis, pngs, title, target))
    io.write_text(md_path, render_markdown(analysis, title, target))
    for path in earlier - set(pngs.values()):
        path.unlink(missing_ok=True)
    return html_path, md_path


FIGURES = ("learning.png", "frontier.png", "forgetting.png", "drift.png", "replay.png")
"""The report's figures, beside ``sequence-<run>.png`` for each sequence."""


def _earlier_figures(out: Path) -> set[Path]:
    """The figures an earlier report in ``out`` wrote: those its ``report.md`` links to, named as
    the report names its figures (a report written again removes the ones it no longer writes, and
    never a file of anyone else's)."""
    old = out / "report.md"
    linked = re.findall(r"\]\(([^()/\\]+\.png)\)", old.read_text(errors="replace")) if old.is_file() else []
    return {out / name for name in linked if name in FIGURES or name.startswith("sequence-")}


def _has_new_task(analysis: Analysis) -> bool:
    """Whether any run scored a new task (audits do only when asked)."""
    return bool(analysis.summary["new_task"].notna().any())


def _has_frontier(analysis: Analysis) -> bool:
    """Whether any run has a point in the learning-vs-forgetting figure (a new task and general probes)."""
    return bool(analysis.summary[["gain_final", "forgetting_final"]].notna().all(axis=1).any())


def learning_figure(analysis: Analysis, target: float | None, colors: dict[str, str] | None = None) -> figures.Figure:
    """The new task of each run, the one its summary row shows (a sequence's last stage), against step."""
    rows = metrics.primary_rows(analysis.table)
    shown = set(zip(analysis.summary["run"], analysis.summary["new_task"]))
    return figures.plot_learning(rows[[pair in shown for pair in zip(rows["run"], rows["task"])]], target, colors)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    """A fraction as a signed percentage ("+0.0%", never "-0.0%"); "–" when there is none (no general probes)."""
    return "–" if value is None or pd.isna(value) else f"{round(value * 100, 1) + 0.0:+.1f}%"


def _steps(r: dict) -> str:
    """A run's last step; for a run not finished, its status and the steps it planned, as in
    "failed at step 90 of 300", so an unfinished run is never read as a finished one."""
    if r["status"] == "finished":
        return str(r["steps"])
    planned = f" of {int(r['planned_steps'])}" if pd.notna(r["planned_steps"]) else ""
    return f"{r['status']} at step {r['steps']}{planned}"


def _summary_rows(analysis: Analysis, target: float | None) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "run", "method", "steps", "new task (base → final)", "general forgetting: final", "max", "AUC"]
    if target is not None:
        head += [f"steps to {target:g}", f"forgetting at {target:g}"]
    head += ["Pareto"]
    body = []
    for r in analysis.summary.to_dict("records"):
        new = (
            f"{r['new_task']} {r['new_metric']}: {_fmt(r['new_base'])} → {_fmt(r['new_final'])}"
            if pd.notna(r["new_task"])
            else "no new task"
        )
        line = [
            str(r["rank"]),
            r["run"],
            r["method"],
            _steps(r),
            new,
            _pct(r["forgetting_final"]),
            _pct(r["forgetting_max"]),
            _pct(r["forgetting_auc"]),
        ]
        if target is not None:
            reached = r.get("steps_to_target") is not None and not pd.isna(r.get("steps_to_target"))
            line += [
                _fmt(r.get("steps_to_target"), 1) if reached else "not reached" if pd.notna(r["new_task"]) else "–",
                _pct(r.get("forgetting_at_target")) if reached else "–",
            ]
        line += ["✓" if r["pareto"] else ""]
        body.append(line)
    return head, body


CORRECTIONS = {"holm": "Holm", "bh": "BH", "none": "unadjusted"}


def _final_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    head = [
        "run",
        "task",
        "metric",
        "base",
        "final",
        "change [95% CI]",
        "above-chance skill lost",
        f"p ({CORRECTIONS[analysis.correction]} across general probes; a new task's own)",
        "McNemar p",
        "right→wrong / wrong→right (chance-adjusted)",
        "verdict",
    ]
    body = []
    for r in analysis.finals.sort_values(["role", "task", "run"], ascending=[False, True, True]).to_dict("records"):
        sign = -1 if r["higher_is_better"] else 1  # drop -> raw change of the metric
        low, high = sorted((sign * r["low"], sign * r["high"]))
        significant = r["p_adj"] is not None and not pd.isna(r["p_adj"]) and r["p_adj"] <= stats.ALPHA
        verdict = ("worse" if r["drop"] > 0 else "better") if significant else ""
        verdict = "; ".join(filter(None, [verdict, "base at chance" if r["at_chance"] else ""]))
        arrow = "↑" if r["higher_is_better"] else "↓"
        flips = (
            "–"
            if pd.isna(r["forgotten"])
            else (f"{int(r['forgotten'])} / {int(r['learned'])} ({r['forgotten_adj']:.1f} / {r['learned_adj']:.1f})")
        )
        body.append(
            [
                r["run"],
                f"{r['task']} ({r['role']})",
                f"{r['metric']} {arrow}",
                _fmt(r["base"], 4),
                _fmt(r["final"], 4),
                f"{stats.format_signed(sign * r['drop'])} (no CI: {r['why']})"
                if pd.isna(r["low"])
                else f"{stats.format_signed(sign * r['drop'])} [{stats.format_signed(low)}, {stats.format_signed(high)}]",
                _pct(r["adj_drop"]) if pd.notna(r["chance"]) and not r["at_chance"] else "–",  # no skill to lose
                stats.format_p(r["p_adj"]),
                stats.format_p(r["p_mcnemar"]),
                flips,
                verdict,
            ]
        )
    return head, body


def _left_out_by_probe(analysis: Analysis) -> dict[str, str]:
    """probe -> "left out of general forgetting: at chance" (naming the runs when not all of them)."""
    runs: dict[str, list[str]] = {}
    for run, labels in analysis.left_out.items():
        for label in labels:
            runs.setdefault(label, []).append(run)
    every = set(analysis.summary["run"])
    notes: dict[str, list[str]] = {}
    for label, which in runs.items():
        probe, _, why = label.partition(" (")
        whom = "" if set(which) == every else f" for {', '.join(which)}"
        notes.setdefault(probe, []).append(f"{why.rstrip(')')}{whom}")
    return {probe: "left out of general forgetting: " + "; ".join(whys) for probe, whys in notes.items()}


def _left_out_note(analysis: Analysis) -> str:
    """Which probes general forgetting leaves out, per run (empty when none)."""
    if not analysis.left_out:
        return ""
    runs = "; ".join(f"{run}: {', '.join(probes)}" for run, probes in analysis.left_out.items())
    return (
        f"Left out of general forgetting: {runs} (at chance: the base score is not clearly above chance, "
        f"one-sided binomial p ≥ {metrics.CHANCE_ALPHA:g}, so it cannot show a drop; base 0: no relative drop)."
    )


def _cascade_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    head = [
        "run",
        "probe steps",
        "full battery at",
        "triggered (cheap probe moved since the last full battery)",
        "evaluation time",
        "full battery everywhere (est.)",
    ]
    return head, [
        [
            e["run"],
            str(e["probe_steps"]),
            ", ".join(map(str, e["full_steps"])),
            "; ".join(e["triggered"]) or "–",
            f"{e['eval_s']:.0f} s",
            f"{e['eval_s_everywhere']:.0f} s",
        ]
        for e in analysis.cascades
    ]


def _drift_note(analysis: Analysis) -> str:
    r2 = metrics.r_squared(analysis.drift["drift"], analysis.drift["forgetting"])
    return (
        f"{metrics.KL_PROBE} = KL(base || snapshot) per token on new-task prompts, along the base's own answers "
        f"(no labels); R² = {r2:.2f} over {len(analysis.drift)} snapshots of {analysis.drift['run'].nunique()} runs "
        "(least squares of general forgetting on the KL). Shenfeld et al. 2025 report R² 0.96 (toy) and 0.71 (LLMs)."
    )


SEQUENCE_KEYS = ["average_accuracy", "backward_transfer", "forward_transfer", "mean_forgetting", "learning_accuracy"]


def _sequence_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    head = ["run", "average accuracy", "backward transfer", "forward transfer", "mean forgetting", "learning accuracy"]
    return head, [[e["run"], *(f"{e[k]:+.3f}" for k in SEQUENCE_KEYS)] for e in analysis.sequences]


def _replay_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    head = ["run", "new-task loss (first → last)", "replay loss (first → last)", "buffer drawn at steps"]
    body = []
    for run, log in analysis.replay.items():
        losses = log.dropna(subset=["new_loss"]).sort_values("step")
        draws = [str(int(s)) for s in log["step"][log["replay_refresh"].notna()]] if "replay_refresh" in log else []
        body.append(
            [
                run,
                f"{losses['new_loss'].iloc[0]:.4g} → {losses['new_loss'].iloc[-1]:.4g}",
                f"{losses['replay_loss'].iloc[0]:.4g} → {losses['replay_loss'].iloc[-1]:.4g}",
                ", ".join(draws[:12]) + (f", … ({len(draws)} draws)" if len(draws) > 12 else "") or "–",
            ]
        )
    return head, body


def _item_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    head = ["probe", "item", "forgotten by (first step wrong) / change", "text"]
    body = []
    for r in analysis.items.to_dict("records"):
        who = r["runs"] if pd.notna(r["first_step"]) else f"mean +{r['change']:.3f} over {r['runs']}"
        text = " ".join(str(r["text"]).split())
        body.append([r["probe"], str(r["item_id"]), who, text[:220] + ("…" if len(text) > 220 else "")])
    return head, body


def _html_table(head: list[str], body: list[list[str]], cls: str = "") -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{cells}</tr></thead><tbody>{lines}</tbody></table>'


def _md_table(head: list[str], body: list[list[str]]) -> str:
    def clean(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


NO_ITEMS = "No item of a general probe was forgotten, or scored worse, by a run's last step."


def method_note(analysis: Analysis) -> str:
    """How the report's numbers were computed, with the options that made it (weights, probes at
    chance, the p-value adjustment)."""
    weights = ", ".join(f"{probe}={w:g}" for probe, w in analysis.weights.items())
    adjusted = {
        "holm": "adjusted across each run's general probes (Holm)",
        "bh": "adjusted across each run's general probes (Benjamini-Hochberg, false discovery rate)",
        "none": "unadjusted",
    }[analysis.correction]
    return (
        "General forgetting = mean relative drop of the general probes' primary metrics from the base "
        f"(positive = worse), {f'weights {weights}, the others 1' if weights else 'equal weights'}, "
        f"{'probes at chance kept (--keep-at-chance)' if analysis.keep_at_chance else 'probes at chance left out'}; "
        "AUC = its average over training; drops carry paired 95% CIs over items (Tango's score interval for "
        "accuracies, the bootstrap for other metrics); verdicts use the matching p-values of no change "
        f"{adjusted}, at {stats.ALPHA:.0%}; McNemar's exact test and flips for accuracies, with the flips "
        "guessing alone explains taken out (chance-adjusted); above-chance skill lost = drop / (base - chance). "
        "Formulas: docs/METRICS.md."
    )


def render_html(analysis: Analysis, pngs: dict[str, Path], title: str, target: float | None) -> str:
    """The report as one HTML page: figures inlined as data URIs, no scripts, no external files."""

    def img(name: str, alt: str) -> str:
        data = base64.b64encode(pngs[name].read_bytes()).decode()
        return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'

    runs = ", ".join(analysis.summary["run"])
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0 1.6em;font-size:.88em}"
        "th,td{border:1px solid #ccc;padding:.3em .55em;text-align:left;vertical-align:top}"
        "th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}"
        "img{max-width:100%}figure{margin:.5em 0 1.5em}.note{color:#555;font-size:.9em}"
        "table.items td:last-child{max-width:520px}"
    )
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{style}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Runs: {html.escape(runs)}. Generated {datetime.now():%Y-%m-%d %H:%M} by forgetscope.</p>",
        "<h2>Summary</h2>",
        _html_table(*_summary_rows(analysis, target)),
        f"<p class='note'>{html.escape(method_note(analysis))}</p>",
        *([f"<p class='note'>{html.escape(_left_out_note(analysis))}</p>"] if analysis.left_out else []),
        *(
            [
                "<h2>Learning vs forgetting</h2>",
                img("frontier", "learning vs forgetting scatter with the Pareto frontier"),
            ]
            if "frontier" in pngs
            else []
        ),
        *(["<h2>New task</h2>", img("learning", "new-task learning curves")] if "learning" in pngs else []),
        *(
            ["<h2>Forgetting curves</h2>", img("forgetting", "forgetting curve per general probe with 95% CI bands")]
            if "forgetting" in pngs
            else []
        ),
        *(
            [
                "<h2>Cheap probes: KL from the base against forgetting</h2>",
                img("drift", "KL against general forgetting"),
                f"<p class='note'>{html.escape(_drift_note(analysis))}</p>",
            ]
            if "drift" in pngs
            else []
        ),
        *(["<h2>Evaluation cascade</h2>", _html_table(*_cascade_rows(analysis))] if analysis.cascades else []),
        *(
            [
                "<h2>Sequences of new tasks</h2>",
                _html_table(*_sequence_rows(analysis)),
                *(
                    img(f"sequence-{e['run']}", f"accuracy matrix and task curves of {e['run']}")
                    for e in analysis.sequences
                ),
            ]
            if analysis.sequences
            else []
        ),
        *(
            [
                "<h2>Replay</h2>",
                _html_table(*_replay_rows(analysis)),
                img("replay", "new-task and replay losses with buffer draws"),
            ]
            if analysis.replay
            else []
        ),
        "<h2>Per task at the last step</h2>",
        _html_table(*_final_rows(analysis)),
        "<h2>Most-forgotten items</h2>",
        _html_table(*_item_rows(analysis), cls="items") if len(analysis.items) else f"<p>{NO_ITEMS}</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def render_markdown(analysis: Analysis, title: str, target: float | None) -> str:
    """The report as Markdown (tables, and the figures as PNG files beside it)."""
    return (
        "\n\n".join(
            [
                f"# {title}",
                _md_table(*_summary_rows(analysis, target)),
                f"_{method_note(analysis)}_",
                *([f"_{_left_out_note(analysis)}_"] if analysis.left_out else []),
                *(["![learning vs forgetting](frontier.png)"] if _has_frontier(analysis) else []),
                *(["![new task](learning.png)"] if _has_new_task(analysis) else []),
                *(["![forgetting curves](forgetting.png)"] if not analysis.drops.empty else []),
                *(
                    [
                        "## Cheap probes: KL from the base against forgetting",
                        "![KL against forgetting](drift.png)",
                        f"_{_drift_note(analysis)}_",
                    ]
                    if len(analysis.drift)
                    else []
                ),
                *(["## Evaluation cascade", _md_table(*_cascade_rows(analysis))] if analysis.cascades else []),
                *(
                    [
                        "## Sequences of new tasks",
                        _md_table(*_sequence_rows(analysis)),
                        *(f"![{e['run']}](sequence-{e['run']}.png)" for e in analysis.sequences),
                    ]
                    if analysis.sequences
                    else []
                ),
                *(
                    ["## Replay", _md_table(*_replay_rows(analysis)), "![replay](replay.png)"]
                    if analysis.replay
                    else []
                ),
                "## Per task at the last step",
                _md_table(*_final_rows(analysis)),
                "## Most-forgotten items",
                _md_table(*_item_rows(analysis)) if len(analysis.items) else NO_ITEMS,
            ]
        )
        + "\n"
    )
