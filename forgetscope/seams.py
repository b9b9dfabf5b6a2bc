"""Every place where forgetscope relies on a library's internals, in one module.

Everything else uses lm-eval, transformers, accelerate and torch through their public API. Each
function here wraps one assumption that no public API promises, says which versions it was
checked against (``CHECKED``), and has a test in ``tests/test_seams.py`` that fails with a message
naming the function when a new release breaks the assumption. ``pyproject.toml`` bounds the
libraries to the versions tested.

Two more seams live where they must, as subclass hooks: :class:`forgetscope.scoring.PackedLM`
overrides ``HFLM._loglikelihood_tokens`` (the hook torchtune's evaluation also builds on), and
:class:`forgetscope.replay.ReplayTrainer` overrides ``Trainer.compute_loss`` (a documented hook).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHECKED = {
    "lm_eval": "0.4.13",
    "transformers": "5.17.0 (CUDA), 5.23.0 (CPU)",
    "accelerate": "1.15.0",
    "torch": "2.11.0 (CUDA), 2.13.0 (CPU)",
    "peft": "0.21.0, 0.21.2",
}


# ---------------------------------------------------------------- lm-eval


def load_task_yaml(path: Path, resolve_func: bool = True) -> dict:
    """A task YAML as lm-eval reads it (``include:`` merged; its ``!function`` tags resolved, or
    left unimported as its task index reads them): ``lm_eval.tasks._yaml_loader``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve_func)


@contextlib.contextmanager
def hflm_batch_size(lm, size: int) -> Iterator[None]:
    """``HFLM``'s batch size set to ``size`` for the block: its ``batch_size_per_gpu`` attribute,
    which its ``_loglikelihood_tokens`` and ``loglikelihood_rolling`` read."""
    kept, lm.batch_size_per_gpu = lm.batch_size_per_gpu, size
    try:
        yield
    finally:
        lm.batch_size_per_gpu = kept


def set_hflm_ranks(lm, rank: int, world_size: int) -> None:
    """Tell an ``HFLM`` built around a model in memory which share of the requests is its own
    (lm-eval assumes a single process then): the ``_rank`` and ``_world_size`` behind its
    ``rank`` and ``world_size``, which ``evaluator.evaluate`` reads to split and gather."""
    lm._rank, lm._world_size = rank, world_size


@contextlib.contextmanager
def tie_weights_skipped(model) -> Iterator[None]:
    """``HFLM`` re-ties the input and output embeddings of the model it is handed. A model in
    memory is already as it should be, and re-tying breaks a peft model that trains a copy of a
    tied output layer (``modules_to_save=["lm_head"]``); so ``tie_weights`` does nothing meanwhile."""
    own = vars(model).get("tie_weights")  # an instance attribute set by someone else, kept
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del model.tie_weights
        else:
            model.tie_weights = own


def rewrite_loglikelihood_requests(task, rewrite: Callable[[str, str], tuple[str, str]]) -> None:
    """Have a ``loglikelihood`` or ``multiple_choice`` task pass each request's (context, target)
    through ``rewrite`` as it builds them: wraps the task's ``construct_requests`` and rewrites
    ``Instance.arguments`` (a multiple-choice target is the task's ``target_delimiter`` and a choice)."""
    if task.OUTPUT_TYPE not in ("loglikelihood", "multiple_choice"):
        return
    construct = task.construct_requests

    def rewritten(doc, ctx, **kwargs):
        requests = construct(doc, ctx, **kwargs)
        for request in requests if isinstance(requests, list) else [requests]:
            request.arguments = rewrite(*request.arguments)
        return requests

    task.construct_requests = rewritten


@contextlib.contextmanager
def peft_deprecation_quiet() -> Iterator[None]:
    """peft 0.21 asks transformers 5 through a name it deprecated (``is_gradient_checkpointing``):
    its FutureWarning, printed at every adapter built or loaded, is not the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def unresolved_metrics(task) -> list[str]:
    """The metrics of a task's ``metric_list`` that lm-eval found neither in its registry nor in
    the ``evaluate`` library (it logs an error and scores the task without them): the names in
    ``ConfigurableTask._metric_fn_list`` whose function is None, unless the task computes its
    metrics itself (``process_results``)."""
    if task.config.process_results is not None:
        return []
    return [name for name, fn in task._metric_fn_list.items() if fn is None]


def unresolved_aggregations(task) -> list[str]:
    """The metrics whose ``aggregation`` lm-eval does not know (``ConfigurableTask._aggregation_list``
    holds None for them; scoring fails after the model has answered)."""
    return [name for name, fn in task._aggregation_list.items() if fn is None]


def rewrite_generated_text(task, rewrite: Callable[[str, dict, str], str]) -> None:
    """Have a ``generate_until`` task pass each generated text through ``rewrite(context, doc,
    text)`` before its filters run: wraps the task's ``apply_filters``, which the evaluator calls
    once the model has answered, on rewritten ``Instance.resps`` (restored afterwards, so the
    per-item samples keep what the model said)."""
    if task.OUTPUT_TYPE != "generate_until":
        return
    apply = task.apply_filters

    def rewritten():
        said = [instance.resps for instance in task.instances]
        for instance in task.instances:
            instance.resps = [rewrite(instance.arguments[0], instance.doc, text) for text in instance.resps]
        try:
            return apply()
        finally:
            for instance, resps in zip(task.instances, said):
                instance.resps = resps

    task.apply_filters = rewritten


def cache_lm_eval_templates() -> None:
    """Compile each of lm-eval's Jinja templates once: ``lm_eval.utils.apply_template`` calls
    ``env.from_string`` for every document and field, which compiles the template anew (about
    2,400 compilations a snapshot for the default suite at limit 100: 0.6 s of a CPU core). The
    module's Jinja environment gets a cache of compiled templates keyed by their source; rendering
    is unchanged. Idempotent."""
    from lm_eval import utils

    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=4096)(utils.env.from_string)


def lm_eval_mmlu_exemplars() -> str:
    """The text of lm-eval's ``mmlu/flan_cot_fewshot/_cot_prompts.json`` (a data file of its
    package, not an API): five worked questions for each MMLU subject."""
    import importlib.resources

    return (
        importlib.resources.files("lm_eval") / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    ).read_text()


# ---------------------------------------------------------------- accelerate, torch


@contextlib.contextmanager
def plain_forward(model) -> Iterator[None]:
    """The model's own ``forward`` for the block: accelerate's mixed precision replaces
    ``model.forward`` by an autocast wrapper and keeps the original as ``_original_forward``."""
    patched = "_original_forward" in vars(model)
    wrapped = model.forward
    if patched:
        model.forward = model._original_forward
    try:
        yield
    finally:
        if patched:
            model.forward = wrapped


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX): ``torch.ops.mkldnn``'s check."""
    import torch  # in each function: recipe validation reads task YAMLs through this module, without torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---------------------------------------------------------------- transformers


def average_loss_over_accumulation(trainer) -> None:
    """Have a Trainer whose ``compute_loss`` returns a mean over its micro-batch divide it by the
    gradient accumulation steps, as for a model that takes no ``num_items_in_batch``: its
    ``model_accepts_loss_kwargs`` attribute, which it otherwise sets from the model's signature."""
    trainer.model_accepts_loss_kwargs = False


def attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean ``[batch, 1, queries, keys]`` mask as the model's attention takes it when handed a
    4D mask, which transformers passes through unchanged: boolean for SDPA, additive (0 or the
    dtype's minimum) for the eager implementation (``config._attn_implementation``)."""
    import torch

    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(model.dtype).min
    )


def static_cache(model, length: int):
    """A KV cache of fixed ``length`` for ``model`` (transformers' ``StaticCache``). Its write
    position is ``cache_position`` in some versions and its own running count of tokens in others
    (5.17, 5.23): every forward pass through it must therefore be a real decoding step."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def compile_loss(model) -> None:
    """``torch.compile`` the model's loss (transformers' ``loss_function``, set through its setter;
    on a peft model, the base model's): the logits' upcast to fp32 and the cross-entropy then fuse
    into one kernel each way, so the fp32 logits (batch x length x vocabulary) are never written.
    SmolLM2-135M at 64 x 512 on an H100, blocks compiled: 123.5 → 97.3 ms a step in a plain loop,
    peak memory 39 → 24 GB."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.loss_function = torch.compile(inner.loss_function)


def lora_target_matches(target_modules: str | list[str], name: str) -> bool:
    """Whether peft puts an adapter on the module called ``name`` for ``target_modules`` (a list:
    the name or its last dotted parts; a string: a regular expression matching the whole name):
    ``peft.tuners.tuners_utils.check_target_module_exists``."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(LoraConfig(target_modules=target_modules), name))


def quiet_too_long_warning(tokenizer) -> None:
    """Silence the tokenizer's "Token indices sequence length is longer than the specified maximum
    ... will result in indexing errors" warning: scoring splits long texts into windows itself.
    transformers warns once per tokenizer, marking ``deprecation_warnings`` (5.17, 5.23)."""
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
