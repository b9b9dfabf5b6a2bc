"""Wire transformers' Trainer (+ peft for LoRA) for a recipe, with a snapshot callback.

The callback scores the model *in memory* at every scheduled step (step 0 before the first
update), so a snapshot never has to be reloaded from disk to be evaluated. Under
``accelerate launch`` every process trains and scores its share of each snapshot; the main one
writes the snapshot and the results.

Speed: fused AdamW on CUDA, ``train.packing`` (padding-free batches), ``train.compile``
(regional ``torch.compile`` of the blocks, and the loss); ``train.deterministic`` trades speed for bit-reproducible runs.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from forgetscope import data, distributed, seams
from forgetscope.errors import UserError
from forgetscope.recipe import Recipe


def use_bf16(precision: str) -> bool:
    """Whether to train under bf16 autocast (``auto``: where the hardware runs it natively)."""
    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return seams.cpu_has_bf16()


def check_lora_targets(model, recipe: Recipe) -> None:
    """Before anything is written: ``lora.target_modules`` must name layers of the model (peft
    finds out only when the adapters are added, after the run has started)."""
    targets = recipe.lora.target_modules if recipe.method == "lora" else "all-linear"
    if targets == "all-linear" or any(seams.lora_target_matches(targets, name) for name, _ in model.named_modules()):
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    raise UserError(
        f"lora.target_modules: {targets} names no layer of the base model; its linear layers are "
        f"{', '.join(linear)}, or give all-linear"
    )


def prepare_model(model, recipe: Recipe):
    """Wrap the base model for the recipe's method: peft LoRA adapters, or every weight trainable;
    with ``train.compile``, compile its repeated blocks and its loss."""
    if recipe.method == "full":
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(recipe.train.seed)  # the adapters' initialisation: the same whatever ran before in this process
        lora = recipe.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        with seams.peft_deprecation_quiet():
            model = get_peft_model(model, config)
    if recipe.train.compile:
        compile_blocks(model)
        seams.compile_loss(model)
    return model


def compile_blocks(model) -> int:
    """Regional compilation: ``torch.compile`` every block of the model's runs of identical blocks
    (its decoder layers), in place, so names and state dicts stay as they were. The blocks share one
    compiled graph, so it compiles once instead of once per layer as a whole-model compile would.
    Returns the number of blocks compiled."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            for block in module:
                block.compile()
            count += len(module)
    return count


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite."""

    def __init__(self, step: int, what: str):
        super().__init__(
            f"training diverged at step {step}: {what} is not finite. Earlier snapshots and results are kept. "
            "Try a lower train.lr, more train.warmup_steps, a smaller train.max_grad_norm, or train.precision: fp32"
        )


def check_finite(model, step: int) -> None:
    """Raise :class:`TrainingDiverged` if any trainable weight is NaN or infinite."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise TrainingDiverged(step, f"weight {name}")


class DivergenceGuard(TrainerCallback):
    """Stops training at the first logged loss or gradient norm that is NaN or infinite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "new_loss", "replay_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                raise TrainingDiverged(state.global_step, f"the {key.replace('_', ' ')} ({value})")


class SnapshotCallback(TrainerCallback):
    """Calls ``take(model, step, tokens)`` at step 0 and at every scheduled step, in every process
    (each scores its share of the snapshot; the main one writes it); the scores it returns go to
    ``report`` when set (the Trainer's ``log``, so that its ``report_to`` integrations show them).
    With ``resumable`` it also has the Trainer save its state there (model, optimizer, scheduler,
    RNG), so that an interrupted run resumes from the latest snapshot; ``save_at_end`` saves the
    last step too (a stage that later stages start from). ``probes``: more steps to call ``take``
    at, never saved (the cascade's cheap probes)."""

    def __init__(
        self,
        steps: list[int],
        take: Callable[[object, int, int], dict[str, float] | None],
        resumable: bool = False,
        save_at_end: bool = False,
        probes: list[int] = (),
    ):
        self.steps = set(steps)
        self.probes = set(probes)
        self.take = take
        self.resumable = resumable
        self.save_at_end = save_at_end
        self.report: Callable[[dict[str, float]], None] | None = None

    def _maybe_take(self, state, control, model, step: int) -> None:
        if step not in self.steps | self.probes:
            return
        scores = self.take(model, step, int(state.num_input_tokens_seen))  # every process scores its share
        if scores and self.report is not None:  # the main process's
            should_log = control.should_log
            self.report(scores)
            # the Trainer's log clears should_log; this step's loss must still be logged (on every process alike)
            control.should_log = should_log
        distributed.barrier()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe_take(state, control, model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_take(state, control, model, state.global_step)
        if (
            self.resumable
            and state.global_step in self.steps
            and (state.global_step < state.max_steps or self.save_at_end)
        ):
            control.should_save = True


def make_trainer(
    model, tokenizer, examples: list[dict], recipe: Recipe, output_dir: str, callbacks: list, buffer=None
) -> Trainer:
    """A Trainer for the recipe's optimisation settings. It saves its state only when the snapshot
    callback asks (at snapshot steps, for resuming). With a replay ``buffer``, each batch is split
    between new-task and replay examples."""
    import datasets

    from forgetscope import replay

    t = recipe.train
    # on a GPU two workers collate the next batches while it computes; on a CPU they would take its cores.
    # They persist across epochs: a small task's epoch can be a single step (800 examples, batch 512), and
    # starting two workers every epoch cost ~50 ms a step (measured with a micro model: 78 vs 30 ms a step)
    workers = 2 if torch.cuda.is_available() else 0
    slots = t.grad_accum * distributed.launched()
    if buffer is not None:
        per_device, replay_batch = replay.split_batch(t.batch_size, recipe.replay.ratio, slots)
    else:
        per_device, remainder = divmod(t.batch_size, slots)
        if remainder or per_device == 0:
            raise UserError(
                f"train.batch_size={t.batch_size} must be a multiple of grad_accum x processes "
                f"= {slots}; change train.batch_size or the number of processes"
            )
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=t.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=use_bf16(t.precision),
        use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        full_determinism=t.deterministic,
        logging_steps=max(1, t.steps // 20),
        save_strategy="no",  # the snapshot callback asks for saves, at snapshot steps only
        save_total_limit=1,
        report_to=t.report_to,
        include_num_input_tokens_seen="all" if t.packing else "non_padding",  # a packed batch has no padding
        ddp_find_unused_parameters=False,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        logging_nan_inf_filter=False,  # a NaN loss must show, so that DivergenceGuard stops the run
        # every step gets a full batch (and so the recipe's new-task/replay split); the data repeats anyway
        dataloader_drop_last=len(examples) >= t.batch_size,
    )
    common = dict(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples),
        data_collator=(
            functools.partial(data.pack, capacity=t.seq_len, pad_id=tokenizer.pad_token_id)
            if t.packing
            else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX)
        ),
        processing_class=tokenizer,
        callbacks=[DivergenceGuard(), *callbacks],
    )
    if buffer is None:
        return Trainer(**common)
    return replay.ReplayTrainer(**common, buffer=buffer, recipe=recipe, replay_batch=replay_batch)


def latest_checkpoint(folder: Path) -> str | None:
    """The newest complete Trainer checkpoint in ``folder`` (``trainer_state.json`` is written last,
    so a checkpoint without a readable one was cut short and is removed)."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            complete.append((int(path.name.split("-")[1]), path))
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete)[1]) if complete else None
