"""Replay during fine-tuning: self-generated samples of the frozen base, or old data.

Before training, the buffer is filled: sequences sampled from the base itself (``source: self``:
no access to the original training data needed), or examples from a file (``source: data``). It
is cached on disk, keyed by the base's weights, the sampling settings, the sequence length and
the seed. During training every step's batch is split: ``1 - ratio`` new-task examples and
``ratio`` replay examples, scored in one forward pass, with

    loss = new-task loss + coeff * replay loss

where the replay loss is ``ntp`` (next-token cross-entropy on the replay tokens) or ``kl``
(KL(base || current) over the replay tokens, averaged per token).

Where the base distribution comes from, and what it costs:

* LoRA: the base *is* the model with its adapters disabled: one extra no-grad forward of the
  replay part per step, no extra memory, exact KL.
* full fine-tuning: no second model is kept (that would double the weights in memory and cost a
  forward per step). Instead the base's top-k log-probs at every replay position are computed once,
  before training, and stored with the buffer: ``samples x seq_len x k`` x 12 bytes (256 x 128 x
  64: 25 MB). The KL is then taken over k + 1 bins (the top-k tokens and "the rest"), a lower
  bound of the full KL that is exact when the base's mass sits on its top k tokens, and zero
  when current equals base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from forgetscope import data, sampling
from forgetscope.errors import UserError
from forgetscope.models import cache_dir
from forgetscope.recipe import Recipe, ReplayConfig, TaskConfig

IGNORE = -100


@dataclass
class ReplayBuffer:
    """Tokenized replay examples, and for full fine-tuning with ``kl`` the base's top-k log-probs
    (``topk_values``/``topk_indices``: [examples, positions, k], for positions 0..len-2)."""

    examples: list[dict[str, list[int]]]
    texts: list[str]
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
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(r.get("prompt", r.get("text", ""))) for r in data.read_file(path)]


def _sample_records(model, tokenizer, config: ReplayConfig, base_dir: Path,
                    task_prompts: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Sample the buffer from ``model`` (the base, or the model before a stage): records ready for
    :func:`data.tokenize`, and the texts. ``task_prompts``: the earlier stages' prompts (``tasks``)."""
    mode = _prompt_mode(config, tokenizer)
    if mode == "tasks":
        if not task_prompts:
            raise UserError("replay.prompts: `tasks` has no earlier stage to take prompts from")
        prompts = [task_prompts[i % len(task_prompts)] for i in range(config.samples)]
    elif mode == "file":
        pool = _read_prompts(base_dir / config.path)
        if not pool:
            raise UserError(f"replay.path: {config.path} holds no prompts")
        prompts = [pool[i % len(pool)] for i in range(config.samples)]
    elif mode == "chat":
        prompts = sampling.generic_prompts(config.samples, config.seed)
    else:
        prompts = ["" for _ in range(config.samples)]
    chat = mode != "bos" and bool(getattr(tokenizer, "chat_template", None))
    desc = "answering the earlier stages' prompts" if mode == "tasks" else "sampling from the base"
    rows = sampling.generate(model, tokenizer, prompts, chat, config.max_new_tokens, config.temperature, config.top_p,
                             config.seed, desc=desc)
    rows = [r for r in rows if r["text"]]
    if mode == "bos":
        return [{"text": r["text"]} for r in rows], [r["text"] for r in rows]
    return [{"prompt": r["prompt"], "completion": r["text"]} for r in rows], [r["text"] for r in rows]


def _tokenize(records: list[dict], tokenizer, seq_len: int, chat: bool) -> list[dict[str, list[int]]]:
    task = TaskConfig(name=None, chat_template="on" if chat else "off")
    return data.tokenize(records, tokenizer, task, seq_len)


def build_buffer(model, tokenizer, recipe: Recipe, base_fingerprint: str, task_prompts: list[str] | None = None) -> ReplayBuffer:
    """Fill (or load from the cache) the replay buffer from ``model``: the untouched base, or in a
    sequence the model before the stage (``task_prompts``: the earlier stages' prompts)."""
    config, seq_len = recipe.replay, recipe.train.seq_len
    with_topk = config.loss == "kl" and recipe.method == "full"
    settings = {k: v for k, v in asdict(config).items() if k not in ("ratio", "loss", "coeff", "refresh_every")}
    if config.path:
        settings["file_sha"] = hashlib.sha256((recipe.base_dir / config.path).read_bytes()).hexdigest()
    key_data = [base_fingerprint, settings, seq_len, with_topk, bool(getattr(tokenizer, "chat_template", None)),
                *([task_prompts] if task_prompts else [])]
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "replay" / f"{key}.pt"
    if path.is_file():
        return ReplayBuffer(**torch.load(path, weights_only=True))

    if config.source == "data":
        records = data.read_file(recipe.base_dir / config.path)
        if not records:
            raise UserError(f"replay.path: {config.path} holds no records")
        records = records[: config.samples]
        texts = [str(r.get("text", r.get("completion", ""))) for r in records]
        examples = data.tokenize(records, tokenizer, TaskConfig(name=None), seq_len)
    else:
        records, texts = _sample_records(model, tokenizer, config, recipe.base_dir, task_prompts)
        chat = "prompt" in records[0] and bool(getattr(tokenizer, "chat_template", None))  # as they were sampled
        examples = _tokenize(records, tokenizer, seq_len, chat=chat)
    buffer = ReplayBuffer(examples, texts)
    if with_topk:
        buffer.topk_values, buffer.topk_indices = base_topk(model, tokenizer, examples, config.topk)
    tmp = path.with_name(f"{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(asdict(buffer), tmp)
    tmp.replace(path)
    return buffer


def collate(examples: list[dict[str, list[int]]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to ``length`` (default: the longest) as input_ids / attention_mask / labels."""
    length = length or max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = length - len(e["input_ids"])
        out["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        out["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        out["labels"].append(e["labels"] + [IGNORE] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


@torch.no_grad()
def base_topk(model, tokenizer, examples, k: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's top-k next-token log-probs at every position of every example (padded positions: 0)."""
    was_training = model.training
    model.eval()
    length = max(len(e["input_ids"]) for e in examples)
    values = torch.zeros(len(examples), length - 1, k)
    indices = torch.zeros(len(examples), length - 1, k, dtype=torch.long)
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id, length)
        logits = model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)).logits
        top = torch.log_softmax(logits[:, :-1].float(), dim=-1).topk(k, dim=-1)
        values[start : start + batch_size] = top.values.cpu()
        indices[start : start + batch_size] = top.indices.cpu()
    model.train(was_training)
    return values, indices


def token_mean(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of a [batch, positions] loss over positions whose next token is labelled."""
    mask = (labels[:, 1:] != IGNORE).float()
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
    works unchanged under DDP); ``new_loss`` and ``replay_loss`` are logged separately.
    """

    def __init__(self, *args, buffer: ReplayBuffer, recipe: Recipe, replay_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean: let Trainer average over accumulation
        self.buffer, self.recipe, self.config, self.replay_batch = buffer, recipe, recipe.replay, replay_batch
        self.lora = recipe.method == "lora"
        self.micro = (-1, 0)  # (global step, micro-batch within it): seeds the replay draw
        self.coeff = coeff(self.config)
        self.sums = {"new_loss": 0.0, "replay_loss": 0.0, "count": 0}
        self.batch_sizes: list[tuple[int, int]] = []  # (new, replay) per micro-batch, for inspection
        self.refreshed_at = 0

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
        merged = {k: torch.cat([_pad_to(inputs[k], length, pad), _pad_to(replay[k].to(inputs[k].device), length, pad)])
                  for k, pad in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE))}
        logits = model(input_ids=merged["input_ids"], attention_mask=merged["attention_mask"]).logits
        new_loss = next_token_loss(logits[:n_new], merged["labels"][:n_new])
        replay_logits, replay_labels = logits[n_new:], merged["labels"][n_new:]
        if self.config.loss == "ntp":
            replay_loss = next_token_loss(replay_logits, replay_labels)
        elif self.lora:
            unwrapped = self.accelerator.unwrap_model(model)
            with torch.no_grad(), unwrapped.disable_adapter():
                base_logits = unwrapped(input_ids=merged["input_ids"][n_new:], attention_mask=merged["attention_mask"][n_new:]).logits
            replay_loss = kl_full(base_logits, replay_logits, replay_labels)
        else:
            width = replay["input_ids"].shape[1] - 1
            values = _pad_to(self.buffer.topk_values[idx][:, :width], length - 1, 0.0).to(logits.device)
            indices = _pad_to(self.buffer.topk_indices[idx][:, :width], length - 1, 0).to(logits.device)
            replay_loss = kl_topk(values, indices, replay_logits, replay_labels)
        self.sums["new_loss"] += float(new_loss.detach())
        self.sums["replay_loss"] += float(replay_loss.detach())
        self.sums["count"] += 1
        self.batch_sizes.append((n_new, self.replay_batch))
        loss = new_loss + self.coeff * replay_loss
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.sums["count"]:
            count = self.sums.pop("count")
            logs.update({k: round(v / count, 4) for k, v in self.sums.items()})
            self.sums = {"new_loss": 0.0, "replay_loss": 0.0, "count": 0}
        super().log(logs, *args, **kwargs)

    def _maybe_refresh(self) -> None:
        """LoRA only: every ``refresh_every`` steps, resample the buffer from the adapter-disabled base."""
        every, step = self.config.refresh_every, self.state.global_step
        if not every or step == 0 or step % every or step == self.refreshed_at:
            return
        self.refreshed_at = step
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = ReplayConfig(**{**asdict(self.config), "seed": self.config.seed + step})
        with unwrapped.disable_adapter():
            records, texts = _sample_records(unwrapped, self.processing_class, config, self.recipe.base_dir)
        examples = _tokenize(records, self.processing_class, self.recipe.train.seq_len, chat="prompt" in records[0])
        self.buffer = ReplayBuffer(examples, texts)


def _pad_to(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad dimension 1 of ``tensor`` to ``length``."""
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)], dim=1)
