"""The lm-eval bridge: score a model that is already in memory, keep per-item results, cache them.

Tasks come from lm-eval's registry plus ``evals/`` (shipped with forgetscope) and a recipe's
``evals.include`` folders (:mod:`forgetscope.registry`). lm-eval's request cache is never used: it ignores model identity and
would silently return the first snapshot's scores for every later one. forgetscope's own result
cache is keyed by what determines a score: the model's weights, the task's config, items, few-shot
items and the source of the modules its ``!function`` hooks live in, the lm-eval version, the limit,
the seeds and the prompt format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

from forgetscope import data, distributed, io, seams
from forgetscope.errors import UserError
from forgetscope.models import cache_dir
from forgetscope.recipe import EvalConfig
from forgetscope.registry import evals_dir, include_paths, lm_eval_metrics, manager_for, quiet_lm_eval

MAX_LENGTH = 2048  # context cap for scoring; also bounds lm-eval's batch-size search on CUDA
BOOTSTRAP_ITERS = 1000  # stderr of perplexity-style metrics; lm-eval's default 100000 takes minutes
# lm-eval's default seeds (``simple_evaluate``'s, and ``lm_eval run --seed 0,1234,1234,1234``): python's
# random, numpy, torch and the few-shot sampler (which examples a task's random sampler draws)
SEEDS = {
    "random": DEFAULT_RANDOM_SEED,
    "numpy": DEFAULT_OTHER_SEED,
    "torch": DEFAULT_OTHER_SEED,
    "fewshot": DEFAULT_OTHER_SEED,
}
DRIFT_TASK = "base_samples_ppl"  # needs samples from the base model, drawn once per base


# ---------------------------------------------------------------- fingerprints and the cache


def _normalise(name: str) -> str:
    """A parameter's name without peft's wrappers, so a LoRA-wrapped base hashes like the base."""
    return name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")


def _is_adapter(name: str) -> bool:
    """Whether a parameter belongs to a peft adapter: LoRA weights, or the trained copies of
    ``modules_to_save`` (e.g. a resized embedding and output layer)."""
    return "lora_" in name or ".modules_to_save." in name


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
        adapter = _is_adapter(name)
        if (base_only and adapter) or (base is not None and not adapter):
            continue
        digest.update(_normalise(name).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


_TOKENIZER_FPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (what may change, hash)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what a tokenizer does to text: its class, its whole pipeline (vocabulary, merges,
    normalizer, pre- and post-processor: the fast tokenizer's serialisation, without the
    truncation and padding state calls leave on it; a slow one's vocabulary), special tokens and
    chat template. Two tokenizers of the same weights that differ here score differently. Kept per
    tokenizer while its size, special tokens and template stay (hashing SmolLM2's takes ~1 s)."""
    mutable = json.dumps([len(tokenizer), tokenizer.special_tokens_map, tokenizer.chat_template], default=str)
    known = _TOKENIZER_FPS.get(tokenizer)
    if known and known[0] == mutable:
        return known[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        for state in ("truncation", "padding"):
            pipeline.pop(state, None)
    else:
        pipeline = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps([type(tokenizer).__name__, pipeline, mutable]).encode()).hexdigest()[:20]
    _TOKENIZER_FPS[tokenizer] = (mutable, digest)
    return digest


class EvalError(UserError):
    """An eval cannot be used as asked (its data is missing, its YAML is broken, it is listed twice)."""


@dataclass
class EvalSuite:
    """The evals of a run, prepared once: lm-eval task specs, each eval's content hash, roles.

    An eval is what lm-eval reports one score for: a task, or a group that aggregates its
    subtasks (``mmlu``). A tag (``ai2_arc``) or a group without an aggregate gives one eval per
    task it holds, as lm-eval reports them."""

    config: EvalConfig
    paths: list[str]
    chat: bool
    roles: dict[str, str] = field(default_factory=dict)  # eval -> "new" | "general"
    sources: dict[str, str] = field(default_factory=dict)  # eval -> the name the recipe lists it under
    specs: dict[str, Any] = field(
        default_factory=dict
    )  # listed name -> lm-eval spec: name, or config dict (drift probe)
    hashes: dict[str, str] = field(default_factory=dict)  # eval -> hash of its config and items
    members: dict[str, list[str]] = field(default_factory=dict)  # eval -> its leaf tasks
    by_size: dict[str, dict[str, bool]] = field(default_factory=dict)
    """group eval -> {metric: whether lm-eval weighs its subtasks by size} (``weight_by_size``)"""
    base_fingerprint: str | None = None  # of the frozen base under LoRA snapshots (None: hash them whole)
    lines_per_pass: int | None = None  # `batch_size: auto`: found when the first snapshot is scored, then kept


def prepare_suite(
    config: EvalConfig, base_dir: Path, chat: bool, base_model=None, tokenizer=None, base_fingerprint: str | None = None
) -> EvalSuite:
    """Resolve the evals once per run, loading every task's data: a standard lm-eval task whose
    dataset is neither cached nor downloadable is one :class:`EvalError` line, raised before
    anything trains or is written. ``base_model`` is the untouched base: its fingerprint
    (``base_fingerprint``, hashed here when not given) keys the cache entries of LoRA snapshots
    on top of it, and the drift probe samples text from it (cached on disk per base)."""
    suite = EvalSuite(config, include_paths(config, base_dir), chat)
    manager = manager_for([*config.new, *config.general], suite.paths)
    loaded, problems, owners = {}, [], {}
    for role, names in (("new", config.new), ("general", config.general)):
        for name in names:
            suite.specs[name] = name
            if name != DRIFT_TASK:  # its data is the base's samples, drawn below once the rest loaded
                try:
                    loaded[name] = manager.load(name)
                except ConnectionError as err:  # datasets' error for data neither cached nor reachable
                    problems.append(_unavailable(name, err))
                    continue
                except FileNotFoundError as err:  # a task YAML of yours whose data_files are not there
                    problems.append(f"evals: {name!r}: its data is missing ({err}); fix the task's data_files path")
                    continue
                # a broken task YAML: a `!function` that does not import (or whose module does not
                # compile, or that raises), a split or field its data lacks, a bad value, a template
                # that cannot render, a group naming a task lm-eval does not know
                except Exception as err:
                    problem = _unbuildable(name, manager, err, suite.paths[1:])
                    if problem is None:  # one of forgetscope's own evals: a bug, with its traceback
                        raise
                    problems.append(problem)
                    continue
                problems += [
                    p for leaf, task in loaded[name]["tasks"].items() if (p := _misconfigured(leaf, task, manager))
                ]
            for scored, leaves in (_scored_evals(name, loaded[name]) if name in loaded else {name: [name]}).items():
                for leaf in leaves:
                    if leaf in owners:
                        where = "" if owners[leaf] == name else f" (in {owners[leaf]!r} and in {name!r})"
                        problems.append(f"evals: {leaf!r} is listed twice{where}; list it once")
                    owners[leaf] = name
                suite.roles[scored], suite.sources[scored], suite.members[scored] = role, name, sorted(leaves)
    if problems:
        raise EvalError("\n".join(problems))
    if base_model is not None and base_fingerprint is None:
        base_fingerprint = fingerprint(base_model, base_only=True)
    suite.base_fingerprint = base_fingerprint
    if DRIFT_TASK in suite.specs:
        from forgetscope import sampling

        samples = sampling.base_samples(base_model, tokenizer, base_fingerprint)
        spec = seams.load_task_yaml(evals_dir() / f"{DRIFT_TASK}.yaml")
        spec["metadata"] = {**spec.get("metadata", {}), "samples": str(samples)}
        suite.specs[DRIFT_TASK] = spec
        loaded[DRIFT_TASK] = manager.load(spec)
    for scored, name in suite.sources.items():
        leaves = loaded[name]["tasks"]
        digests = [_task_digest(leaf, leaves[leaf], config.limit) for leaf in suite.members[scored]]
        group = loaded[name]["groups"].get(scored)
        if group is not None:  # its name and how it aggregates move its scores as much as its tasks do
            aggregates = group.aggregate_metric_list or []
            suite.by_size[scored] = {a.metric: a.weight_by_size for a in aggregates}
            named = [{k: getattr(v, "__qualname__", v) for k, v in vars(a).items()} for a in aggregates]
            digests.insert(0, json.dumps([scored, named], sort_keys=True, default=str))
        suite.hashes[scored] = hashlib.sha256("".join(digests).encode()).hexdigest()[:20]
    return suite


def _task_digest(name: str, task, limit: int | None) -> str:
    """What fixes a task's prompts and scores, as text: its config (``!function`` hooks by name), its
    items (up to ``limit``), the items its few-shot examples are drawn from, and the source of each
    module a hook comes from (a helper a hook calls moves the scores as much as the hook itself)."""
    config = task.config.to_dict(keep_callable=True)
    config.get("metadata", {}).pop("config_source", None)
    config.get("metadata", {}).pop("samples", None)  # a path; the items are hashed below
    hooks: list[Any] = []

    def hook_name(value: Any) -> str:
        if not callable(value):
            return str(value)
        hooks.append(value)
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"

    config_text = json.dumps(config, sort_keys=True, default=hook_name)
    docs = list(task.eval_docs)
    docs = docs[:limit] if limit else docs
    shots = list(task.fewshot_docs() or []) if task.get_config("num_fewshot") else []
    files = {getattr(sys.modules.get(getattr(hook, "__module__", None) or ""), "__file__", None) for hook in hooks}
    sources = {str(f): Path(f).read_text(errors="replace") for f in files if f and str(f).endswith(".py")}
    return json.dumps([name, config_text, docs, shots, sources], sort_keys=True, default=str)


def _yaml_path(manager, name: str) -> Path | None:
    """The YAML file lm-eval's index read ``name`` from (None: a task defined in Python)."""
    entry = manager.task_index.get(name)
    return Path(entry.yaml_path) if entry is not None and entry.yaml_path else None


def _misconfigured(name: str, task, manager) -> str | None:
    """The validation line for a task lm-eval built but cannot score as written (it would log an
    error and go on, or fail once the model has answered): a metric it cannot resolve, stop
    strings that are not text."""
    where = f" ({path})" if (path := _yaml_path(manager, name)) else ""
    unresolved = seams.unresolved_metrics(task)
    if unresolved:
        return f"evals: {name!r}{where}: {_unknown_metric(unresolved[0])}; fix that file"
    if unaggregated := seams.unresolved_aggregations(task):
        return f"evals: {name!r}{where}: the aggregation of {unaggregated[0]!r} is not one lm-eval knows; fix that file"
    until = (task.config.generation_kwargs or {}).get("until") if task.OUTPUT_TYPE == "generate_until" else None
    if until is not None and not (
        isinstance(until, str) or (isinstance(until, list) and all(isinstance(u, str) for u in until))
    ):
        return (
            f"evals: {name!r}{where}: generation_kwargs.until is {until!r}, not text or a list of texts; fix that file"
        )
    return None


def _unknown_metric(metric: str) -> str:
    known = ", ".join(lm_eval_metrics())
    return f"metric {metric!r} is neither one lm-eval registers ({known}) nor one the `evaluate` library could load"


def _unbuildable(name: str, manager, err: Exception, include: list[str]) -> str | None:
    """The validation line for an eval whose task YAML lm-eval cannot build (a ``!function`` that does
    not import or raises, a split or field its data lacks, a misspelt ``output_type``, a group
    naming an unknown task): the eval, its file, why; "fix that file" for a YAML in the ``include``
    folders. None for one of forgetscope's own evals."""
    from forgetscope.schema import did_you_mean

    entry = manager.task_index.get(name)
    path = _yaml_path(manager, name)
    if path is not None and path.resolve().is_relative_to(evals_dir().resolve()):
        return None
    yours = path is None or any(path.resolve().is_relative_to(Path(folder).resolve()) for folder in include)
    where = f" ({path})" if path else ""
    config = (entry.cfg if entry is not None else None) or {}
    splits = {config.get(key) for key in ("test_split", "validation_split", "training_split", "fewshot_split")}
    members = config.get("task") if isinstance(config.get("task"), list) else []
    unknown = [m for m in members if isinstance(m, str) and m not in manager.task_index]
    metrics = [m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, dict)]
    known = set(lm_eval_metrics())
    unregistered = [m for m in metrics if isinstance(m, str) and m not in known]
    if unknown:
        why = f"its task list names {unknown[0]!r}, which lm-eval does not know{did_you_mean(unknown[0], manager.task_index)}"
    elif isinstance(err, KeyError) and err.args and err.args[0] is not None and err.args[0] in splits:
        why = f"no split {err.args[0]!r} in its data"
    elif isinstance(err, KeyError) and unregistered:  # lm-eval looked up its aggregation and found none
        why = _unknown_metric(unregistered[0])
    else:
        why = " ".join(f"{type(err).__name__}: {err}".split())
    fix = "fix that file" if yours else "a task lm-eval ships: check its data in the HF datasets cache"
    return f"evals: {name!r}{where}: lm-eval cannot build it ({why}); {fix}"


def _scored_evals(name: str, loaded: dict) -> dict[str, list[str]]:
    """{eval: its leaf tasks} for one listed name and what lm-eval loaded for it: a task is one
    eval, a group with an aggregate one eval over all its tasks, a group without one (or a tag)
    the evals of its children."""
    from lm_eval.api.group import Group

    def scored(item) -> dict[str, list[str]]:
        if not isinstance(item, Group):
            return {item.task_name: [item.task_name]}
        if item.has_aggregation:
            return {item.name: [task.task_name for task in item.get_all_tasks()]}
        return {k: v for child in item for k, v in scored(child).items()}

    group = loaded["groups"].get(name)
    return scored(group) if group is not None else {task: [task] for task in loaded["tasks"]}


def _unavailable(name: str, err: Exception) -> str:
    """The validation line for an eval whose dataset is neither in the datasets cache nor reachable."""
    import re

    from datasets import config as datasets_config

    repo = re.search(r"reach '([^']+)'", str(err))
    dataset = f" (Hugging Face dataset {repo[1]!r})" if repo else ""
    why = "HF_DATASETS_OFFLINE is set" if datasets_config.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
    return (
        f"evals: {name!r}: its data{dataset} is not in the Hugging Face datasets cache and {why}; cache it once "
        f'where the network is reachable (HF_DATASETS_OFFLINE unset): python -c "from lm_eval.tasks import '
        f"TaskManager; TaskManager().load('{name}')\", or set HF_DATASETS_CACHE to a cache that holds it"
    )


def prompt_format(suite: EvalSuite, task: str) -> str:
    """How an eval's prompts are rendered: ``chat`` (new-task evals, chat-template bases), ``joined``
    (new-task evals on plain bases: context and target joined as training joined them, see
    :func:`_join_like_training`) or ``own`` (general probes: the task's own format)."""
    if suite.roles.get(task) != "new":
        return "own"
    return "chat" if suite.chat else "joined"


def _cache_path(suite: EvalSuite, task: str, model_fp: str, device: str) -> Path:
    """Where the result of ``task`` on the model ``model_fp`` (its weights' and its tokenizer's
    fingerprints) is cached: keyed by everything that moves a score (the scorer's version and the
    device kind too: CUDA and CPU kernels round differently)."""
    from forgetscope.scoring import SCORER_VERSION

    key = json.dumps(
        [
            model_fp,
            suite.hashes.get(task, task),
            version("lm_eval"),
            suite.config.limit,
            SEEDS,
            prompt_format(suite, task),
            suite.config.precision,
            SCORER_VERSION,
            device,
        ]
    )
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


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and CUDA) random states as the block found them. Scoring
    seeds them as lm-eval does; without this, training after a snapshot (its dropout) would depend on
    whether the snapshot's scores came from the result cache."""
    import random

    import numpy as np

    kept = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(kept[0])
            np.random.set_state(kept[1])


def evaluate_model(model, tokenizer, suite: EvalSuite) -> dict[str, Any] | None:
    """Score ``model`` on the suite; reuse cached results for tasks already scored on these weights
    with this tokenizer.

    New-task evals see prompts exactly as training did: rendered with the chat template when
    training used it (``suite.chat``), else with context and target joined as training joined
    them; general probes use each task's own format. A peft model whose LoRA adapters change
    nothing yet (every ``lora_B`` zero: step 0 of a LoRA run) shares its cache entries with the
    plain base; any other adapter counts in the key (an adapter handed over to train on is not the
    base). Returns ``{"results", "samples", "cached"}``.

    Under several processes every process calls this with the same weights: rank 0 looks the
    results up in the cache, every rank scores its share of the rest, and rank 0 gathers, caches
    and returns them (the other ranks get None).
    """
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    base_only = bool(lora_b) and all(not p.any() for p in lora_b)  # adapters that change nothing yet
    device = model.device.type
    out: dict[str, Any] = {"results": {}, "samples": {}, "cached": []}
    todo: dict[bool, list[str]] = {True: [], False: []}
    if distributed.is_main():
        weights = fingerprint(model, base_only=base_only, base=suite.base_fingerprint if lora_b else None)
        model_fp = f"{weights}-{tokenizer_fingerprint(tokenizer)}"
        for task, role in suite.roles.items():
            hit = _cached(_cache_path(suite, task, model_fp, device))
            if hit:
                out["results"][task], out["samples"][task] = hit["result"], hit["samples"]
                out["cached"].append(task)
            else:
                todo[suite.chat and role == "new"].append(task)
    todo = distributed.broadcast(todo)
    if any(todo.values()):
        from forgetscope.scoring import PackedLM

        quiet_lm_eval()
        was_training = model.training
        model.eval()
        seams.quiet_too_long_warning(tokenizer)
        with seams.tie_weights_skipped(model):
            lm = PackedLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=_lines_per_pass(suite, model),
                max_length=max_length(model),
            )
        try:
            # compiled blocks (train.compile) run eagerly: scoring shapes would each cost a compilation
            with (
                scoring_precision(model, suite.config.precision),
                merged_adapters(model, enabled=not base_only),
                torch.compiler.set_stance("force_eager"),
                random_state_kept(),
            ):
                for use_chat, names in todo.items():
                    if not names:
                        continue
                    listed = dict.fromkeys(suite.sources[n] for n in names)  # a tag is loaded once for its evals
                    raw = _lm_eval(lm, [suite.specs[n] for n in listed], suite, use_chat)
                    if raw is None:  # not rank 0: its share went to rank 0
                        continue
                    for task in names:
                        leaves = suite.members[task]  # a group's items are its subtasks' items
                        result = _summarise(task, raw, suite.roles[task], leaves, suite.by_size.get(task, {}))
                        samples = [
                            row
                            for leaf in leaves
                            for row in _item_rows(raw["samples"][leaf], leaf if len(leaves) > 1 else None)
                        ]
                        io.write_text(
                            _cache_path(suite, task, model_fp, device),
                            json.dumps({"result": result, "samples": samples}, default=str),
                        )
                        out["results"][task], out["samples"][task] = result, samples
        finally:
            model.train(was_training)
    return out if distributed.is_main() else None


def _cached(path: Path) -> dict[str, Any] | None:
    """A cache entry (``{"result", "samples"}``), or None when there is none or it is damaged (cut
    short by a full disk, edited): then the task is scored again and the entry rewritten."""
    try:
        hit = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return hit if isinstance(hit, dict) and {"result", "samples"} <= set(hit) else None


def _lm_eval(lm, specs: list, suite: EvalSuite, use_chat: bool) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` for a model already wrapped: the same default seeds, zero-shot
    default, few-shot examples as chat turns under the chat template (``fewshot_as_multiturn``, as
    ``lm_eval run --apply_chat_template`` gives them) and evaluation, without its reporting
    (environment info runs ``pip list`` in a subprocess, the git hash another: about half a second
    per call). None on ranks but 0."""
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate

    random.seed(SEEDS["random"])
    np.random.seed(SEEDS["numpy"])
    torch.manual_seed(SEEDS["torch"])
    seams.cache_lm_eval_templates()
    loaded = manager_for(list(suite.specs), suite.paths).load(specs)
    joined = {
        leaf for name, leaves in suite.members.items() if prompt_format(suite, name) == "joined" for leaf in leaves
    }
    for name, task in loaded["tasks"].items():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=SEEDS["fewshot"])
        if name in joined:
            _join_like_training(task)
    return evaluate(
        lm=lm,
        task_dict=loaded,
        limit=suite.config.limit,
        cache_requests=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,
        apply_chat_template=use_chat,
        fewshot_as_multiturn=use_chat,
        verbosity="ERROR",
    )


@contextlib.contextmanager
def scoring_precision(model, precision: str) -> Iterator[None]:
    """Score in ``precision`` whatever the training precision: the model's own forward (not the
    autocast wrapper of accelerate's mixed precision), under bf16 autocast only when ``precision``
    is ``bf16``."""
    with (
        seams.plain_forward(model),
        torch.autocast(device_type=model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
    ):
        yield


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


def _join_like_training(task) -> None:
    """Make a new-task eval see its context and target joined as training joins a plain-text
    prompt and completion (:func:`forgetscope.data.completion_delimiter`: a space, unless one side
    has whitespace there). lm-eval puts nothing between a ``loglikelihood`` task's context and
    target, so ``doc_to_text: "{{prompt}}"``, ``doc_to_target: "{{completion}}"`` would score text
    that training never showed; it puts ``target_delimiter`` (a space) before each choice, so
    choices that start with a space (lm-eval's convention for completions) would score two: a
    multiple-choice target loses that delimiter first; requests without a context (mutual
    information's) stay as they are. A ``generate_until`` task's answers lose the delimiter
    training put before the completion (the model answers ``" DED"`` where the target is ``DED``)
    before its filters run."""
    delimiter = task.config.target_delimiter if task.OUTPUT_TYPE == "multiple_choice" else ""

    def join(context: str, target: str) -> tuple[str, str]:
        if not context:
            return context, target
        answer = target[len(delimiter) :] if delimiter and target.startswith(delimiter) else target
        return context, data.completion_delimiter(context, answer) + answer

    def answer(context: str, doc: dict, text: str) -> str:
        target = task.doc_to_target(doc)
        target = target[0] if isinstance(target, list) and target else target
        if isinstance(target, int) and task.config.doc_to_choice is not None:  # an index into the choices
            target = task.doc_to_choice(doc)[target]
        target = str(target)
        trained = data.completion_delimiter(context, target)
        return text[len(trained) :] if trained and text.startswith(trained) else text

    seams.rewrite_loglikelihood_requests(task, join)
    seams.rewrite_generated_text(task, answer)


def _metric_name(metric: str, filter_name: str) -> str:
    """A metric as forgetscope names it: lm-eval's name, with its filter when that is not ``none``
    (``exact_match,strict-match``: gsm8k reports one score per answer-extraction filter)."""
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _summarise(
    task: str, raw: dict[str, Any], role: str, leaves: list[str], by_size: dict[str, bool]
) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` -> ``{"acc": {"value", "stderr", ...}}``;
    ``n`` counts the items of every leaf task (a group's are its subtasks', and it records them and
    ``weight_by_size``: how lm-eval weighed them for each metric, see :attr:`EvalSuite.by_size`)."""
    metrics = raw["results"][task]
    higher = raw.get("higher_is_better", {}).get(task, {})
    summary: dict[str, Any] = {}
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = metrics.get(f"{name}_stderr,{filt}")
        summary[_metric_name(name, filt)] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": bool(higher.get(name, True)),
        }
    counts = [raw.get("n-samples", {}).get(leaf, {}).get("effective") for leaf in leaves]
    entry = {"role": role, "n": None if None in counts else sum(counts), "metrics": summary}
    return {**entry, "subtasks": leaves, "weight_by_size": by_size} if len(leaves) > 1 else entry


def _item_rows(samples: list[dict[str, Any]], subtask: str | None = None) -> list[dict[str, Any]]:
    """lm-eval's per-item records -> one JSON-safe row per item with a stable ``item_id``: the doc's
    ``id`` field, else its index, prefixed by the subtask for the members of a group. lm-eval logs
    an item once per filter; those records merge into one row whose metrics carry the filter's
    name (:func:`_metric_name`) and whose ``filtered_resps`` map each filter to its answer."""
    rows: dict[Any, dict[str, Any]] = {}
    for sample in samples:
        filt = sample.get("filter", "none")
        names = {metric: _metric_name(metric, filt) for metric in sample.get("metrics", [])}
        row = rows.get(sample["doc_id"])
        if row is None:
            row = rows[sample["doc_id"]] = {k: v for k, v in sample.items() if k not in names and k != "filter"}
            row["metrics"] = []
            if filt != "none":
                row["filtered_resps"] = {}
        if filt != "none":
            row["filtered_resps"][filt] = sample.get("filtered_resps")
        for metric, name in names.items():
            row[name] = sample[metric]
            row["metrics"].append(name)
    out = []
    for row in rows.values():
        doc = row.get("doc", {})
        item_id = doc.get("id", row.get("doc_id")) if isinstance(doc, dict) else row.get("doc_id")
        item_id = f"{subtask}/{item_id}" if subtask else item_id
        out.append(json.loads(json.dumps({"item_id": item_id, **row}, default=str)))
    return out
