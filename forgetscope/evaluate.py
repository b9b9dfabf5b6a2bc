"""The lm-eval bridge: score a model that is already in memory, keep per-item results, cache them.

Tasks come from lm-eval's registry plus ``evals/`` (shipped with forgetscope) and a recipe's
``evals.include`` folders. lm-eval's request cache is never used: it ignores model identity and
would silently return the first snapshot's scores for every later one. forgetscope's own result
cache is keyed by what determines a score: the model's weights, the task's config and items,
the lm-eval version, the limit, the seed and the prompt format.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.resources
import json
import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

import torch

from forgetscope import distributed, io
from forgetscope.models import cache_dir
from forgetscope.recipe import EvalConfig

MAX_LENGTH = 2048  # context cap for scoring; also bounds lm-eval's batch-size search on CUDA
BOOTSTRAP_ITERS = 1000  # stderr of perplexity-style metrics; lm-eval's default 100000 takes minutes
SEED = 0
DRIFT_TASK = "base_samples_ppl"  # needs samples from the base model, drawn once per base


def evals_dir() -> Path:
    """The ``evals/`` folder shipped with forgetscope (works from a checkout and from a wheel)."""
    return Path(str(importlib.resources.files("forgetscope.evals")))


def include_paths(config: EvalConfig, base_dir: Path) -> list[str]:
    """Folders of task YAMLs: forgetscope's evals/ plus the ones ``evals.include`` names."""
    return [str(evals_dir()), *(str((base_dir / p).resolve()) for p in config.include)]


@functools.lru_cache(maxsize=8)
def task_manager(paths: tuple[str, ...], defaults: bool = True):
    """lm-eval's task index over ``paths`` and, with ``defaults``, its own tasks (scanning those
    thousands of YAMLs takes ~10 s; each index is built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults, verbosity="ERROR")


def manager_for(names: list[str], paths: list[str]):
    """The smallest task index that knows ``names``: the folders in ``paths`` alone when they
    define every name as a plain task (the embedded suite, a user's own YAMLs), else the full one."""
    local = task_manager(tuple(paths), defaults=False)
    return local if set(names) <= set(local.all_subtasks) else task_manager(tuple(paths))


def check_eval_names(names: list[str], paths: list[str]) -> list[str]:
    """Recipe-validation lines for eval names that no registry knows, with a did-you-mean."""
    known = set(manager_for(names, paths).all_tasks)
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"evals: unknown eval task {name!r}{hint} (see `forgetscope tasks`)")
    return problems


def folder_evals(folder: Path) -> dict[str, str]:
    """Eval tasks defined by the YAMLs in ``folder``, with the first comment line of each."""
    out = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        lines = path.read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("task:")), None)
        if name:
            out[name] = next((line.lstrip("# ") for line in lines if line.startswith("#")), "")
    return out


# ---------------------------------------------------------------- fingerprints and the cache


def _normalise(name: str) -> str:
    """A parameter's name without peft's wrappers, so a LoRA-wrapped base hashes like the base."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def fingerprint(model, base_only: bool = False, base: str | None = None) -> str:
    """Hash of a model's weights as they are in memory.

    ``base_only``: ignore adapter (LoRA) weights. ``base``: the fingerprint of the frozen base under
    a peft model, already known; then only the adapter weights are hashed on top of it (hashing
    the 135M weights of the default base takes ~0.6 s, an adapter milliseconds).
    """
    if base is not None and base_only:
        return base
    digest = hashlib.sha256((base or "").encode())
    for name, tensor in sorted(model.state_dict().items(), key=lambda kv: _normalise(kv[0])):
        adapter = "lora_" in name
        if (base_only and adapter) or (base is not None and not adapter):
            continue
        digest.update(_normalise(name).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


@dataclass
class EvalSuite:
    """The evals of a run, prepared once: lm-eval task specs, each task's content hash, roles."""

    config: EvalConfig
    paths: list[str]
    chat: bool
    roles: dict[str, str] = field(default_factory=dict)  # task -> "new" | "general"
    specs: dict[str, Any] = field(default_factory=dict)  # task -> name, or config dict (drift probe)
    hashes: dict[str, str] = field(default_factory=dict)  # task -> hash of its config and items
    members: dict[str, list[str]] = field(default_factory=dict)  # task or group -> its leaf tasks
    base_fingerprint: str | None = None  # of the frozen base under LoRA snapshots (None: hash them whole)
    lines_per_pass: int | None = None  # `batch_size: auto`: found when the first snapshot is scored, then kept


def prepare_suite(config: EvalConfig, base_dir: Path, chat: bool, base_model=None, tokenizer=None,
                  base_fingerprint: str | None = None) -> EvalSuite:
    """Resolve the evals once per run. ``base_model`` is the untouched base: its fingerprint
    (``base_fingerprint``, hashed here when not given) keys the cache entries of LoRA snapshots
    on top of it, and the drift probe samples text from it (cached on disk per base)."""
    from lm_eval.tasks import get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    if base_model is not None and base_fingerprint is None:
        base_fingerprint = fingerprint(base_model, base_only=True)
    suite = EvalSuite(config, include_paths(config, base_dir), chat, base_fingerprint=base_fingerprint)
    manager = manager_for(list(suite.roles), suite.paths)
    for role, names in (("new", config.new), ("general", config.general)):
        for name in names:
            suite.roles[name] = role
            suite.specs[name] = name
            if name == DRIFT_TASK:
                from forgetscope import sampling

                samples = sampling.base_samples(base_model, tokenizer, base_fingerprint)
                spec = load_yaml(evals_dir() / f"{DRIFT_TASK}.yaml")
                spec["metadata"] = {**spec.get("metadata", {}), "samples": str(samples)}
                suite.specs[name] = spec
    _quiet_lm_eval()
    for name, spec in suite.specs.items():
        leaves = _leaf_tasks(get_task_dict([spec], manager))
        suite.members[name] = sorted(leaves)
        digests = []
        for leaf in suite.members[name]:
            config_dump = leaves[leaf].dump_config()
            config_dump.get("metadata", {}).pop("config_source", None)
            config_dump.get("metadata", {}).pop("samples", None)  # a path; the items are hashed below
            docs = list(leaves[leaf].eval_docs)
            docs = docs[: config.limit] if config.limit else docs
            digests.append(json.dumps([leaf, config_dump, docs], sort_keys=True, default=str))
        suite.hashes[name] = hashlib.sha256("".join(digests).encode()).hexdigest()[:20]
    return suite


def _leaf_tasks(task_dict: dict) -> dict[str, Any]:
    """lm-eval's task dict, nested for groups -> {leaf task name: Task}."""
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_leaf_tasks(value))
        else:
            out[key if isinstance(key, str) else key.group_name] = value
    return out


def _quiet_lm_eval() -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _cache_path(suite: EvalSuite, task: str, model_fp: str, device: str) -> Path:
    """Where the result of ``task`` on the weights ``model_fp`` is cached: keyed by everything that
    moves a score (the scorer's version and the device kind too: CUDA and CPU kernels round differently)."""
    from forgetscope.scoring import SCORER_VERSION

    key = json.dumps([model_fp, suite.hashes.get(task, task), version("lm_eval"), suite.config.limit, SEED,
                      suite.chat and suite.roles.get(task) == "new", suite.config.precision, SCORER_VERSION, device])
    return cache_dir() / "results" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _lines_per_pass(suite: EvalSuite, model) -> int:
    """The scorer's batch size: the recipe's, or for ``auto`` one found from the free accelerator
    memory the first time (before training takes its share) and kept for the run."""
    if suite.config.batch_size != "auto":
        return suite.config.batch_size
    if suite.lines_per_pass is None:
        from forgetscope.scoring import auto_lines

        suite.lines_per_pass = auto_lines(model, suite.config.precision)
    return suite.lines_per_pass


def max_length(model) -> int:
    """Scoring context: the model's own limit, capped at MAX_LENGTH."""
    return min(MAX_LENGTH, getattr(model.config, "max_position_embeddings", MAX_LENGTH) or MAX_LENGTH)


def evaluate_model(model, tokenizer, suite: EvalSuite, base_only: bool = False) -> dict[str, Any] | None:
    """Score ``model`` on the suite; reuse cached results for tasks already scored on these weights.

    New-task evals are rendered with the chat template when training used it (``suite.chat``), so
    they see prompts exactly as training did; general probes use each task's own format.
    ``base_only`` marks a model whose adapters have no effect yet (step 0 of a LoRA run), so that it
    shares its cache entries with the plain base. Returns ``{"results", "samples", "cached"}``.

    Under several processes every process calls this with the same weights: rank 0 looks the
    results up in the cache, every rank scores its share of the rest, and rank 0 gathers, caches
    and returns them (the other ranks get None).
    """
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    base_only = base_only or bool(lora_b) and all(not p.any() for p in lora_b)  # adapters that change nothing yet
    device = model.device.type
    out: dict[str, Any] = {"results": {}, "samples": {}, "cached": []}
    todo: dict[bool, list[str]] = {True: [], False: []}
    if distributed.is_main():
        model_fp = fingerprint(model, base_only=base_only, base=suite.base_fingerprint if lora_b else None)
        for task, role in suite.roles.items():
            path = _cache_path(suite, task, model_fp, device)
            if path.is_file():
                hit = json.loads(path.read_text())
                out["results"][task], out["samples"][task] = hit["result"], hit["samples"]
                out["cached"].append(task)
            else:
                todo[suite.chat and role == "new"].append(task)
    todo = distributed.broadcast(todo)
    if any(todo.values()):
        from forgetscope.scoring import PackedLM

        _quiet_lm_eval()
        was_training = model.training
        model.eval()
        lm = PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=_lines_per_pass(suite, model), max_length=max_length(model))
        try:
            # compiled blocks (train.compile) run eagerly: scoring shapes would each cost a compilation
            with (scoring_precision(model, suite.config.precision), merged_adapters(model, enabled=not base_only),
                  torch.compiler.set_stance("force_eager")):
                for use_chat, names in todo.items():
                    if not names:
                        continue
                    raw = _lm_eval(lm, [suite.specs[n] for n in names], suite, use_chat)
                    if raw is None:  # not rank 0: its share went to rank 0
                        continue
                    for task in names:
                        result = _summarise(task, raw["results"][task], raw, suite.roles[task])
                        leaves = suite.members[task]  # a group's items are its subtasks' items
                        samples = [_sample_row(s, leaf if len(leaves) > 1 else None) for leaf in leaves for s in raw["samples"][leaf]]
                        io.write_text(_cache_path(suite, task, model_fp, device), json.dumps({"result": result, "samples": samples}, default=str))
                        out["results"][task], out["samples"][task] = result, samples
        finally:
            model.train(was_training)
    return out if distributed.is_main() else None


def _lm_eval(lm, specs: list, suite: EvalSuite, use_chat: bool) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` for a model already wrapped: the same seeds, zero-shot
    default and evaluation, without its reporting (environment info runs ``pip list`` in a
    subprocess, the git hash another: about half a second per call). None on ranks but 0."""
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    loaded = manager_for(list(suite.roles), suite.paths).load(specs)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=suite.config.limit, cache_requests=False, bootstrap_iters=BOOTSTRAP_ITERS,
                    log_samples=True, apply_chat_template=use_chat, verbosity="ERROR")


@contextlib.contextmanager
def scoring_precision(model, precision: str) -> Iterator[None]:
    """Score in ``precision`` whatever the training precision. accelerate's mixed precision wraps
    ``model.forward`` in bf16 autocast for training (keeping the original as ``_original_forward``);
    scoring calls the original forward, under bf16 autocast only when ``precision`` is ``bf16``."""
    patched = "_original_forward" in vars(model)
    training_forward = model.forward
    if patched:
        model.forward = model._original_forward
    try:
        with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        if patched:
            model.forward = training_forward


@contextlib.contextmanager
def merged_adapters(model, enabled: bool = True) -> Iterator[None]:
    """Score a peft model with its LoRA weights merged into the base (peft's per-layer adapter
    path costs ~15% more per forward pass), then restore the base weights bit for bit: peft's
    unmerge subtracts in floating point and would leave the base drifting. Skipped when the
    copies of the merged weights would not fit in free accelerator memory."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if isinstance(model, PeftModel) else []
    weights = [layer.get_base_layer().weight for layer in layers]
    size = sum(w.numel() * w.element_size() for w in weights)
    fits = model.device.type != "cuda" or torch.cuda.mem_get_info(model.device)[0] > 2 * size
    if not enabled or not layers or not fits or any(layer.disable_adapters or layer.merged for layer in layers):
        yield
        return
    saved = [w.detach().clone() for w in weights]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for w, copy in zip(weights, saved):
                w.copy_(copy)
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


def _sample_row(sample: dict[str, Any], subtask: str | None = None) -> dict[str, Any]:
    """One lm-eval sample, JSON-safe, with a stable ``item_id``: the doc's ``id`` field, else its
    index, prefixed by the subtask for the members of a group."""
    doc = sample.get("doc", {})
    item_id = doc.get("id", sample.get("doc_id")) if isinstance(doc, dict) else sample.get("doc_id")
    if subtask:
        item_id = f"{subtask}/{item_id}"
    return json.loads(json.dumps({"item_id": item_id, **sample}, default=str))
