"""Figures: forgetting curves, learning vs forgetting, training losses (matplotlib, no display needed)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from forgetscope import io as fileio
from forgetscope.curves import primary_metric


def primary_metrics(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(task, metric) pairs to plot: each task's primary metric, new tasks first."""
    ordered = table.assign(_new=table["role"] != "new").sort_values(["_new"], kind="stable")
    return [
        (task, primary_metric(list(group["metric"].unique()))) for task, group in ordered.groupby("task", sort=False)
    ]


def _panels(n: int, per_row: int, size: tuple[float, float]) -> tuple[Figure, list]:
    """A figure with ``n`` panels, ``per_row`` to a row, each ``size`` inches; unused cells hidden."""
    cols = max(1, min(per_row, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


ROLE_TITLES = {"new": "new task", "general": "general", "drift": "label-free drift"}


def _nothing(what: str) -> Figure:
    """A small figure that says why there is nothing to draw (a notebook cell still shows something)."""
    fig = Figure(figsize=(5.6, 1.2))
    fig.text(0.5, 0.5, what, ha="center", va="center", fontsize=10)
    return fig


def plot_curves(table: pd.DataFrame, title: str = "") -> Figure:
    """One panel per task (three to a row): its primary metric against training step, with a 95%
    band (±1.96 stderr, kept within [0, 1] for proportions), one line per run when ``table`` holds
    several (:func:`run_colors`; one run: blue for a new task, red for a general probe).

    Each run's base (step 0) is marked by a dashed line; x is as :func:`step_axis` sets it.
    """
    pairs = primary_metrics(table)
    runs = list(dict.fromkeys(table["run"])) if "run" in table else []
    several = len(runs) > 1
    colors = run_colors(runs)
    fig, axes = _panels(len(pairs), 3, (4.4, 3.3))
    for ax, (task, metric) in zip(axes, pairs):
        rows = table[(table["task"] == task) & (table["metric"] == metric)].sort_values("step")
        role = rows["role"].iloc[0]
        for run, line in rows.groupby("run", sort=False) if several else [(None, rows)]:
            color = colors[run] if several else ("tab:blue" if role == "new" else "tab:red")
            ax.plot(line["step"], line["value"], marker="o", markersize=4, color=color, label=run)
            _band(ax, line, color, 0.2)
            base = {"color": color, "alpha": 0.6} if several else {"color": "grey", "label": "base (step 0)"}
            ax.axhline(line["value"].iloc[0], linestyle="--", linewidth=1, **base)
        arrow = "↑" if rows["higher_is_better"].iloc[0] else "↓"
        ax.set_title(f"{task} ({ROLE_TITLES.get(role, role)})")
        ax.set_ylabel(f"{metric} {arrow} better")
        ax.set_xlabel("training step")
        step_axis(ax, rows["step"])
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8, title="dashed: base (step 0)" if several else None, title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def step_axis(ax, steps: pd.Series) -> None:
    """Training steps on ``ax``'s x axis: linear when the snapshots are evenly spaced (``every`` and
    most ``at`` schedules), symlog when their gaps grow (``log`` schedules), so dense early snapshots
    stay apart. Ticks are round numbers from matplotlib's locators, which never crowd their labels
    (each snapshot shows as a marker); labelling every snapshot overprinted them."""
    gaps = np.diff(np.unique(steps))[:-1]  # the last gap is the final step's, often off the schedule
    if len(gaps) > 1 and gaps.max() > 4 * gaps.min():
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, steps.max() * 1.15)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 100, not 10^2
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 5, 10], integer=True))
    ax.tick_params(axis="x", labelsize=8)
    ax.minorticks_off()


def plot_train_log(log: pd.DataFrame, title: str = "") -> Figure:
    """Training losses against step: the total loss, and with replay the new-task and replay losses;
    on a log scale when they span more than 20x (a loss falling to 1e-4 is flat at 0 on a linear one)."""
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    shown = [c for c in ("loss", "new_loss", "replay_loss") if c in log]
    labels = {"loss": "total loss", "new_loss": "new-task loss", "replay_loss": "replay loss"}
    for column in shown:
        ax.plot(log["step"], log[column], marker=".", label=labels[column])
    values = log[shown].to_numpy(float).ravel()
    values = values[np.isfinite(values)]
    logscale = len(values) > 0 and values.min() > 0 and values.max() > 20 * values.min()
    if logscale:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per token, log scale)" if logscale else "loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "training losses")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (see :mod:`forgetscope.io`) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    fileio.write_bytes(path, buffer.getvalue())
    return path


def run_colors(runs) -> dict[str, str]:
    """A colour per run name (by sorted name): tab10 for up to 10 runs, tab20 for up to 20 (then
    they repeat). The report computes them once over all its runs and passes them to every figure,
    so a run has one colour throughout; a figure given none colours the runs it shows."""
    names = sorted(set(runs))
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return {run: palette[i % len(palette)] for i, run in enumerate(names)}


def _band(ax, line: pd.DataFrame, color, alpha: float) -> None:
    """The ±1.96 stderr band of ``line`` (columns step, value, stderr, higher_is_better), within
    [0, 1] for a proportion (a higher-is-better metric whose values all lie there: an accuracy)."""
    if not line["stderr"].notna().any():
        return
    half = 1.96 * line["stderr"].fillna(0)
    low, high = line["value"] - half, line["value"] + half
    if bool(line["higher_is_better"].iloc[0]) and line["value"].between(0, 1).all():
        low, high = low.clip(0, 1), high.clip(0, 1)
    ax.fill_between(line["step"], low, high, color=color, alpha=alpha)


def plot_forgetting(
    drops: pd.DataFrame, colors: dict[str, str] | None = None, notes: dict[str, str] | None = None
) -> Figure:
    """One panel per general probe: each run's drop from the base (positive = worse, in the
    probe's own metric) against step, with its paired 95% band (the score interval for
    accuracies, the bootstrap's for other metrics); x as :func:`step_axis` sets it.

    ``drops`` has columns run, task, metric, step, drop, low, high (the CI of the drop). One legend
    below the panels names every run, whichever probes it has. ``colors``: :func:`run_colors`;
    ``notes``: probe -> a line under its panel's title (why general forgetting leaves it out).
    """
    if drops.empty:
        return _nothing("no general probe in these runs: no forgetting curve to draw")
    probes = list(dict.fromkeys(drops["task"]))
    runs = list(dict.fromkeys(drops["run"]))
    colors = colors or run_colors(runs)
    fig, axes = _panels(len(probes), 2, (5.6, 3.6))
    fig.set_layout_engine("constrained")  # makes room for the figure's legend ("outside" below)
    for ax, probe in zip(axes, probes):
        part = drops[drops["task"] == probe]
        for run, line in part.groupby("run", sort=False):
            line = line.sort_values("step")
            ax.plot(line["step"], line["drop"], marker="o", markersize=3, color=colors[run], label=run)
            ax.fill_between(line["step"], line["low"], line["high"], color=colors[run], alpha=0.15)
        ax.axhline(0, color="grey", linewidth=1, linestyle="--")
        note = (notes or {}).get(probe)
        ax.set_title(f"{probe}: drop in {part['metric'].iloc[0]}" + (f"\n({note})" if note else ""), fontsize=10)
        ax.set_ylabel("drop from base (up = worse)")
        ax.set_xlabel("training step")
        step_axis(ax, part["step"])
        ax.grid(alpha=0.3)
    fig.legend(
        handles=[Line2D([], [], color=colors[run], marker="o", markersize=3, label=run) for run in runs],
        loc="outside lower center",
        ncols=min(len(runs), 4),
        fontsize=8,
    )
    fig.suptitle("Forgetting curves: general probes, paired 95% CI over items")
    return fig


def plot_learning(rows: pd.DataFrame, target: float | None = None, colors: dict[str, str] | None = None) -> Figure:
    """New tasks' primary metric against step (``rows``: primary rows of new-task evals), one line
    per run and task (a run's colour, :func:`run_colors`; a task's line style when there are
    several tasks), with the target score if one is set. The title names the tasks shown; the
    legend sits beside the axes when it is long."""
    colors = colors or run_colors(rows["run"])
    tasks = list(dict.fromkeys(rows["task"]))
    styles = dict(zip(tasks, itertools.cycle(["-", "--", ":", "-."])))
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for (run, task), line in rows.groupby(["run", "task"], sort=False):
        line = line.sort_values("step")
        label = run if len(tasks) == 1 else f"{run}: {task}"
        ax.plot(line["step"], line["value"], marker="o", markersize=3, color=colors[run], ls=styles[task], label=label)
        _band(ax, line, colors[run], 0.15)
    if target is not None:
        ax.axhline(target, color="black", linewidth=1, linestyle=":", label=f"target {target:g}")
    ax.set_title(f"New task{'s' if len(tasks) > 1 else ''}: {', '.join(tasks)}")
    scores = rows.drop_duplicates(["metric", "higher_is_better"])
    one = scores.iloc[0]
    ax.set_ylabel(
        f"{one['metric']} ({'up' if one['higher_is_better'] else 'down'} = better)"
        if len(scores) == 1
        else "score (each task's primary metric)"
    )
    ax.set_xlabel("training step")
    step_axis(ax, rows["step"])
    ax.grid(alpha=0.3)
    lines = rows.groupby(["run", "task"]).ngroups
    if lines > 6:  # beside the axes: inside, a long legend covers the curves
        fig.set_size_inches(6.4 + 1.8 * (1 + (lines > 24)), 3.8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=1 + (lines > 24))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_frontier(summary: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Learning vs forgetting: each run's final new-task gain against its general forgetting
    (mean relative drop), the Pareto frontier joined by a line (``summary`` from
    :func:`forgetscope.metrics.rank_runs`); a run without a new task or general probes has no point."""
    colors = colors or run_colors(summary["run"])
    summary = summary.dropna(subset=["gain_final", "forgetting_final"])
    if summary.empty:
        return _nothing("no run has both a new task and general probes: no learning-vs-forgetting point")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    front = summary[summary["pareto"]].sort_values("forgetting_final")
    ax.plot(
        front["forgetting_final"] * 100,
        front["gain_final"],
        color="grey",
        linewidth=1.5,
        linestyle="--",
        label="Pareto frontier",
        zorder=1,
    )
    x, y = summary["forgetting_final"] * 100, summary["gain_final"]
    span_x, span_y = max(float(np.ptp(x)), 1e-9), max(float(np.ptp(y)), 1e-9)
    placed: list[tuple[float, float]] = []
    deepest = 0
    for row in summary.itertuples():
        point = (row.forgetting_final * 100, row.gain_final)
        ax.scatter(*point, s=70, color=colors[row.run], zorder=2, edgecolor="black" if row.pareto else "none")
        # labels of points that nearly coincide are stacked downwards instead of overprinted
        near = sum(abs(point[0] - px) < 0.15 * span_x and abs(point[1] - py) < 0.08 * span_y for px, py in placed)
        placed.append(point)
        deepest = max(deepest, near)
        ax.annotate(f"{row.rank}. {row.run}", point, xytext=(6, 4 - 12 * near), textcoords="offset points", fontsize=9)
    ax.margins(x=0.15, y=0.1 + 0.06 * deepest)  # room for the labels, stacked ones too, inside the axes
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("general forgetting at the end (% mean relative drop; right = worse)")
    ax.set_ylabel("new-task gain at the end (up = better)")
    ax.set_title("Learning vs forgetting (upper left is best)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_sequence(table: pd.DataFrame, stages: list[dict], matrix: pd.DataFrame, title: str = "") -> Figure:
    """A sequence of new tasks: the matrix R[i][j] as a heatmap (left) and every stage's task
    scored across all stages (right), the stages shaded and their boundaries marked.

    Each task is read in its primary metric. When they all share one (the usual accuracies), the
    heatmap has one colour scale; when they differ (a stage of text scored in bits per byte beside
    accuracies), each column is coloured on its own scale, better values brighter, and the right
    panel gives the second metric an axis of its own."""
    fig = Figure(figsize=(12, 4.2))
    heat, curves_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.5]})
    lines, kinds = {}, {}
    for name in matrix.columns:
        part = table[table["task"] == name]
        metric = primary_metric(list(part["metric"].unique()))
        lines[name] = part[part["metric"] == metric].sort_values("step")
        kinds[name] = (metric, bool(lines[name]["higher_is_better"].iloc[0]))
    values = matrix.to_numpy(float)
    mixed = len(set(kinds.values())) > 1
    if mixed:  # each column on its own scale, better brighter
        shown = np.full_like(values, np.nan)
        for j, name in enumerate(matrix.columns):
            column = values[:, j] if kinds[name][1] else -values[:, j]
            low, high = np.nanmin(column), np.nanmax(column)
            shown[:, j] = (column - low) / (high - low) if high > low else 0.5
        image = heat.imshow(shown, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    else:
        shown = values
        image = heat.imshow(values, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(values))), aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        dark = not np.isnan(shown[i, j]) and shown[i, j] < 0.5
        heat.text(
            j,
            i,
            "–" if np.isnan(v) else f"{v:.2f}",
            ha="center",
            va="center",
            color="white" if dark else "black",
            fontsize=9,
        )
    labels = [f"{name}\n({kinds[name][0]})" if mixed else name for name in matrix.columns]
    heat.set_xticks(range(values.shape[1]), labels, rotation=20, fontsize=8)
    heat.set_yticks(range(values.shape[0]), matrix.index, fontsize=8)
    heat.set_xlabel("scored on task")
    heat.set_title(
        "matrix R[i][j] (each column its own scale)" if mixed else f"matrix R[i][j]: {kinds[matrix.columns[0]][0]}"
    )
    bar = fig.colorbar(image, ax=heat, fraction=0.046)
    if mixed:
        bar.set_ticks([0, 1], labels=["worse", "better"])
        bar.set_label("within each column", fontsize=8)
    else:
        bar.set_label(kinds[matrix.columns[0]][0], fontsize=8)
    colors = run_colors(matrix.columns)
    for k, stage in enumerate(stages):
        curves_ax.axvspan(stage["start"], stage["end"], color="grey", alpha=0.08 if k % 2 else 0.0)
        curves_ax.axvline(stage["end"], color="grey", linewidth=0.8, linestyle=":")
    metrics_shown = list(dict.fromkeys(kinds.values()))
    axes = {metrics_shown[0]: curves_ax}
    if len(metrics_shown) == 2:  # a second metric on its own axis, e.g. bits per byte beside accuracy
        axes[metrics_shown[1]] = curves_ax.twinx()
    for name, line in lines.items():
        ax = axes.get(kinds[name], curves_ax)
        label = f"{name} (right axis)" if ax is not curves_ax else name
        ax.plot(line["step"], line["value"], marker="o", markersize=3, color=colors[name], label=label)
    for (metric, higher), ax in axes.items():
        ax.set_ylabel(
            f"{metric} ({'up' if higher else 'down'} = better)"
            if len(metrics_shown) <= 2
            else "score (each task's primary metric)"
        )
    curves_ax.set_xlabel("training step (stages shaded; dotted lines end a stage)")
    curves_ax.set_title("every task across the stages")
    curves_ax.grid(alpha=0.3)
    handles = [h for ax in axes.values() for h in ax.get_legend_handles_labels()[0]]
    curves_ax.legend(handles=handles, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_replay(logs: dict[str, pd.DataFrame]) -> Figure:
    """Replay runs, one panel each: the new-task loss and the replay loss against step (log scale:
    a memorised buffer shows as a replay loss falling towards 0), with a tick on the x axis at
    every step where the replay buffer was drawn (before training, at each stage, at each refresh).

    ``logs``: per run, its training log with columns step, new_loss, replay_loss and, on the rows
    of buffer draws, replay_refresh (the number of samples drawn)."""
    fig, axes = _panels(len(logs), 2, (5.6, 3.4))
    for ax, (run, log) in zip(axes, logs.items()):
        losses = log.dropna(subset=["new_loss"]).sort_values("step")
        ax.plot(losses["step"], losses["new_loss"], marker=".", color="tab:blue", label="new-task loss")
        ax.plot(losses["step"], losses["replay_loss"], marker=".", color="tab:orange", label="replay loss")
        ax.set_yscale("log")
        draws = log["step"][log["replay_refresh"].notna()] if "replay_refresh" in log else pd.Series(dtype=float)
        ax.plot(
            draws,
            [0.0] * len(draws),
            "|",
            color="black",
            markersize=12,
            clip_on=False,
            transform=ax.get_xaxis_transform(),
            label=f"buffer drawn ({len(draws)}x)",
        )
        ax.set_title(run)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Replay: new-task and replay losses\n(ticks: where the buffer was drawn)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_sweep(table: pd.DataFrame, target: float | None = None, title: str = "") -> Figure:
    """A sweep (:mod:`forgetscope.sweep`): forgetting of what the model knew and the new task's
    score at the end, and with a ``target`` the forgetting at matched learning and the steps to the
    target, against the swept value (or, when the values are not numbers, such as model references, the parameter count),
    one line per recipe; a recipe run at one value is a single point beside the others."""
    numeric = bool(pd.to_numeric(table["value"], errors="coerce").notna().all())
    # model references of different sizes: their parameter counts; of one size (seeds, depths at one
    # count): the references themselves, one place each
    by_size = not numeric and table.groupby("params")["value"].nunique().max() == 1
    order = {v: i for i, v in enumerate(dict.fromkeys(table["value"]))}
    x = pd.to_numeric(table["value"]) if numeric else table["params"] if by_size else table["value"].map(order)
    table = table.assign(x=x.astype(float))
    panels = [
        ("forgetting", "forgetting of the earlier tasks at the end"),
        ("new_final", "new task at the end (learning)"),
    ]
    if target is not None:
        panels += [
            ("forgetting_at_target", f"forgetting when the new task reaches {target:g}"),
            ("steps_to_target", f"steps until the new task reaches {target:g}"),
        ]
    fig, axes = _panels(len(panels), 2, (5.0, 3.6))
    colors = run_colors(table["recipe"])
    for ax, (column, label) in zip(axes, panels):
        for recipe, line in table.groupby("recipe", sort=False):
            line = line.sort_values("x")
            ax.plot(line["x"], line[column], marker="o", color=colors[recipe], label=recipe)
            never = line[line[column].isna()]["x"] if column in ("forgetting_at_target", "steps_to_target") else []
            if len(never):  # a run that never reached the target: marked on the panel's top edge, not left out
                ax.plot(never, [0.97] * len(never), "x", color=colors[recipe], transform=ax.get_xaxis_transform())
        if column in ("forgetting_at_target", "steps_to_target") and table[column].isna().any():
            ax.plot([], [], "x", color="grey", label="never reached (top edge)")
            ax.legend(fontsize=7, loc="lower right")
        if (numeric or by_size) and table["x"].max() >= 10 * table["x"].min() > 0:
            ax.set_xscale("log")
        ticks = sorted(table["x"].unique())
        if numeric or by_size:
            labels = [f"{v:g}" if numeric else f"{v / 1000:.0f}k" for v in ticks]
        else:
            labels = [name.replace("scratch:", "").replace(",", "\n") for name in order]
        ax.set_xticks(ticks, labels, fontsize=8 if numeric or by_size else 6)
        ax.minorticks_off()
        ax.set_xlabel(str(table["key"].iloc[0]) if numeric or not by_size else "parameters (model size)")
        drop = f"{table['metric'].iloc[0]} forgotten since R[j][j]\n(up = worse)"
        ax.set_ylabel(
            {
                "forgetting": drop,
                "forgetting_at_target": drop,
                "new_final": "score",
                "steps_to_target": "steps into the fine-tune",
            }[column],
            fontsize=8,
        )
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_drift_forgetting(points: pd.DataFrame, r2: float, probe: str, colors: dict[str, str] | None = None) -> Figure:
    """A label-free drift probe (x, e.g. the KL from the base on new-task prompts) against the
    general forgetting measured at the same snapshot (y), every run's snapshots joined in step
    order, with the least-squares line over all points and its R^2 (``points``: run, step, drift,
    forgetting, from :func:`forgetscope.metrics.drift_vs_forgetting`; ``colors``: :func:`run_colors`)."""
    colors = colors or run_colors(points["run"])
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for run, line in points.groupby("run", sort=False):
        line = line.sort_values("step")
        ax.plot(
            line["drift"],
            line["forgetting"] * 100,
            marker="o",
            markersize=4,
            linewidth=0.8,
            color=colors[run],
            label=run,
        )
    if len(points) >= 2 and points["drift"].nunique() > 1:
        slope, intercept = np.polyfit(points["drift"], points["forgetting"] * 100, 1)
        xs = np.linspace(points["drift"].min(), points["drift"].max(), 50)
        ax.plot(
            xs,
            intercept + slope * xs,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"least squares, R² = {r2:.2f}",
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"{probe} (label-free, at the snapshot)")
    ax.set_ylabel("general forgetting (% mean relative drop)")
    ax.set_title("Does the cheap probe predict forgetting?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
