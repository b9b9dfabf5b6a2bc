"""The lm-eval bridge: score a model that is already in memory and keep per-item results.

Tasks come from lm-eval's registry plus ``evals/`` (shipped with forgetscope) and a recipe's
``evals.include`` folders. lm-eval's request cache is never used: it ignores model identity and
would silently return the first snapshot's scores for every later one.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import logging
from pathlib import Path
from typing import Any

import torch

from forgetscope.recipe import EvalConfig, Recipe

CPU_BATCH_SIZE = 16  # `auto` on CPU: lm-eval's automatic search only reacts to CUDA out-of-memory
MAX_LENGTH = 2048  # context cap for scoring; also bounds lm-eval's batch-size search on CUDA
BOOTSTRAP_ITERS = 1000  # stderr of perplexity-style metrics; lm-eval's default 100000 takes minutes


def evals_dir() -> Path:
    """The ``evals/`` folder shipped with forgetscope (works from a checkout and from a wheel)."""
    return Path(str(importlib.resources.files("forgetscope.evals")))


def include_paths(recipe: Recipe) -> list[str]:
    """Folders of task YAMLs for a recipe: forgetscope's evals/ plus the recipe's own."""
    return [str(evals_dir()), *(str((recipe.base_dir / p).resolve()) for p in recipe.evals.include)]


@functools.lru_cache(maxsize=4)
def task_manager(paths: tuple[str, ...]):
    """lm-eval's task index over its own tasks and ``paths`` (built once per process: it scans thousands of files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), verbosity="ERROR")


def check_eval_names(names: list[str], paths: list[str]) -> list[str]:
    """Recipe-validation lines for eval names that no registry knows, with a did-you-mean."""
    known = set(task_manager(tuple(paths)).all_tasks)
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"evals: unknown eval task {name!r}{hint} (see `forgetscope tasks`)")
    return problems


def _batch_size(config: EvalConfig, device: torch.device) -> int | str:
    if config.batch_size != "auto":
        return config.batch_size
    return "auto" if device.type == "cuda" else CPU_BATCH_SIZE


def evaluate_model(model, tokenizer, recipe: Recipe, chat: bool) -> dict[str, Any]:
    """Score ``model`` on the recipe's new-task and general evals.

    New-task evals are rendered with the chat template when training used it (``chat``), so that
    they see prompts exactly as training did; general probes use each task's own format.
    Returns ``{"results": {task: {...}}, "samples": {task: [...]}}`` with a ``role`` per task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=_batch_size(recipe.evals, model.device),
        max_length=MAX_LENGTH,
    )
    manager = task_manager(tuple(include_paths(recipe)))
    out: dict[str, Any] = {"results": {}, "samples": {}, "configs": {}}
    try:
        for role, names, use_chat in (("new", recipe.evals.new, chat), ("general", recipe.evals.general, False)):
            if not names:
                continue
            raw = simple_evaluate(
                model=lm,
                tasks=list(names),
                limit=recipe.evals.limit,
                task_manager=manager,
                log_samples=True,
                cache_requests=False,
                apply_chat_template=use_chat,
                bootstrap_iters=BOOTSTRAP_ITERS,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
                verbosity="ERROR",
            )
            for task, metrics in raw["results"].items():
                out["results"][task] = _summarise(task, metrics, raw, role)
            out["samples"].update(raw.get("samples", {}))
            out["configs"].update(raw.get("configs", {}))
    finally:
        model.train(was_training)
    return out


def _summarise(task: str, metrics: dict[str, Any], raw: dict[str, Any], role: str) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` -> ``{"acc": {"value", "stderr", ...}}``."""
    higher = raw.get("higher_is_better", {}).get(task, {})
    summary: dict[str, Any] = {}
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = metrics.get(f"{name}_stderr,{filt}")
        summary[name] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": bool(higher.get(name, True)),
        }
    n = raw.get("n-samples", {}).get(task, {}).get("effective")
    return {"role": role, "n": n, "metrics": summary}


def shipped_evals() -> dict[str, str]:
    """Eval tasks in forgetscope's evals/ folder, with the first comment line of each YAML."""
    out = {}
    for path in sorted(evals_dir().glob("*.yaml")):
        lines = path.read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("task:"))
        out[name] = next((line.lstrip("# ") for line in lines if line.startswith("#")), "")
    return out
