"""Sample text from a frozen base model, batched with a KV cache, and cache the samples on disk.

The samples feed the label-free drift probe (``base_samples_ppl``: how likely a snapshot finds
the text its own base wrote). The same sampler fills the self-generated replay buffer (:mod:`forgetscope.replay`).
Prompts are generic chat requests for models with a chat template (instruct models) and the bare
BOS token for the others (base models).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from forgetscope import io
from forgetscope.models import cache_dir

_SUBJECTS = (
    "the history of bread", "how rainbows form", "why cats purr", "the water cycle", "a day at the beach",
    "how to plant tomatoes", "the rules of chess", "what makes a good friend", "the moon landing",
    "how bicycles stay upright", "the life of bees", "why the sky is blue", "how to make tea",
    "the invention of paper", "volcanoes", "a rainy afternoon", "how computers store numbers",
    "the Roman empire", "learning a new language", "the ocean's tides",
)
_REQUESTS = ("Tell me about {}.", "Write a short paragraph about {}.", "Explain {} to a child.", "What is interesting about {}?")


def generic_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` generic user requests ("Tell me about volcanoes."), seeded."""
    rng = random.Random(seed)
    return [rng.choice(_REQUESTS).format(rng.choice(_SUBJECTS)) for _ in range(n)]


def render(prompt: str, tokenizer, chat: bool) -> str:
    """A prompt as the model sees it: a chat user turn, or the raw text ("" starts from BOS)."""
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], chat: bool, max_new_tokens: int, temperature: float, top_p: float,
             seed: int, batch_size: int = 16, desc: str = "sampling from the base") -> list[dict[str, str]]:
    """Sample one continuation per prompt, batched with a KV cache; returns ``[{"id", "prompt", "text"}]``.

    ``chat``: wrap each prompt as a user turn of the chat template; else use it as raw text, where
    an empty prompt starts from the BOS token alone (unconditional sampling). Shows tokens/s.
    """
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    rendered = [render(p, tokenizer, chat) for p in prompts]
    out = []
    produced, started = 0, time.time()
    bar = tqdm(total=len(prompts), desc=desc, unit="seq")
    for start in range(0, len(prompts), batch_size):
        chunk = rendered[start : start + batch_size]
        if all(not c for c in chunk):  # unconditional: start from BOS alone
            ids = torch.full((len(chunk), 1), tokenizer.bos_token_id or tokenizer.eos_token_id)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        tokens = model.generate(
            **batch, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            use_cache=True, pad_token_id=tokenizer.pad_token_id,
        )
        new = tokens[:, batch["input_ids"].shape[1] :]
        produced += int((new != tokenizer.pad_token_id).sum())
        for offset, row in enumerate(new):
            i = start + offset
            out.append({"id": f"sample-{i:04d}", "prompt": prompts[i], "text": tokenizer.decode(row, skip_special_tokens=True).strip()})
        bar.update(len(chunk))
        bar.set_postfix(tokens_per_s=f"{produced / max(time.time() - started, 1e-9):.0f}")
    bar.close()
    tokenizer.padding_side = "right"
    model.train(was_training)
    return out


def base_samples(model, tokenizer, base_id: str, n: int = 64, max_new_tokens: int = 96, temperature: float = 1.0,
                 top_p: float = 0.95, seed: int = 0) -> Path:
    """Samples from the base for the drift probe, cached on disk keyed by (base, settings, seed)."""
    key = hashlib.sha256(json.dumps([base_id, n, max_new_tokens, temperature, top_p, seed]).encode()).hexdigest()[:16]
    path = cache_dir() / "samples" / f"{key}.jsonl"
    if not path.is_file():
        chat = bool(getattr(tokenizer, "chat_template", None))
        prompts = generic_prompts(n, seed) if chat else ["" for _ in range(n)]
        rows = generate(model, tokenizer, prompts, chat, max_new_tokens, temperature, top_p, seed)
        io.write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r["text"]))
    return path
