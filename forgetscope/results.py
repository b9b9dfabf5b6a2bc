"""Finished runs -> tidy tables, for reports and notebooks.

import forgetscope
curves = forgetscope.load_results(["runs/full_ft", "runs/lora"])   # or ["runs"]: every run inside
items = forgetscope.load_items(["runs/full_ft"], tasks=["world_capitals"])
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from forgetscope import curves, io, stats
from forgetscope.errors import UserError
from forgetscope.snapshots import RunLayout


class ResultsError(UserError):
    """A path given as a run is not one, or two runs share a name."""


def _listed(paths: str | Path | list[str | Path]) -> list[str | Path]:
    """One path, or a list of them, as a list."""
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def run_folders(paths: str | Path | list[str | Path]) -> list[Path]:
    """Run folders (holding ``manifest.json``) named by ``paths`` (one path, or a list of them): a
    run itself, or a folder of runs (every run directly inside, in name order); each once, however
    often it is named.

    A run's name, in every table and report, is its folder's name: for runs made by forgetscope
    that is the recipe's ``name``, and renaming a folder renames the run. Two runs must not share it.
    """
    found: list[Path] = []
    for raw in _listed(paths):
        path = Path(raw)
        if (path / "manifest.json").is_file():
            found.append(path)
            continue
        inside = sorted(p for p in path.glob("*") if (p / "manifest.json").is_file()) if path.is_dir() else []
        if not inside:
            what = "not a forgetscope run (no manifest.json) and no runs inside" if path.exists() else "no such folder"
            raise ResultsError(f"{path}: {what}; pass a folder made by `forgetscope run` or `forgetscope audit`")
        found.extend(inside)
    roots = list(dict.fromkeys(p.resolve() for p in found))  # a run named twice is read once
    by_name: dict[str, Path] = {}
    for root in roots:
        if (other := by_name.setdefault(root.name, root)) != root:
            raise ResultsError(
                f"two runs are both named {root.name!r} ({other} and {root}); a run is named by its folder: "
                "rename one of the folders"
            )
    return roots


def load_runs(paths: str | Path | list[str | Path]) -> list[tuple[Path, pd.DataFrame]]:
    """(folder, tidy curves) of every run in ``paths`` (see :func:`run_folders`): its ``curves.csv``,
    or for a run still going (or stopped) the evaluations it has so far, with ``run`` its folder's
    name, plus a ``chance`` column (the accuracy of guessing, for 0/1 metrics:
    :func:`forgetscope.stats.chance_level`)."""
    runs = []
    for root in run_folders(paths):
        layout = RunLayout(root)
        status = layout.read_manifest().get("status")
        if layout.curves.is_file():
            table = curves.in_lm_eval_order(_read_curves(layout.curves), layout).assign(run=root.name)
        else:
            method = str(layout.read_manifest().get("method", ""))
            table = curves.build_table(layout, run=root.name, recipe=root.name, method=method)
        if table.empty:
            print(f"forgetscope: warning: {root} is {status} with no evaluation yet; left out", file=sys.stderr)
            continue
        if status != "finished":
            print(
                f"forgetscope: warning: {root} is {status}, not finished; its curves stop at step "
                f"{int(table['step'].max())}",
                file=sys.stderr,
            )
        chance = {pair: stats.chance_level(layout, *pair) for pair in set(zip(table["task"], table["metric"]))}
        runs.append(
            (
                root,
                table.assign(chance=[chance[pair] for pair in zip(table["task"], table["metric"])]).astype(
                    {"chance": float}
                ),
            )
        )
    if not runs:
        raise ResultsError(f"{', '.join(map(str, _listed(paths)))}: no run with an evaluation yet; nothing to show")
    return runs


def _read_curves(path: Path) -> pd.DataFrame:
    """A run's ``curves.csv``; one cut short, edited or not UTF-8 is a one-line error naming it."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:  # pandas' parser errors are ValueErrors
        raise io.damaged(path, f"unreadable ({err})") from None
    missing = [c for c in curves.COLUMNS if c not in table.columns]
    if missing:
        raise io.damaged(path, f"lacks columns {', '.join(missing)}")
    return table


def load_results(paths: str | Path | list[str | Path]) -> pd.DataFrame:
    """The tidy curves of every run in ``paths``, in one table (see :mod:`forgetscope.curves` for
    the columns and :func:`load_runs` for where they come from)."""
    tables = [table for _, table in load_runs(paths)]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=curves.COLUMNS)


def load_items(paths: str | Path | list[str | Path], tasks: list[str] | None = None) -> pd.DataFrame:
    """Per-item results of every run, step and task: one row per item and metric, with columns
    run, step, task, item_id, metric, value (the item's score: 0/1 for accuracy; a log-likelihood
    for perplexity-type metrics), weight (1, or the item's words/bytes) and text (the prompt, or
    the scored text, and the right answer). Metrics whose items are not scores (``mcc``, ``f1``:
    gold and prediction) have no rows. Runs are named and found as :func:`run_folders` says."""
    rows = []
    for root in run_folders(paths):
        layout = RunLayout(root)
        for step in layout.eval_steps():
            for path in sorted(layout.eval_dir(step).glob("samples_*.jsonl")):
                task = path.stem.removeprefix("samples_")
                if tasks and task not in tasks:
                    continue
                for sample in io.read_jsonl(path):
                    for metric in sample.get("metrics", []):
                        score = stats.item_score(metric, sample.get(metric))
                        if score is None:  # corpus-level (mcc: gold, prediction)
                            continue
                        num, den = score
                        rows.append(
                            {
                                "run": root.name,
                                "step": step,
                                "task": task,
                                "item_id": str(sample["item_id"]),
                                "metric": metric,
                                "value": float(num),
                                "weight": float(den),
                                "text": item_text(sample),
                            }
                        )
    return pd.DataFrame(rows, columns=["run", "step", "task", "item_id", "metric", "value", "weight", "text"])


def item_texts(layout: RunLayout, task: str) -> dict[str, str]:
    """{item_id: text} of one task, from the base evaluation (step 0)."""
    path = layout.eval_dir(0) / f"samples_{task}.jsonl"
    samples = io.read_jsonl(path) if path.is_file() else []
    return {str(s["item_id"]): item_text(s) for s in samples}


def item_text(sample: dict) -> str:
    """What an item asked: the prompt and the right answer (multiple choice: the gold choice)."""
    arguments = sample.get("arguments") or [[""]]
    target = sample.get("target")
    first = arguments[int(target)] if isinstance(target, int) and 0 <= int(target) < len(arguments) else arguments[0]
    context = str(first[0]) if first else ""
    answer = str(first[1]) if len(first) > 1 and isinstance(first[1], str) else ""
    return f"{context}{answer}" if not answer else f"{context} → {answer.strip()}"
