"""``forgetscope sweep``: run recipes at several values of one field and plot forgetting against it.

This is how the two other findings of Marek et al. 2026 are tested on small models from scratch
(``make capacity``, ``make lr-tradeoff``; the README says what they show):

* **capacity**: the same fine-tune forgets more when the model has less spare capacity: sweep
  ``base`` over widths (``scratch:layers=2,hidden=H,...``), or the first stage's ``steps``;
* **the learning-rate trade-off**: a lower learning rate forgets less at matched learning but
  needs more steps to get there: sweep ``train.lr``, with replay at the high rate beside it.

Each recipe is a sequence of stages; each run is measured on its last stage (the fine-tune) and
the stages before it (what the model knew), from its accuracy matrix and curves:

* ``forgetting``: mean over the earlier tasks ``j`` of ``R[j][j] - R[T][j]``, what each had when
  it was learned minus what is left at the end (sign-flipped where lower is better, such as bits
  per byte: positive is always worse);
* ``steps_to_target``: steps into the last stage until its task first reaches ``target``
  (linear interpolation between snapshots, :func:`forgetscope.metrics.crossing`);
* ``forgetting_at_target``: the same mean drop of the earlier tasks at that step (forgetting at
  matched learning), interpolated linearly between snapshots.

A sweep folder accumulates: ``sweep.csv`` keeps the rows of earlier sweeps into the same folder
(a row per run name, replaced when run again), and ``sweep.png`` plots all of them, so a second
sweep (replay at one learning rate) lands beside the first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from forgetscope import figures, io, metrics
from forgetscope.curves import primary_metric
from forgetscope.errors import UserError
from forgetscope.load import load_recipe
from forgetscope.snapshots import RunLayout


def measure(root: Path, target: float | None) -> dict:
    """Forgetting, steps to ``target`` and forgetting at matched learning of one finished sequence
    run (see the module documentation)."""
    manifest = RunLayout(root).read_manifest()
    stages = manifest.get("stages")
    if not stages or len(stages) < 2:
        raise UserError(
            f"{root}: a sweep measures runs with at least 2 stages (what the model knew, then the fine-tune)"
        )
    table = pd.read_csv(RunLayout(root).curves)

    def series(stage: dict) -> pd.DataFrame:
        rows = table[table["task"] == stage["evals"][0]]
        return rows[rows["metric"] == primary_metric(list(rows["metric"].unique()))].sort_values("step")

    last, earlier = stages[-1], stages[:-1]
    learned = [float(series(s).set_index("step")["value"][s["end"]]) for s in earlier]
    signs = [1.0 if bool(series(s)["higher_is_better"].iloc[0]) else -1.0 for s in earlier]  # drops: positive = worse

    def drop_at(step: float) -> float:
        return float(
            np.mean(
                [
                    sign * (have - np.interp(step, series(s)["step"], series(s)["value"]))
                    for s, have, sign in zip(earlier, learned, signs)
                ]
            )
        )

    new = series(last)
    new = new[(new["step"] >= last["start"]) & (new["step"] <= last["end"])]
    sign = (
        1.0 if bool(new["higher_is_better"].iloc[0]) else -1.0
    )  # cross "at least target" for scores, "at most" for losses
    at = (
        metrics.crossing(new["step"].to_numpy(float), sign * new["value"].to_numpy(float), sign * target)
        if target is not None
        else None
    )
    metric = "/".join(dict.fromkeys(series(s)["metric"].iloc[0] for s in earlier))
    return {
        "run": root.name,
        "params": _parameters(manifest["base_path"]),
        "metric": metric,
        "new_final": float(new["value"].iloc[-1]),
        "learned": float(np.mean(learned)),
        "forgetting": drop_at(last["end"]),
        "steps_to_target": at - last["start"] if at is not None else math.nan,
        "forgetting_at_target": drop_at(at) if at is not None else math.nan,
    }


def _parameters(model_path: str) -> int:
    """The number of parameters of a model folder (its weights' shapes; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in Path(model_path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            total += sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


def _read_earlier(path: Path) -> pd.DataFrame | None:
    """The rows of earlier sweeps into the same folder (None: none yet); a damaged file is a
    one-line error."""
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype={"value": str})
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err}); move it away, or sweep into another -o folder") from None
    if "run" not in table.columns:
        raise UserError(f"{path}: not a sweep table (no `run` column); move it away, or sweep into another -o folder")
    return table


def run_sweep(
    recipes: list[str],
    key: str,
    values: list[str],
    out_dir: str | Path,
    overrides: list[str] | None = None,
    target: float | None = None,
    title: str = "",
) -> pd.DataFrame:
    """Run every recipe at every value of ``key`` (a ``--set`` key, e.g. ``train.lr`` or ``base``;
    values parsed as YAML), named ``<recipe name>-<value>``; measure each run; write ``sweep.csv`` and
    ``sweep.png`` into ``out_dir`` (with the rows of earlier sweeps there). Every recipe and value
    is validated before anything trains; finished runs are not run again."""
    from forgetscope.runner import run

    if not values:
        raise UserError("sweep: give at least one value after --values")
    out = Path(out_dir)
    io.check_out_dir(out, "-o")
    table_path = out / "sweep.csv"
    earlier = _read_earlier(table_path)  # checked before anything trains
    planned = []
    for path in recipes:
        for value in values:
            recipe = load_recipe(path, [*(overrides or []), f"{key}={value}"])
            if not recipe.stages:
                raise UserError(
                    f"{path}: a sweep runs recipes of stages (what the model knows, then the fine-tune); add `stages`"
                )
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_.")
            planned.append((Path(path).stem, value, dataclasses.replace(recipe, name=f"{recipe.name}-{slug}")))
    rows = []
    for number, (stem, value, recipe) in enumerate(planned, start=1):
        print(f"\nforgetscope: sweep: run {number}/{len(planned)}: {recipe.name} ({key}={value})")
        rows.append({"recipe": stem, "key": key, "value": str(value), **measure(run(recipe), target)})
    table = pd.DataFrame(rows)
    if earlier is not None:
        table = pd.concat([earlier[~earlier["run"].isin(table["run"])], table], ignore_index=True)
    io.write_text(table_path, table.to_csv(index=False))
    figures.save(figures.plot_sweep(table, target, title), out / "sweep.png")
    print(f"\nforgetscope: sweep written: {table_path}, {out / 'sweep.png'}\n" + table.round(3).to_string(index=False))
    return table
