"""Figures of forgetting curves (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from forgetscope.curves import primary_metric  # noqa: E402


def primary_metrics(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(task, metric) pairs to plot: each task's primary metric, new tasks first."""
    ordered = table.assign(_new=table["role"] != "new").sort_values(["_new"], kind="stable")
    return [(task, primary_metric(list(group["metric"].unique()))) for task, group in ordered.groupby("task", sort=False)]


def plot_curves(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """One panel per task (three to a row): its primary metric against training step, with a 95%
    band (±1.96 stderr).

    The base (step 0) is marked by a dashed line; x is symlog so dense early snapshots stay readable.
    """
    pairs = primary_metrics(table)
    cols = min(3, len(pairs))
    rows_n = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 3.3 * rows_n), squeeze=False)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax, (task, metric) in zip(axes.flat, pairs):
        rows = table[(table["task"] == task) & (table["metric"] == metric)].sort_values("step")
        role = rows["role"].iloc[0]
        color = "tab:blue" if role == "new" else "tab:red"
        ax.plot(rows["step"], rows["value"], marker="o", color=color)
        if rows["stderr"].notna().any():
            half = 1.96 * rows["stderr"].fillna(0)
            ax.fill_between(rows["step"], rows["value"] - half, rows["value"] + half, color=color, alpha=0.2)
        ax.axhline(rows["value"].iloc[0], color="grey", linestyle="--", linewidth=1, label="base (step 0)")
        arrow = "↑" if rows["higher_is_better"].iloc[0] else "↓"
        ax.set_title(f"{task} ({'new task' if role == 'new' else 'general'})")
        ax.set_ylabel(f"{metric} {arrow} better")
        ax.set_xlabel("training step")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, rows["step"].max() * 1.15)
        ax.set_xticks(rows["step"].tolist(), [str(s) for s in rows["step"]], fontsize=8)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_train_log(log: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Training losses against step: the total loss, and with replay the new-task and replay losses."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for column, label in (("loss", "total loss"), ("new_loss", "new-task loss"), ("replay_loss", "replay loss")):
        if column in log:
            ax.plot(log["step"], log[column], marker=".", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "training losses")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
