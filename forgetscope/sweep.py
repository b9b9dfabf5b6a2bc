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

A sweep folder accumulates: ``sweep.csv`` keeps the rows of earlier sweeps of the same key into
the same folder (a row per run name, replaced when run again), and ``sweep.png`` plots all of
them, so a second sweep (replay at one learning rate) lands beside the first. A folder holds one
key (one x axis), one ``--target`` and one set of ``--set`` overrides (recorded in each row), and
each recipe once at each setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from forgetscope import figures, io, metrics, validate
from forgetscope.curves import in_lm_eval_order, primary_metric
from forgetscope.errors import UserError
from forgetscope.load import NO_REPLAY, RecipeError, load_recipe, overlaps
from forgetscope.recipe import Recipe
from forgetscope.schema import load_yaml
from forgetscope.snapshots import RunLayout

NOT_SWEPT = ("name", "runs_dir")
"""Recipe fields a sweep refuses as ``--key``: they name and place runs, they do not change the training."""


def measure(root: Path, target: float | None) -> dict:
    """Forgetting, steps to ``target`` and forgetting at matched learning of one finished sequence
    run (see the module documentation)."""
    manifest = RunLayout(root).read_manifest()
    stages = manifest.get("stages")
    if not stages or len(stages) < 2:
        raise UserError(
            f"{root}: a sweep measures runs with at least 2 stages (what the model knew, then the fine-tune)"
        )
    table = in_lm_eval_order(pd.read_csv(RunLayout(root).curves), RunLayout(root))

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


def _read_earlier(path: Path, key: str) -> pd.DataFrame | None:
    """The rows of earlier sweeps of ``key`` into the same folder (None: none yet); a damaged file,
    or one made by a sweep of another key, is a one-line error."""
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype={"value": str, "target": str, "set": str})
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err}); move it away, or sweep into another -o folder") from None
    for column in ("run", "recipe", "key", "value"):
        if column not in table.columns:
            raise UserError(
                f"{path}: not a sweep table (no `{column}` column); move it away, or sweep into another -o folder"
            )
    others = sorted(set(table["key"].astype(str)) - {key})
    if others:  # one x axis per folder: rows of another key would be plotted against this one's
        raise UserError(f"{path}: holds a sweep of --key {others[0]}, not {key}; sweep {key} into another -o folder")
    return table


def _check_made_with(earlier: pd.DataFrame | None, path: Path, made_with: dict[str, str]) -> None:
    """Refuse a sweep into a folder whose rows were measured at another ``--target`` or made with
    other ``--set`` overrides: one figure would mix them (tables written before these columns are
    taken as they are)."""
    for column, flag in (("target", "--target"), ("set", "--set")):
        if earlier is None or column not in earlier:
            continue
        theirs = set(earlier[column].fillna("").astype(str)) - {made_with[column]}
        if theirs:
            was = theirs.pop() or "none"
            raise UserError(
                f"{flag} {made_with[column] or '(none)'}: {path} holds rows made with {flag} {was}; give the same "
                f"{flag}, or sweep into another -o folder"
            )


def _check_key(key: str, overrides: list[str]) -> None:
    """Refuse a ``--key`` that is no field, that names or places runs (:data:`NOT_SWEPT`), or that a
    ``--set`` also gives (the same key, a section holding it or a key inside it)."""
    if not key or "=" in key or "" in key.split("."):
        raise UserError(
            f"--key {key!r}: not a field; give one as for --set, e.g. --key train.lr (see forgetscope fields)"
        )
    if key.split(".")[0] in NOT_SWEPT:
        raise UserError(
            f"--key {key}: not a setting of the training (it names or places the runs); "
            f"run each separately with its own --set {key}=..., and choose the sweep's folder with -o"
        )
    for pair in overrides:
        given = pair.partition("=")[0].strip()
        if overlaps(key, given):
            raise UserError(
                f"--set {pair}: gives the swept --key {key} too, which the sweep sets to each of --values; "
                f"leave {key} out of --set"
            )


def _parse_values(values: list[str]) -> None:
    """Refuse a ``--values`` item that is not YAML (before it reaches the recipe as a ``--set``)."""
    for value in values:
        try:
            load_yaml(value)
        except yaml.YAMLError as err:
            raise UserError(
                f"--values {value!r}: not YAML ({str(err).splitlines()[0]}); quote it or close its brackets"
            ) from None


def _load_at(path: str, overrides: list[str], key: str, value: str) -> Recipe:
    """Recipe ``path`` with ``overrides`` and ``key`` set to ``value``. A problem the loader blames on
    that setting is said of ``--key`` (an unknown key, a missing stage) or of ``--values`` (a bad
    value), not of a ``--set`` the user never gave."""
    own = f"--set {key}={value}: "
    try:
        return load_recipe(path, [*overrides, f"{key}={value}"])
    except RecipeError as err:
        problems = []
        for problem in err.problems:
            given, _, rest = problem.partition(": ")
            if problem.startswith(own):
                rest = problem.removeprefix(own)
                field = rest.partition(":")[0]  # the key the problem is about: the swept key or a section of it
                dotted = field.replace("[", ".").replace("]", "")  # validation writes stages[1].lr, --key stages.1.lr
                if "unknown key" in rest and f"{key}.".startswith(dotted + "."):
                    problems.append(f"--key {key}: {rest.removeprefix(field + ': ') if dotted == key else rest}")
                elif rest.startswith(NO_REPLAY):  # a --set would turn replay on; here no --set can give it whole
                    problems.append(
                        f"--key {key}: {path} has no replay, so the sweep would turn replay on with every other "
                        "replay setting at its default; add a `replay:` section to the recipe"
                    )
                else:
                    problems.append(f"--values {value}: {rest}")
            elif given.startswith("--set ") and "=" not in given and f"{key}.".startswith(given[6:] + "."):
                # no item at that index of the recipe's list (``--key stages.5.lr``)
                problems.append(f"--key {key}: {path}: {rest}")
            else:  # the recipe's own problem: said of its file, as the loader says it
                problems.append(f"{err.source}: {problem}" if err.source else problem)
        raise RecipeError(problems, None) from None


def _setting(recipe: Recipe, key: str) -> Any:
    """The value ``key`` (a ``--set`` path: ``train.lr``, ``stages.1.lr``) has in a loaded recipe."""
    node: Any = recipe
    for part in key.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


def _check_earlier(
    earlier: pd.DataFrame, table: Path, path: str, overrides: list[str], key: str, value: str, setting: Any, name: str
) -> None:
    """Refuse run ``name`` (recipe ``path`` at ``key`` = ``value``, loaded as ``setting``) when the
    rows already in ``table`` have it from another recipe, or have this recipe at the same setting
    under another run name (``1e-3`` then ``0.001``): either would put two rows at one x."""
    stem = Path(path).stem
    clash = earlier[(earlier["run"] == name) & (earlier["recipe"] != stem)]
    if len(clash):
        raise UserError(
            f"{path}: {table} already has run {name} from recipe {clash['recipe'].iloc[0]}; "
            "give each recipe its own `name:`"
        )
    for row in earlier[(earlier["recipe"] == stem) & (earlier["run"] != name)].itertuples():
        try:
            same = _setting(load_recipe(path, [*overrides, f"{key}={row.value}"]), key) == setting
        except RecipeError:  # that value no longer loads with these overrides: not this setting
            same = False
        if same:
            raise UserError(
                f"--values {value}: {table} already has {stem} at {key}={row.value} (run {row.run}), "
                "the same setting; drop the value, or sweep into another -o folder"
            )


def _plan(
    recipes: list[str], key: str, values: list[str], overrides: list[str], earlier: pd.DataFrame | None, table: Path
) -> list[tuple[str, str, Recipe]]:
    """Every (recipe stem, value, recipe named ``<recipe name>-<value>``) of the sweep, loaded and
    validated. Refuses a recipe given twice, two values that are the same setting once parsed
    (``1e-3`` and ``0.001``), runs that would share a name, and clashes with the ``earlier`` rows of
    ``table`` (:func:`_check_earlier`): each would put two rows at one x."""
    files = [Path(path).resolve() for path in recipes]
    for i, path in enumerate(recipes):
        if files[i] in files[:i]:
            raise UserError(f"{path}: the recipe is given twice; give each recipe once")
    planned: list[tuple[str, str, Recipe]] = []
    made: dict[str, tuple[str, str]] = {}  # run name -> the (recipe, value) that makes it
    for path in recipes:
        stem = Path(path).stem
        seen: list[tuple[Any, str]] = []  # (setting, value) run so far for this recipe
        for value in values:
            recipe = _load_at(path, overrides, key, value)
            if not recipe.stages:
                raise UserError(
                    f"{path}: a sweep runs recipes of stages (what the model knows, then the fine-tune); add `stages`"
                )
            setting = _setting(recipe, key)
            for other_setting, other in seen:
                if other_setting == setting:
                    same = "given twice" if other == value else f"the same {key} as {other} ({setting!r})"
                    raise UserError(f"--values {value}: {same}; give each value once")
            seen.append((setting, value))
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_.")
            name = f"{recipe.name}-{slug}"
            if name in made:
                other_path, other = made[name]
                fix = (
                    "give each recipe its own `name:`"
                    if other_path != path
                    else "give values that differ in letters or digits"
                )
                raise UserError(
                    f"{path} at {key}={value} and {other_path} at {key}={other} would both be run {name}; {fix}"
                )
            made[name] = (path, value)
            if earlier is not None:
                _check_earlier(earlier, table, path, overrides, key, value, setting, name)
            planned.append((stem, value, dataclasses.replace(recipe, name=name)))
    return planned


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
    ``sweep.png`` into ``out_dir`` (with the rows of earlier sweeps of the same key there). Every
    recipe, value and the folder are checked before anything trains; finished runs are not run again."""
    from forgetscope.runner import check_folder, run

    key, overrides = key.strip(), overrides or []
    _check_key(key, overrides)
    if not values:
        raise UserError("sweep: give at least one value after --values")
    _parse_values(values)
    out = Path(out_dir)
    io.check_out_dir(out, "-o")
    table_path = out / "sweep.csv"
    earlier = _read_earlier(table_path, key)
    planned = _plan(recipes, key, values, overrides, earlier, table_path)
    if problems := validate.check_target([recipe for _, _, recipe in planned], target):
        raise UserError(problems[0])
    made_with = {"target": "" if target is None else f"{target:g}", "set": " ".join(overrides)}
    _check_made_with(earlier, table_path, made_with)
    for _, _, recipe in planned:
        check_folder(recipe)
    rows = []
    for number, (stem, value, recipe) in enumerate(planned, start=1):
        print(f"\nforgetscope: sweep: run {number}/{len(planned)}: {recipe.name} ({key}={value})")
        rows.append({"recipe": stem, "key": key, "value": str(value), **made_with, **measure(run(recipe), target)})
    table = pd.DataFrame(rows)
    if earlier is not None:
        table = pd.concat([earlier[~earlier["run"].isin(table["run"])], table], ignore_index=True)
    io.write_text(table_path, table.to_csv(index=False))
    figures.save(figures.plot_sweep(table, target, title), out / "sweep.png")
    print(f"\nforgetscope: sweep written: {table_path}, {out / 'sweep.png'}\n" + table.round(3).to_string(index=False))
    return table
