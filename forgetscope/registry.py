"""Which eval names exist: lm-eval's task registry over forgetscope's ``evals/`` folder, a
recipe's ``evals.include`` folders and lm-eval's own tasks.

Kept apart from :mod:`forgetscope.evaluate` (which scores models) so that a recipe is validated
without importing torch: lm-eval's task index needs neither torch nor transformers.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from pathlib import Path

from forgetscope.recipe import EvalConfig
from forgetscope.schema import did_you_mean


def evals_dir() -> Path:
    """The ``evals/`` folder shipped with forgetscope (works from a checkout and from a wheel)."""
    return Path(str(importlib.resources.files("forgetscope.evals")))


def include_paths(config: EvalConfig, base_dir: Path) -> list[str]:
    """Folders of task YAMLs: forgetscope's evals/ plus the ones ``evals.include`` names."""
    return [str(evals_dir()), *(str((base_dir / p).resolve()) for p in config.include)]


@functools.lru_cache(maxsize=8)
def task_manager(paths: tuple[str, ...], defaults: bool = True):
    """lm-eval's task index over ``paths`` and, with ``defaults``, its own tasks (scanning those
    thousands of YAMLs takes ~10 s; each index is built once per process). lm-eval's log is quieted
    first: its "Task 'x' from ... overrides existing task" lines repeat what validation says of
    names declared twice, and a folder of yours overriding a standard task is what you asked for."""
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()

    return TaskManager(include_path=list(paths), include_defaults=defaults, verbosity="ERROR")


def quiet_lm_eval() -> None:
    """lm-eval's log at errors only (forgetscope says what concerns the user, once)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def manager_for(names: list[str], paths: list[str]):
    """The smallest task index that knows ``names``: the folders in ``paths`` alone when they
    define every name as a plain task (the embedded suite, a user's own YAMLs), else the full one."""
    local = task_manager(tuple(paths), defaults=False)
    return local if set(names) <= set(local.all_subtasks) else task_manager(tuple(paths))


def check_eval_names(names: list[str], paths: list[str]) -> list[str]:
    """Recipe-validation lines for a task or group name two YAMLs in ``paths`` declare
    (:func:`declared_twice`), and for eval names that no registry knows: why, when a YAML in
    ``paths`` declares the name but lm-eval cannot read it, else with a did-you-mean."""
    problems = declared_twice(paths)
    known = set(manager_for(names, paths).all_tasks)
    missing = [name for name in names if name not in known]
    if not missing:
        return problems
    broken = {name: why for path in reversed(paths) for name, why in unusable(Path(path)).items()}  # first path wins
    return problems + [
        f"evals: eval task {name!r} is declared by {broken[name]}; fix that file"
        if name in broken
        else f"evals: unknown eval task {name!r}{did_you_mean(name, known)} (see `forgetscope tasks`)"
        for name in missing
    ]


def task_config(name: str, paths: list[str]) -> dict | None:
    """The config lm-eval's index holds for the YAML task ``name`` (its ``include`` merged in); None
    for a group, a tag, a task defined in Python or a name no registry knows."""
    entry = manager_for([name], paths).task_index.get(name)
    return entry.cfg if entry is not None and entry.kind.name == "TASK" and entry.cfg else None


def lm_eval_metrics() -> list[str]:
    """The metrics lm-eval registers (``acc``, ``exact_match``, ...)."""
    import lm_eval.api.metrics  # noqa: F401 (registers them)
    from lm_eval.api.registry import metric_registry

    return sorted(metric_registry)


def metric_names(config: dict) -> list[str]:
    """The metrics lm-eval scores a task config with: its ``metric_list``, else the defaults of its
    ``output_type`` (``lm_eval.api.registry.DEFAULT_METRIC_REGISTRY``)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    listed = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    return listed or list(DEFAULT_METRIC_REGISTRY.get(config.get("output_type", "generate_until"), []))


def _declared(path: Path) -> tuple[str | None, list[str], str]:
    """The eval a task YAML declares as lm-eval's index reads it (a group's ``group:``, else its
    ``task:``), the tags it puts that task under, and the file's first comment line (for a group, marked as
    one: "group of a, b" when it has none). Read with
    lm-eval's YAML loader, ``include:`` merged and ``!function`` tags left unimported; a file it
    cannot read still shows the name on its ``group:`` or ``task:`` line."""
    import yaml

    from forgetscope import seams

    text = path.read_text(encoding="utf-8", errors="replace")
    comment = next((line.lstrip("# ") for line in text.splitlines() if line.startswith("#")), "")
    try:
        config = seams.load_task_yaml(path, resolve_func=False)
    except (yaml.YAMLError, ValueError, OSError):
        config = {key: value for key in ("group", "task") if (value := _line_value(text, key))}
    name = config.get("group", config.get("task"))
    if not isinstance(name, str) or not name:
        return None, [], comment
    if "group" in config:  # shown as one: its tasks are scored as one eval (with an aggregate)
        members = [t for t in config.get("task") or [] if isinstance(t, str)]
        comment = f"group: {comment}" if comment else f"group of {', '.join(members)}"
    tags = config.get("tag") if "group" not in config else None
    return name, [tags] if isinstance(tags, str) else [t for t in tags or [] if isinstance(t, str)], comment


def _line_value(text: str, key: str) -> str | None:
    """The value of a top-level ``key:`` line in YAML text that does not parse as a whole."""
    import yaml

    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            try:
                value = yaml.safe_load(line).get(key)
            except yaml.YAMLError:
                value = line.split(":", 1)[1].strip()
            return value if isinstance(value, str) else None
    return None


def task_yamls(folder: str | Path) -> list[Path]:
    """The task YAMLs lm-eval indexes in ``folder``: every ``*.yaml`` below it, subfolders included."""
    skipped = {"__pycache__", ".ipynb_checkpoints"}  # as lm-eval's index skips them
    return sorted(p for p in Path(folder).rglob("*.yaml") if not skipped & set(p.relative_to(folder).parts))


def folder_evals(folder: Path) -> dict[str, str]:
    """Evals declared by the YAMLs in ``folder`` (tasks, groups, tags), each with the first comment
    line of its file (a tag: the tasks under it)."""
    evals: dict[str, str] = {}
    tagged: dict[str, list[str]] = {}
    for path in task_yamls(folder):
        name, tags, comment = _declared(path)
        if name:
            evals.setdefault(name, comment)
            for tag in tags:
                tagged.setdefault(tag, []).append(name)
    return {**evals, **{tag: f"tag of {', '.join(names)}" for tag, names in tagged.items() if tag not in evals}}


def declared_twice(paths: list[str]) -> list[str]:
    """Validation lines for a task or group name that two YAMLs in the folders ``paths`` declare:
    lm-eval keeps one of them without a word, so the other is never scored."""
    first: dict[str, Path] = {}
    problems = []
    for folder in dict.fromkeys(str(Path(p).resolve()) for p in paths):
        for path in task_yamls(folder):
            name, _, _ = _declared(path)
            if name and name in first and first[name].is_relative_to(evals_dir().resolve()):
                problems.append(
                    f"evals: {path} declares {name!r}, an eval forgetscope ships; rename your task "
                    "(under one name, its scores would mix with the shipped eval's in reports)"
                )
            elif name and name in first:
                problems.append(
                    f"evals: {name!r} is declared by {first[name]} and by {path}; rename one of them "
                    "(lm-eval would score only one, without a word)"
                )
            elif name:
                first[name] = path
    return problems


def unusable(folder: Path) -> dict[str, str]:
    """Eval tasks declared by YAMLs in ``folder`` that lm-eval cannot read (lm-eval then skips
    them silently): name -> the file and what is wrong with it. Reads each file as lm-eval does
    (its ``!function`` tags imported), so it loads torch: call it to explain, not to validate."""
    import yaml

    from forgetscope import seams
    from forgetscope.schema import yaml_problem

    out = {}
    for path in task_yamls(folder):
        name, _, _ = _declared(path)
        try:
            seams.load_task_yaml(path)
        except yaml.YAMLError as err:
            out[name or path.stem] = f"{path}, {yaml_problem(err)}"
        except (ValueError, OSError, ImportError, AttributeError, SyntaxError) as err:
            out[name or path.stem] = f"{path}, which lm-eval cannot read ({type(err).__name__}: {err})"
    return out
