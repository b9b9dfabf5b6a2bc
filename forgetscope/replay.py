"""Replay during fine-tuning: self-generated samples of a frozen reference model, or old data.

Before training, the buffer is filled: sequences sampled from the reference itself (``source:
self``: no access to the original training data needed), or examples from a file (``source:
data``). The reference is the untouched base, or in a sequence of stages the model as it was
before the stage. It is cached on disk, keyed by the reference's weights, the sampling settings,
the sequence length and the seed. During training every step's batch is split: ``1 - ratio``
new-task examples and ``ratio`` replay examples, scored in one forward pass, with

    loss = new-task loss + coeff * replay loss

where the replay loss is ``ntp`` (next-token cross-entropy on the replay tokens) or ``kl``
(KL(reference || current) over the replay tokens, averaged per token).

**Token for token.** A self-generated example is exactly the token sequence the reference wrote:
the prompt's ids as they were sampled from (masked: no loss on them) followed by the completion's
ids up to and including its end token. Nothing is decoded and re-tokenized, so a completion that
starts with a space (lm-eval's convention: ``rev 123 =`` -> `` 321``), a chat turn, or a
tokenizer that merges across the prompt/completion boundary is rehearsed exactly as the model
produced it, and exactly as training and evaluation show that task.

**Fresh samples** (``refresh_every: N``): every N steps the buffer is sampled anew from the
reference, from the next prompts of the pool, as Marek et al. 2026 regenerate their replay
samples every 16 batches, so that the stage rehearses the reference's distribution rather than
one fixed set of samples repeated hundreds of times. Where the reference comes from, and what it
costs:

* LoRA: the reference *is* the model with its adapters disabled: no extra memory; ``kl`` costs
  one extra no-grad forward of the replay part per step and is exact.
* full fine-tuning with ``refresh_every``: a frozen copy of the model is kept (made when the
  stage starts), one more copy of the weights in memory: 4 bytes a parameter in fp32 (0.54 GB for
  SmolLM2-135M, 17 MB for the 4.3M-parameter model of `sequence_paper.yaml` from scratch), a quarter more than full
  fine-tuning's own 16 bytes a parameter (weights, gradients, two Adam moments). We keep a copy
  rather than draw every sample up front (enough that none repeats more than a set number of
  times) because the up-front buffer grows with steps x replay batch (2000 steps x 256 replay
  examples at 4 repeats each: 128k samples a stage), its ``kl`` top-k log-probs with it
  (128k x 24 positions x 64 x 12 bytes: 2.4 GB), and its samples would all come from one
  moment of the pool; the copy costs the same sampling compute spread over the stage, and ``kl``
  is then exact (one no-grad forward of the copy per step).
* full fine-tuning without ``refresh_every``: no copy. For ``kl`` the reference's top-k
  log-probs at every replay position are computed once, before training, and stored with the
  buffer: ``samples x seq_len x k`` x 12 bytes (256 x 128 x 64: 25 MB). The KL is then taken over
  k + 1 bins (the top-k tokens and "the rest"), a lower bound of the full KL that is exact when
  the reference's mass sits on its top k tokens, and zero when current equals reference.

Every draw of the buffer is logged (``replay_refresh``: the number of samples, at its step), so
the report can mark where the buffer was refreshed beside the new-task and replay losses.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from forgetscope import data, evaluate, io, sampling, seams
from forgetscope.errors import UserError
from forgetscope.models import cache_dir
from forgetscope.recipe import DATA_FILES, Recipe, ReplayConfig, TaskConfig

BUFFER_FORMAT = 3  # in the cache key: 1 held re-tokenized text, 2 the sampled token ids, 3 chat data labels the newline after the prompt


@dataclass
class ReplayBuffer:
    """Tokenized replay examples (``input_ids``, ``labels``); ``prompts``: in a sequence, the
    earlier stages' prompts that fresh samples are drawn from; for full fine-tuning with ``kl`` and
    no reference copy, the reference's top-k log-probs (``topk_values``/``topk_indices``:
    [examples, positions, k], for positions 0..len-2)."""

    examples: list[dict[str, list[int]]]
    prompts: list[str] | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None


def coeff(config: ReplayConfig) -> float:
    """The replay loss weight: the recipe's, else 10 for ``kl`` (Marek et al. 2026) and 1 for ``ntp``."""
    if config.coeff is not None:
        return config.coeff
    return 10.0 if config.loss == "kl" else 1.0


def _prompt_mode(config: ReplayConfig, tokenizer) -> str:
    if config.prompts != "auto":
        return config.prompts
    return "chat" if getattr(tokenizer, "chat_template", None) else "bos"


def _read_prompts(path: Path) -> list[str]:
    if path.suffix != ".txt":
        records = data.read_file(path)
        prompts = (data.prompt_of(r, TaskConfig(name=None)) or r.get("text") for r in records)
        return [p for p in prompts if isinstance(p, str) and p.strip()]
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None


def check_file(recipe: Recipe, tokenizer) -> None:
    """Before anything is written: ``replay.path`` is usable. With ``source: data``, a data file
    (:data:`forgetscope.recipe.DATA_FILES`) whose records tokenize as training data does; with ``prompts: file``, a file of at
    least one prompt. Errors name ``replay.path``."""
    config = recipe.replay
    if config is None or not config.path:
        return
    path = recipe.base_dir / config.path
    try:
        if config.source != "data":
            if not _read_prompts(path):
                raise UserError("holds no prompts; put one prompt a line (.txt) or a `prompt` field a record")
        elif path.suffix not in DATA_FILES:
            raise UserError(f"replay from data takes a {', '.join(DATA_FILES)} file of records, like the task's data")
        else:
            records = data.read_file(path)
            if not records:
                raise UserError("holds no records")
            data.tokenize(records[: config.samples], tokenizer, TaskConfig(name=None), recipe.train.seq_len)
    except UserError as err:
        message = str(err).removeprefix("task: ")
        raise UserError(
            f"replay.path: {message}" if message.startswith(str(path)) else f"replay.path: {config.path}: {message}"
        ) from None


def draw_prompts(recipe: Recipe, tokenizer, task_prompts: list[str] | None, draw: int) -> list[str]:
    """The ``replay.samples`` prompts of draw number ``draw`` (0: the buffer made before training,
    k: the k-th refresh). A pool (the earlier stages' prompts, or the file's) is walked in turn, so
    successive draws take successive prompts and cover the whole pool; generic chat requests are
    seeded by the draw; unconditional samples start from BOS."""
    config = recipe.replay
    mode = _prompt_mode(config, tokenizer)
    if mode in ("tasks", "file"):
        pool = task_prompts if mode == "tasks" else _read_prompts(recipe.base_dir / config.path)
        if not pool:
            raise UserError(
                "replay.prompts: `tasks` has no earlier stage to take prompts from"
                if mode == "tasks"
                else f"replay.path: {config.path} holds no prompts"
            )
        offset = draw * config.samples
        return [pool[(offset + i) % len(pool)] for i in range(config.samples)]
    if mode == "chat":
        return sampling.generic_prompts(config.samples, config.seed + draw)
    return ["" for _ in range(config.samples)]


def as_examples(rows: list[dict], seq_len: int) -> list[dict[str, list[int]]]:
    """Generations (:func:`sampling.generate` rows) as training examples, token for token: the
    prompt's ids (label -100: no loss on what the model did not write) then the completion's ids
    (up to and including its end token), truncated to ``seq_len``."""
    examples = []
    for row in rows:
        ids = [*row["prompt_ids"], *row["completion_ids"]][:seq_len]
        labels = ([data.IGNORE_INDEX] * len(row["prompt_ids"]) + list(row["completion_ids"]))[:seq_len]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return examples


def sample_examples(
    model, tokenizer, recipe: Recipe, task_prompts: list[str] | None, draw: int
) -> list[dict[str, list[int]]]:
    """Sample draw ``draw`` of the buffer from ``model`` (the reference) and return it as examples.
    Prompts of tasks are rendered as their stage's training rendered them (chat template or not)."""
    config = recipe.replay
    mode = _prompt_mode(config, tokenizer)
    chat = mode != "bos" and (
        data.uses_chat_template(recipe.task, tokenizer)
        if mode == "tasks"
        else bool(getattr(tokenizer, "chat_template", None))
    )
    desc = "answering the earlier stages' prompts" if mode == "tasks" else "sampling replay from the reference"
    with evaluate.scoring_precision(
        model, "fp32"
    ):  # a model trained before (a later stage) samples outside its autocast
        rows = sampling.generate(
            model,
            tokenizer,
            draw_prompts(recipe, tokenizer, task_prompts, draw),
            chat,
            min(config.max_new_tokens, recipe.train.seq_len),  # tokens past seq_len would be cut off unseen
            config.temperature,
            config.top_p,
            config.seed + draw,
            desc=desc,
        )
    return as_examples(rows, recipe.train.seq_len)


def keeps_reference_copy(recipe: Recipe) -> bool:
    """Whether training keeps a frozen copy of the model to draw fresh samples from (full
    fine-tuning with ``refresh_every``; LoRA samples from the adapter-disabled model instead)."""
    return recipe.replay is not None and bool(recipe.replay.refresh_every) and recipe.method == "full"


def build_buffer(
    model, tokenizer, recipe: Recipe, base_fingerprint: str, task_prompts: list[str] | None = None
) -> ReplayBuffer:
    """Fill (or load from the cache) the replay buffer from ``model``: the untouched base, or in a
    sequence the model before the stage (``task_prompts``: the earlier stages' prompts)."""
    config, seq_len = recipe.replay, recipe.train.seq_len
    with_topk = config.loss == "kl" and recipe.method == "full" and not keeps_reference_copy(recipe)
    settings = {k: v for k, v in asdict(config).items() if k not in ("ratio", "loss", "coeff", "refresh_every")}
    if config.path:
        settings["file_sha"] = hashlib.sha256((recipe.base_dir / config.path).read_bytes()).hexdigest()
    key_data = [
        BUFFER_FORMAT,
        sampling.SAMPLER_VERSION,
        base_fingerprint,
        settings,
        seq_len,
        with_topk,
        bool(getattr(tokenizer, "chat_template", None)),
        recipe.task.chat_template,
        *([task_prompts] if task_prompts else []),
    ]
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "replay" / f"{key}.pt"
    if path.is_file():
        return ReplayBuffer(**torch.load(path, weights_only=True))

    if config.source == "data":
        records = data.read_file(recipe.base_dir / config.path)
        if not records:
            raise UserError(f"replay.path: {config.path} holds no records")
        examples = data.tokenize(records[: config.samples], tokenizer, TaskConfig(name=None), seq_len)
    else:
        examples = sample_examples(model, tokenizer, recipe, task_prompts, draw=0)
    buffer = ReplayBuffer(examples, task_prompts)
    if with_topk:
        buffer.topk_values, buffer.topk_indices = base_topk(model, tokenizer, examples, config.topk)
    io.write_torch(path, asdict(buffer))
    return buffer


def collate(examples: list[dict[str, list[int]]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to ``length`` (default: the longest) as input_ids / attention_mask / labels."""
    length = length or max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = length - len(e["input_ids"])
        out["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        out["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        out["labels"].append(e["labels"] + [data.IGNORE_INDEX] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


@torch.no_grad()
def base_topk(model, tokenizer, examples, k: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's top-k next-token log-probs at every position of every example (padded positions: 0);
    ``k`` beyond the vocabulary keeps the whole vocabulary (the KL is then exact)."""
    was_training = model.training
    model.eval()
    k = min(k, model.get_output_embeddings().weight.shape[0])
    length = max(len(e["input_ids"]) for e in examples)
    values = torch.zeros(len(examples), length - 1, k)
    indices = torch.zeros(len(examples), length - 1, k, dtype=torch.long)
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id, length)
        logits = model(
            input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
        ).logits
        top = torch.log_softmax(logits[:, :-1].float(), dim=-1).topk(k, dim=-1)
        values[start : start + batch_size] = top.values.cpu()
        indices[start : start + batch_size] = top.indices.cpu()
    model.train(was_training)
    return values, indices


def token_mean(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of a [batch, positions] loss over positions whose next token is labelled."""
    mask = (labels[:, 1:] != data.IGNORE_INDEX).float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, averaged over labelled tokens."""
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:].clamp(min=0), reduction="none")
    return token_mean(per_token, labels)


def kl_full(base_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(base || current) over the whole vocabulary, per labelled token."""
    base = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)
    current = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = (base.exp() * (base - current)).sum(-1)
    return token_mean(per_token, labels)


def kl_topk(values: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(base || current) over k + 1 bins (the base's top-k tokens and the rest), per labelled token."""
    current = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, indices)
    p = values.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=1e-8)
    q_rest = (1 - current.exp().sum(-1)).clamp(min=1e-8)
    per_token = (p * (values - current)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return token_mean(per_token, labels)


def split_batch(batch_size: int, ratio: float, slots: int) -> tuple[int, int]:
    """(new-task, replay) examples per micro-batch on one process; ``slots`` = grad_accum x processes."""
    replay = round(batch_size * ratio)
    new = batch_size - replay
    if new % slots or replay % slots:
        raise UserError(
            f"train.batch_size={batch_size} with replay.ratio={ratio} gives {new} new-task and {replay} replay "
            f"examples per step, which must both divide by grad_accum x processes = {slots}; change train.batch_size"
        )
    return new // slots, replay // slots


class ReplayTrainer(Trainer):
    """A Trainer whose every micro-batch also carries ``replay_batch`` examples from the buffer.

    New-task and replay examples go through the model in one forward pass (one backward, so it
    works unchanged under DDP); ``new_loss`` and ``replay_loss`` are logged separately, and every
    draw of the buffer as ``replay_refresh``. With ``refresh_every``, the buffer is drawn anew from
    the reference every N steps: the adapter-disabled model (LoRA) or a frozen copy of the model
    as it was when this Trainer was made (full fine-tuning; see the module documentation). A
    resumed run draws the same buffers and replay batches as an uninterrupted one.
    """

    def __init__(self, *args, buffer: ReplayBuffer, recipe: Recipe, replay_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        seams.average_loss_over_accumulation(self)  # our loss is a per-micro-batch mean
        self.buffer, self.recipe, self.config, self.replay_batch = buffer, recipe, recipe.replay, replay_batch
        self.lora = recipe.method == "lora"
        self.reference = (
            copy.deepcopy(self.model).eval().requires_grad_(False) if keeps_reference_copy(recipe) else None
        )
        self.micro = (-1, 0)  # (global step, micro-batch within it): seeds the replay draw
        self.coeff = coeff(self.config)
        self.sums = {"new_loss": 0.0, "replay_loss": 0.0, "count": 0}
        self.drawn: int | None = None  # the draw the buffer holds, once logged (0: the one made before training)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._maybe_refresh()
        pad_id = self.processing_class.pad_token_id
        step = self.state.global_step
        self.micro = (step, self.micro[1] + 1 if self.micro[0] == step else 0)
        # seeded by position, not by a running generator, so a resumed run draws the same batches
        rng = np.random.default_rng([self.config.seed, self.args.process_index, *self.micro])
        idx = rng.choice(len(self.buffer.examples), size=self.replay_batch, replace=False)
        replay = collate([self.buffer.examples[i] for i in idx], pad_id)
        n_new, length = inputs["input_ids"].shape[0], max(inputs["input_ids"].shape[1], replay["input_ids"].shape[1])
        merged = {
            k: torch.cat([_pad_to(inputs[k], length, pad), _pad_to(replay[k].to(inputs[k].device), length, pad)])
            for k, pad in (("input_ids", pad_id), ("attention_mask", 0), ("labels", data.IGNORE_INDEX))
        }
        logits = model(input_ids=merged["input_ids"], attention_mask=merged["attention_mask"]).logits
        new_loss = next_token_loss(logits[:n_new], merged["labels"][:n_new])
        replay_logits, replay_labels = logits[n_new:], merged["labels"][n_new:]
        if self.config.loss == "ntp":
            replay_loss = next_token_loss(replay_logits, replay_labels)
        elif self.lora or self.reference is not None:
            with torch.no_grad(), self._reference() as reference:
                base_logits = reference(
                    input_ids=merged["input_ids"][n_new:], attention_mask=merged["attention_mask"][n_new:]
                ).logits
            replay_loss = kl_full(base_logits, replay_logits, replay_labels)
        else:
            width = replay["input_ids"].shape[1] - 1
            values = _pad_to(self.buffer.topk_values[idx][:, :width], length - 1, 0.0).to(logits.device)
            indices = _pad_to(self.buffer.topk_indices[idx][:, :width], length - 1, 0).to(logits.device)
            replay_loss = kl_topk(values, indices, replay_logits, replay_labels)
        self.sums["new_loss"] += float(new_loss.detach())
        self.sums["replay_loss"] += float(replay_loss.detach())
        self.sums["count"] += 1
        loss = new_loss + self.coeff * replay_loss
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.sums["count"]:
            count = self.sums.pop("count")
            logs.update({k: round(v / count, 4) for k, v in self.sums.items()})
            self.sums = {"new_loss": 0.0, "replay_loss": 0.0, "count": 0}
        super().log(logs, *args, **kwargs)

    @contextlib.contextmanager
    def _reference(self):
        """The reference model: the frozen copy, or the trained model with its adapters disabled."""
        if self.reference is not None:
            yield self.reference
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with unwrapped.disable_adapter():
            yield unwrapped

    def _maybe_refresh(self) -> None:
        """Every ``refresh_every`` steps, draw the buffer anew from the reference (the draw is a
        function of the step, so a resumed run redraws the buffer it had); log every draw at the
        step it belongs to (a resumed run's redraw of the buffer it had is not a new draw)."""
        every, step = self.config.refresh_every, self.state.global_step
        draw = step // every if every else 0
        if draw == self.drawn:
            return
        if draw:
            with self._reference() as reference:
                examples = sample_examples(reference, self.processing_class, self.recipe, self.buffer.prompts, draw)
            self.buffer = ReplayBuffer(examples, self.buffer.prompts)
        self.drawn = draw
        if step == draw * (every or 0):
            self.log({"replay_refresh": len(self.buffer.examples)})


def _pad_to(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad dimension 1 of ``tensor`` to ``length``."""
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)], dim=1)
