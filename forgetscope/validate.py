"""Checks of a built recipe: across its fields, against files on disk, and against the registries
(model references, embedded tasks, lm-eval task names, installed ``report_to`` integrations).

:mod:`forgetscope.schema` has already checked keys and types; these checks return one line per
problem, naming the key and the fix, and never change the recipe. The ``check_*`` functions for
a single section also serve :class:`forgetscope.ForgettingCallback`, which takes those sections
without a recipe.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from forgetscope import io, models, registry, snapshots, tasks
from forgetscope.recipe import DATA_FILES, EvalConfig, Recipe, SnapshotConfig, TaskConfig
from forgetscope.schema import did_you_mean

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_task(task: TaskConfig, prefix: str, base_dir: Path) -> list[str]:
    problems = []
    sources = [k for k in ("name", "path", "hf_dataset") if getattr(task, k)]
    if len(sources) != 1:
        problems.append(
            f"{prefix}: give exactly one of `name` (embedded task), `path` (your file) or `hf_dataset`"
            f"; got {', '.join(sources) or 'none'}"
            + (
                f" (set the others to null, e.g. --set {prefix.replace('[', '.').replace(']', '')}.name=null)"
                if len(sources) > 1
                else ""
            )
        )
    if task.name and task.name not in tasks.EMBEDDED_TASKS:
        problems.append(
            f"{prefix}.name: unknown embedded task {task.name!r}{did_you_mean(task.name, tasks.EMBEDDED_TASKS)}"
            f" (embedded: {', '.join(tasks.EMBEDDED_TASKS)}; use {prefix}.path for your own data)"
        )
    if task.path:
        file = base_dir / task.path
        if not file.exists():
            where = "" if Path(task.path).is_absolute() else " (a relative path is read from the recipe's folder)"
            problems.append(
                f"{prefix}.path: no such file {str(file)!r}{where}; give a {', '.join(DATA_FILES)} file "
                "or a folder datasets' save_to_disk wrote"
            )
        elif file.is_file() and file.suffix not in DATA_FILES:
            problems.append(f"{prefix}.path: {file.name!r} is not one of {', '.join(DATA_FILES)}")
    if task.max_examples is not None and task.max_examples <= 0:
        problems.append(f"{prefix}.max_examples: must be positive or null, got {task.max_examples}")
    return problems


def _check_stages(recipe: Recipe, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Problems of a recipe's stages, and the new-task evals of its valid stages in order (a stage's
    evals default to its embedded task's eval; those are checked with the general evals)."""
    problems: list[str] = []
    if isinstance(data.get("evals"), dict) and "new" in data["evals"]:
        problems.append("evals.new: with stages, each stage lists its own evals (stages[i].evals); remove evals.new")
    if isinstance(data.get("task"), dict) or (isinstance(data.get("train"), dict) and "steps" in data["train"]):
        problems.append(
            "task / train.steps: with stages, each stage gives its task and steps (stages.N.task, stages.N.steps); "
            "remove them"
        )
    known = set(registry.folder_evals(registry.evals_dir()))
    new: list[str] = []
    for i, stage in enumerate(recipe.stages):
        prefix = f"stages[{i}]"
        problems += _check_task(stage.task, f"{prefix}.task", recipe.base_dir)
        if stage.steps <= 0 or (stage.lr is not None and stage.lr <= 0):
            problems.append(f"{prefix}: steps and lr must be positive")
        evals = stage.evals or ([stage.task.name] if stage.task.name in known else [])
        if not evals:
            problems.append(f"{prefix}.evals: list the evals of this stage's task (e.g. a task YAML in evals.include)")
        if shared := [e for e in evals if e in new]:  # the accuracy matrix needs a column of its own per stage
            problems.append(
                f"{prefix}.evals: {shared[0]!r} already scores an earlier stage; give each stage a task and eval of its own"
            )
        new += [e for e in evals if e not in new]
    if len(recipe.stages) < 2:
        problems.append("stages: a sequence needs at least 2 stages (one new task: use `task:`)")
    settings = [stage.task.chat_template for stage in recipe.stages]
    if differing := [i for i, setting in enumerate(settings) if setting != settings[0]]:
        i = differing[0]
        problems.append(
            f"stages[{i}].task.chat_template: {settings[i]!r}, but {settings[0]!r} in stages[0]; all stages must "
            "share one chat_template setting (every snapshot scores every stage's evals in one prompt format, and "
            f"replay renders earlier stages' prompts as the current stage does); set {settings[0]!r} in every stage"
        )
    if recipe.replay and recipe.replay.loss == "kl" and recipe.method == "lora":
        problems.append(
            "replay.loss: kl with method: lora compares with the base, not with the model before each "
            "stage; use loss: ntp or method: full for sequences"
        )
    if recipe.replay and recipe.replay.refresh_every is not None and recipe.method == "lora":
        problems.append(
            "replay.refresh_every: with method: lora the adapter-disabled model is the base, not the model "
            "before each stage; use method: full for sequences"
        )
    return problems, new


def check_name(name: str, field: str) -> list[str]:
    """The problem, if any, with a run's name (``field`` says where it came from): it names a
    folder under runs_dir, and must not leave it."""
    if _NAME_RE.match(name) and name not in (".", ".."):
        return []
    return [
        f"{field}: {name!r} must be ASCII letters, digits, '_', '-' or '.', not starting with '.' (it names a folder under runs_dir)"
    ]


def check(recipe: Recipe, data: dict[str, Any]) -> list[str]:
    """Problems of a recipe built from ``data`` (the mapping it was built from: some keys must not be
    given at all) that need more than one field, files, or the registries of models and tasks."""
    problems = check_name(recipe.name, "name")
    problems += io.out_dir_problems(Path(recipe.runs_dir), "runs_dir")
    problems += models.check_reference(recipe.base, recipe.base_dir)

    if recipe.method == "full" and recipe.lora is not None:
        problems.append(
            "lora: LoRA settings on a full fine-tuning run; remove the `lora:` section (--set lora=null) or set method: lora"
        )
    t = recipe.train
    for key in ("lr", "steps", "batch_size", "grad_accum", "seq_len"):
        if getattr(t, key) <= 0:
            problems.append(f"train.{key}: must be positive, got {getattr(t, key)}")
    for key in ("warmup_steps", "weight_decay", "max_grad_norm"):  # max_grad_norm 0: no clipping
        if not getattr(t, key) >= 0:
            problems.append(f"train.{key}: must be 0 or more, got {getattr(t, key)}")
    problems += _check_report_to(t.report_to)
    if t.batch_size > 0 and t.grad_accum > 0 and t.batch_size % t.grad_accum:
        problems.append(f"train.batch_size: {t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if recipe.lora is not None and (recipe.lora.r <= 0 or recipe.lora.alpha <= 0):
        problems.append("lora.r and lora.alpha: must be positive")
    if recipe.lora is not None and not 0 <= recipe.lora.dropout < 1:
        problems.append(f"lora.dropout: must be in [0, 1), got {recipe.lora.dropout}")

    given = data.get("replay") if isinstance(data, dict) else None
    problems += _check_replay(recipe, given if isinstance(given, dict) else {})
    if recipe.replay and t.packing:
        problems.append(
            "train.packing: not with replay (each batch is split between new-task and replay examples); "
            "set train.packing: false"
        )
    problems += _check_cascade(recipe)
    evals = recipe.scored_evals
    if recipe.stages:
        stage_problems, new = _check_stages(recipe, data)
        problems += stage_problems
        evals = dataclasses.replace(evals, new=new)
    else:
        problems += _check_task(recipe.task, "task", recipe.base_dir)

    if recipe.stages:  # each stage snapshots on the schedule applied to its own steps (sequence.schedule)
        shortest = min(range(len(recipe.stages)), key=lambda i: recipe.stages[i].steps)
        note = " (with stages, `at` counts the steps into each stage, and this is the shortest)"
        problems += check_snapshots(recipe.snapshots, recipe.stages[shortest].steps, f"stages[{shortest}].steps", note)
    else:
        problems += check_snapshots(recipe.snapshots, t.steps)
    problems += check_evals(evals, recipe.base_dir)
    return problems


def check_target(recipes: list[Recipe], target: float | None) -> list[str]:
    """The problem, if any, with a ``--target`` for the recipes' new tasks (every stage's, in a
    sequence): a score outside 0..1 on a metric that is a fraction (accuracy, exact match), found
    before any training. Evals whose metric is known only from scores (groups, tasks defined in
    Python) are checked by ``report`` after training."""
    from forgetscope.curves import primary_metric, target_problem  # pandas: only when there is a target

    for recipe in recipes if target is not None else []:
        paths = registry.include_paths(recipe.evals, recipe.base_dir)
        for name in recipe.scored_evals.new:
            config = registry.task_config(name, paths)
            metric = primary_metric(registry.metric_names(config)) if config else None
            problem = target_problem(target, metric, f" of {name}, a new task of {recipe.name}") if metric else None
            if problem:
                return [problem]
    return []


def check_snapshots(s: SnapshotConfig, steps: int | None, length: str = "train.steps", note: str = "") -> list[str]:
    """Problems with a snapshot schedule (``steps``: the training length, when known; ``length``:
    what the user calls it, ``train.steps`` in a recipe, the Trainer's ``max_steps`` in a script,
    ``stages[i].steps`` with stages; ``note``: said after it)."""
    problems = []
    if s.schedule == "log" and s.count < 2:
        problems.append(f"snapshots.count: needs at least 2 (step 0 and the last step), got {s.count}")
    if s.schedule == "every" and (s.every is None or s.every <= 0):
        problems.append("snapshots.every: set a positive interval for schedule: every (e.g. every: 10)")
    if s.schedule == "at":
        if not s.at:
            problems.append("snapshots.at: list the steps for schedule: at (e.g. at: [0, 5, 10, 20])")
        elif steps is not None and steps > 0:
            bad = [x for x in s.at if x < 0 or x > steps]
            if bad:
                problems.append(
                    f"snapshots.at: steps {bad} fall outside 0..{length}={steps}{note}; list steps 0 to {steps}"
                )
    for key in ("every", "at"):
        if getattr(s, key) is not None and s.schedule != key:
            problems.append(
                f"snapshots.{key}: only used with schedule: {key} (schedule is {s.schedule!r}); "
                f"remove it (--set snapshots.{key}=null)"
            )
    return problems


def check_evals(e: EvalConfig, base_dir: Path) -> list[str]:
    """Problems with an eval suite: values, folders, names listed twice, and names no task
    registry knows (checked once the folders are there)."""
    problems = []
    if not e.new and not e.general:
        problems.append("evals: list at least one eval under `new` or `general`")
    if e.limit is not None and e.limit <= 0:
        problems.append(f"evals.limit: must be positive, or null for every item (audit's --limit 0), got {e.limit}")
    if isinstance(e.batch_size, int) and e.batch_size <= 0:
        problems.append(f"evals.batch_size: must be positive or 'auto', got {e.batch_size}")
    for role, names in (("new", e.new), ("general", e.general)):
        problems += [
            f"evals.{role}: {n!r} is listed twice; list it once"
            for n in sorted({n for n in names if names.count(n) > 1})
        ]
    problems += [
        f"evals: {n!r} is listed under new and under general; an eval is one or the other"
        for n in sorted(set(e.new) & set(e.general))
    ]
    folders = [f"evals.include: no such folder {str(base_dir / f)!r}" for f in e.include if not (base_dir / f).is_dir()]
    problems += folders or registry.check_eval_names([*e.new, *e.general], registry.include_paths(e, base_dir))
    return problems


def _check_report_to(names: list[str]) -> list[str]:
    """Names transformers knows as logging integrations, installed."""
    if not names:
        return []  # transformers takes seconds to import: only when there is something to check
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    problems = []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            problems.append(
                f"train.report_to: unknown integration {name!r}{did_you_mean(name, INTEGRATION_TO_CALLBACK)} "
                f"(transformers knows: {', '.join(sorted(INTEGRATION_TO_CALLBACK))})"
            )
        elif name not in get_available_reporting_integrations():
            problems.append(
                f"train.report_to: {name!r} is not installed; pip install {name.replace('_', '-')}, or remove it"
            )
    return problems


def _check_cascade(recipe: Recipe) -> list[str]:
    c = recipe.cascade
    if c is None:
        return []
    if recipe.stages:  # the rest would be said of a single run's settings
        return ["cascade: not available with stages yet; remove the cascade section"]
    problems = [
        f"cascade.cheap: {name!r} is not in evals.general; add it there or drop it from cascade.cheap "
        "(cascade.cheap: [] keeps the KL probe alone)"
        for name in c.cheap
        if name not in recipe.evals.general
    ]
    if not c.cheap and not c.kl:  # every step would wait for nothing and score the full battery
        problems.append("cascade: `cheap: []` with `kl: false` probes nothing; keep one, or remove the cascade")
    if c.every is not None and c.every <= 0:
        problems.append(f"cascade.every: must be positive or null, got {c.every}")
    elif (
        c.every
        and not recipe.stages
        and recipe.train.steps > 0
        and not check_snapshots(recipe.snapshots, recipe.train.steps)
    ):
        scheduled = snapshots.schedule(recipe.snapshots, recipe.train.steps)
        if not snapshots.probe_steps(c.every, scheduled, recipe.train.steps):
            problems.append(
                f"cascade.every: every {c.every} steps of {recipe.train.steps} falls on no step between the "
                f"snapshots ({', '.join(map(str, scheduled))}); probe more often, or null to probe at the snapshots only"
            )
    paths = registry.include_paths(recipe.evals, recipe.base_dir)
    for name in c.cheap if all((recipe.base_dir / f).is_dir() for f in recipe.evals.include) else []:
        config = registry.task_config(name, paths) if name in recipe.evals.general else None
        kind = config.get("output_type") if config else None
        if config is not None and kind != "loglikelihood_rolling":
            problems.append(
                f"cascade.cheap: {name!r} is scored against answers (output_type {kind}); cheap probes are "
                "label-free perplexities of text (output_type loglikelihood_rolling, like base_samples_ppl): drop it "
                "from cascade.cheap, it stays in the full battery"
            )
    if c.cheap_threshold < 0 or c.kl_threshold < 0:
        problems.append("cascade.cheap_threshold and cascade.kl_threshold: must be 0 or more")
    for key in ("kl_prompts", "kl_tokens", "kl_topk"):  # one line each, so a --set giving it is named
        if getattr(c, key) <= 0:
            problems.append(f"cascade.{key}: must be positive, got {getattr(c, key)}")
    return problems


SELF_ONLY = ("prompts", "max_new_tokens", "temperature", "top_p")
"""Replay fields that only self-generated replay reads (``source: data`` rehearses the file as it is)."""


def _check_replay(recipe: Recipe, given: dict[str, Any]) -> list[str]:
    """Problems of the ``replay`` section (``given``: the keys the recipe wrote in it)."""
    r = recipe.replay
    if r is None:
        return []
    problems = []
    if r.source == "data" and (unused := [key for key in SELF_ONLY if key in given]):
        problems.append(
            f"replay.{unused[0]}: only used with source: self (source: data rehearses the file's records as they "
            f"are); remove {', '.join(f'replay.{key}' for key in unused)}"
        )
    if not 0 < r.ratio < 1:
        problems.append(
            f"replay.ratio: must lie strictly between 0 and 1 (the share of each batch that is replay; without "
            f"replay: replay: null), got {r.ratio}"
        )
    for key in ("samples", "max_new_tokens", "topk"):
        if getattr(r, key) <= 0:
            problems.append(f"replay.{key}: must be positive, got {getattr(r, key)}")
    if r.temperature <= 0 or not 0 < r.top_p <= 1:
        problems.append("replay.temperature must be > 0 and replay.top_p in (0, 1]")
    if r.coeff is not None and r.coeff < 0:
        problems.append(f"replay.coeff: must be 0 or more, got {r.coeff}")
    if r.prompts == "tasks" and not recipe.stages:
        problems.append("replay.prompts: `tasks` prompts with the earlier stages' tasks; it needs `stages`")
    needs_path = r.source == "data" or r.prompts == "file"
    if needs_path and not r.path:
        problems.append("replay.path: give the file (old data for source: data, prompts for prompts: file)")
    if r.path and not needs_path:
        problems.append("replay.path: only used with source: data or prompts: file")
    if r.path and not (recipe.base_dir / r.path).is_file():
        where = "" if Path(r.path).is_absolute() else " (a relative path is read from the recipe's folder)"
        problems.append(f"replay.path: no such file {str(recipe.base_dir / r.path)!r}{where}")
    if r.refresh_every is not None and (r.source != "self" or r.refresh_every <= 0):
        problems.append("replay.refresh_every: a positive number of steps, with source: self")
    if recipe.stages and not any(stage.replay for stage in recipe.stages[1:]):
        problems.append(
            "stages: every stage after the first has replay: false, so the `replay` section is never used; "
            "remove it or let a stage replay"
        )
    elif r.refresh_every and r.refresh_every > 0 and r.source == "self":
        replayed = [s.steps for s in recipe.stages[1:] if s.replay] if recipe.stages else [recipe.train.steps]
        if r.refresh_every >= max(replayed):
            run = "the longest stage with replay" if recipe.stages else "the run"
            problems.append(
                f"replay.refresh_every: {r.refresh_every} is not shorter than {run} ({max(replayed)} steps), so "
                "the buffer would never be drawn anew; give a smaller refresh_every, or null to keep the buffer drawn before training"
            )
    t = recipe.train
    if t.batch_size > 0 and 0 < r.ratio < 1 and round(t.batch_size * r.ratio) in (0, t.batch_size):
        problems.append(
            f"replay.ratio: {r.ratio} of train.batch_size={t.batch_size} leaves no room for "
            "replay or for new-task examples; change one of them"
        )
    elif not recipe.stages or any(stage.replay for stage in recipe.stages[1:]):
        problems += _check_replay_batch(recipe)
    return problems


def _check_replay_batch(recipe: Recipe) -> list[str]:
    """Problems of the replay share of each batch, found before any stage trains (else they stop the
    run where replay starts, in a sequence after stage 1). The arithmetic of
    :func:`forgetscope.replay.split_batch` and :meth:`~forgetscope.replay.ReplayTrainer.compute_loss`:
    ``round(batch_size * ratio)`` replay examples a step, the rest new-task ones, both split evenly
    over grad_accum x processes micro-batches; each micro-batch draws its replay examples from the
    buffer without repeats, so the buffer (``samples`` of them) must hold that many. Stages share
    batch_size and grad_accum (a stage sets only its steps and lr): one check covers them all."""
    t, r = recipe.train, recipe.replay
    if t.batch_size <= 0 or t.grad_accum <= 0 or r.samples <= 0 or t.batch_size % t.grad_accum or not 0 < r.ratio < 1:
        return []  # said already
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # as forgetscope.distributed.launched (no torch import here)
    slots = t.grad_accum * processes
    micro = f"the {slots} micro-batches of a step (train.grad_accum={t.grad_accum}" + (
        f" x {processes} processes)" if processes > 1 else ")"
    )
    replay = round(t.batch_size * r.ratio)
    new = t.batch_size - replay
    if new % slots or replay % slots:
        return [
            f"replay.ratio: {r.ratio} of train.batch_size={t.batch_size} gives {new} new-task and {replay} replay "
            f"examples a step, which must each split evenly over {micro}; "
            "change train.batch_size, train.grad_accum or replay.ratio"
        ]
    if replay // slots > r.samples:
        drawn = f"{replay} a step, {replay // slots} in each of {micro}" if slots > 1 else f"{replay} a step"
        return [
            f"replay.samples: the buffer's {r.samples} samples are fewer than the replay examples drawn from it "
            f"without repeats (train.batch_size={t.batch_size} x replay.ratio={r.ratio}: {drawn}); "
            f"give replay.samples: {replay // slots} or more, or a smaller replay.ratio or train.batch_size"
        ]
    return []
