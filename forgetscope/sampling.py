"""Sample text from a frozen model, batched over a static KV cache, and cache the samples on disk.

The samples feed the label-free drift probe (``base_samples_ppl``: how likely a snapshot finds
the text its own base wrote). The same sampler fills the self-generated replay buffer (:mod:`forgetscope.replay`).
Prompts are generic chat requests for models with a chat template (instruct models) and the bare
BOS token for the others (base models).

Why not ``model.generate``: for a small model every decoding step is a few hundred tiny kernels,
and launching them from Python costs far more than running them (an H100 sampled SmolLM2-135M at
about 500 tokens/s through ``generate``). Here a whole batch decodes into a static cache of fixed
shape, so on CUDA one decoding step is captured once as a CUDA graph and replayed: the GPU runs
the step without Python in between. Every prompt of a call is left-padded to one length and every
batch has the same size (the last one is filled up with copies), so one capture serves the call.
On the CPU (and if a capture fails) the same step runs eagerly; both give the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from forgetscope import data, io, seams
from forgetscope.models import cache_dir

_SUBJECTS = (
    "the history of bread",
    "how rainbows form",
    "why cats purr",
    "the water cycle",
    "a day at the beach",
    "how to plant tomatoes",
    "the rules of chess",
    "what makes a good friend",
    "the moon landing",
    "how bicycles stay upright",
    "the life of bees",
    "why the sky is blue",
    "how to make tea",
    "the invention of paper",
    "volcanoes",
    "a rainy afternoon",
    "how computers store numbers",
    "the Roman empire",
    "learning a new language",
    "the ocean's tides",
)
_REQUESTS = (
    "Tell me about {}.",
    "Write a short paragraph about {}.",
    "Explain {} to a child.",
    "What is interesting about {}?",
)
CPU_BATCH = 16  # sequences decoded together on the CPU
MAX_GPU_BATCH = 2048  # on CUDA: as many as fit in a quarter of the free memory, at most this many
CHECK_EVERY = 8  # decoding steps between checks whether every sequence has ended (each check waits for the GPU)
WARMUP_STEPS = 2  # eager decoding steps before the step is captured as a CUDA graph
TOP_P_CANDIDATES = 1024  # top-p sampling looks for the nucleus among this many most likely tokens first
SAMPLER_VERSION = 3  # in the cache keys of samples: raise it whenever a change moves what is drawn (3: 2026-11-23)


def generic_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` generic user requests ("Tell me about volcanoes."), seeded."""
    rng = random.Random(seed)
    return [rng.choice(_REQUESTS).format(rng.choice(_SUBJECTS)) for _ in range(n)]


def prompt_ids(prompt: str, tokenizer, chat: bool) -> list[int]:
    """A prompt's token ids as they are sampled from: the rendered chat turn, or the raw text with
    the tokenizer's special tokens; an empty raw prompt is the BOS token alone."""
    if not chat and not prompt:
        return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return tokenizer(data.render_prompt(prompt, tokenizer, chat), add_special_tokens=not chat).input_ids


def batch_size(model, prompt_len: int, max_new_tokens: int, n: int) -> int:
    """Sequences per batch: ``CPU_BATCH`` on the CPU; on CUDA as many as the static cache (keys and
    values of every layer), the logits and the sampling buffers fit in a quarter of the free memory."""
    if model.device.type != "cuda":
        return min(n, CPU_BATCH)
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    per_sequence = (
        (prompt_len + max_new_tokens) * config.num_hidden_layers * 2 * heads * head_dim * element
        + prompt_len * config.hidden_size * 4 * element
        + 6 * config.vocab_size * 4
    )
    fits = int(torch.cuda.mem_get_info(model.device)[0] // 4 // per_sequence)
    return max(1, min(n, MAX_GPU_BATCH, fits))


class _Decoder:
    """Decodes batches of one fixed shape (``rows`` sequences, ``prompt_len`` + ``new`` tokens) over
    one static cache; on CUDA the one-token step is a CUDA graph, captured at the first batch."""

    def __init__(self, model, rows: int, prompt_len: int, new: int):
        self.model, self.prompt_len = model, prompt_len
        device = model.device
        self.cache = seams.static_cache(model, prompt_len + new)
        self.keys = torch.zeros(
            rows, 1, 1, prompt_len + new, dtype=torch.bool, device=device
        )  # which keys each row sees
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the step writes into the cache
        self.graph, self.logits = None, None
        self.use_graph = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.use_graph else None

    def _step(self) -> torch.Tensor:
        # the static cache writes at `cache_position` (or, in some versions, at its own running position: the same)
        out = self.model(
            input_ids=self.ids,
            position_ids=self.positions,
            cache_position=self.slot,
            attention_mask=seams.attention_mask(self.model, self.keys),
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def prefill(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts (``real``: which tokens are not padding) into the cache;
        returns the next-token logits."""
        self.cache.reset()
        rows, length = ids.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        allowed = torch.zeros(
            rows, 1, length, self.keys.shape[-1], dtype=torch.bool, device=ids.device
        )  # keys: the whole cache
        allowed[:, 0, :, :length] = (causal & real[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=ids.device
        )  # padding sees itself
        self.keys.zero_()
        self.keys[:, 0, 0, :length] = real
        self.positions.copy_(real.sum(1, keepdim=True) - 1)
        out = self.model(
            input_ids=ids,
            position_ids=(real.cumsum(1) - 1).clamp(min=0),
            attention_mask=seams.attention_mask(self.model, allowed),
            cache_position=torch.arange(length, device=ids.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """Feed each row's latest token as decoding step ``index``; returns the next-token logits.

        On CUDA the first ``WARMUP_STEPS`` steps run eagerly on a side stream (CUDA graphs need
        warmed-up kernels and allocations), the next one is captured, and every later step,
        in this batch and the next ones, replays the capture. Every run of the step is a real
        decoding step: some versions of transformers' static cache advance their own write
        position on each forward pass rather than read ``cache_position``.
        """
        self.ids.copy_(tokens[:, None])
        self.positions.add_(1)
        self.slot.fill_(self.prompt_len + index)
        self.keys[:, 0, 0, self.prompt_len + index] = True
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.use_graph:
            return self._step()
        if index < WARMUP_STEPS:
            self.stream.wait_stream(torch.cuda.current_stream(self.model.device))  # the inputs written above
            with torch.cuda.stream(self.stream):
                logits = self._step()
            torch.cuda.current_stream(self.model.device).wait_stream(self.stream)
            return logits
        self.graph = self._capture()
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits

    def _capture(self):
        """Capture the step as a CUDA graph (capturing runs nothing); None if the model's forward
        cannot be captured."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.logits = self._step()
            return graph
        except RuntimeError as err:  # a model whose forward cannot be captured: decode eagerly
            print(f"forgetscope: decoding without a CUDA graph ({str(err).splitlines()[0]})")
            self.use_graph = False
            torch.cuda.synchronize(self.model.device)
            return None


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: greedy at ``temperature`` 0, else sampled from the nucleus of ``top_p``
    (the smallest set of most likely tokens whose probabilities reach ``top_p``).

    The nucleus is looked for among the ``TOP_P_CANDIDATES`` most likely tokens, which is much
    cheaper than sorting the whole vocabulary for every row; the rows whose candidates do not
    reach ``top_p`` (a very flat distribution) are drawn again from their whole vocabulary, sorted,
    so every draw is exact."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    top, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)  # most likely first
    tokens = _draw_nucleus(top, order, top_p, generator)
    short = top.sum(-1) < top_p
    if bool(short.any()):
        rows = short.nonzero()[:, 0]
        tokens[rows] = _draw_nucleus(*probs[rows].sort(dim=-1, descending=True), top_p, generator)
    return tokens


def _draw_nucleus(top: torch.Tensor, order: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """A token per row from probabilities ``top`` (most likely first, token ids ``order``), cut
    after the first tokens whose mass reaches ``top_p``."""
    outside = top.cumsum(-1) - top >= top_p  # the mass before a token already reaches top_p; never the first
    return order.gather(-1, torch.multinomial(top.masked_fill(outside, 0), 1, generator=generator))[:, 0]


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled blocks (train.compile) run eagerly here
def generate(
    model,
    tokenizer,
    prompts: list[str],
    chat: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    desc: str = "sampling from the base",
) -> list[dict]:
    """Sample one continuation per prompt. Returns per prompt ``{"id", "prompt", "text",
    "prompt_ids", "completion_ids"}``: ``prompt_ids`` are the tokens sampled from (see
    :func:`prompt_ids`), ``completion_ids`` the tokens the model produced, up to and including its
    end-of-sequence token when it stopped, so that ``prompt_ids + completion_ids`` is exactly the
    sequence the model wrote; ``text`` is the completion decoded, special tokens skipped, stripped.

    ``chat``: wrap each prompt as a user turn of the chat template; else use it as raw text, where
    an empty prompt starts from the BOS token alone (unconditional sampling). ``temperature`` 0 is
    greedy decoding. Seeded; a bar shows tokens/s.
    """
    was_training = model.training
    model.eval()
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    encoded = [prompt_ids(p, tokenizer, chat) for p in prompts]
    length = max(len(ids) for ids in encoded)
    rows = batch_size(model, length, max_new_tokens, len(prompts))
    decoder = _Decoder(model, rows, length, max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ends = sorted({tokenizer.eos_token_id, *_eos_ids(model)} - {None})
    stop = torch.tensor(ends, device=device)
    out, produced, started = [], 0, time.time()
    bar = tqdm(total=len(prompts), desc=desc, unit="seq")
    for start in range(0, len(prompts), rows):
        chunk = encoded[start : start + rows]
        chunk += [chunk[0]] * (rows - len(chunk))  # a full batch: the captured step has one shape
        ids = torch.tensor([[pad] * (length - len(c)) + c for c in chunk], device=device)
        real = torch.tensor([[False] * (length - len(c)) + [True] * len(c) for c in chunk], device=device)
        tokens = torch.full((rows, max_new_tokens), pad, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        logits = decoder.prefill(ids, real)
        for index in range(max_new_tokens):
            token = pick(logits, temperature, top_p, generator).masked_fill(done, pad)
            tokens[:, index] = token
            done |= torch.isin(token, stop)
            if index + 1 == max_new_tokens or ((index + 1) % CHECK_EVERY == 0 and bool(done.all())):
                break
            logits = decoder.step(token, index)
        for offset, row in enumerate(tokens[: len(prompts) - start].tolist()):
            i = start + offset
            ended = next((k + 1 for k, t in enumerate(row) if t in ends), None)
            completion = row[:ended] if ended else row
            produced += len(completion)
            out.append(
                {
                    "id": f"sample-{i:04d}",
                    "prompt": prompts[i],
                    "text": tokenizer.decode(completion, skip_special_tokens=True).strip(),
                    "prompt_ids": encoded[i],
                    "completion_ids": completion,
                }
            )
        bar.update(min(rows, len(prompts) - start))
        bar.set_postfix(tokens_per_s=f"{produced / max(time.time() - started, 1e-9):.0f}")
    bar.close()
    model.train(was_training)
    return out


def _eos_ids(model) -> list[int]:
    """The model's generation config's end-of-sequence ids (one id or several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def base_samples(
    model,
    tokenizer,
    base_id: str,
    n: int = 64,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
) -> Path:
    """Samples from the base for the drift probe, cached on disk keyed by (sampler version, base, settings, seed)."""
    settings = [SAMPLER_VERSION, base_id, n, max_new_tokens, temperature, top_p, seed]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    path = cache_dir() / "samples" / f"{key}.jsonl"
    if not path.is_file():
        chat = bool(getattr(tokenizer, "chat_template", None))
        prompts = generic_prompts(n, seed) if chat else ["" for _ in range(n)]
        rows = generate(model, tokenizer, prompts, chat, max_new_tokens, temperature, top_p, seed)
        io.write_text(
            path, "".join(json.dumps({k: r[k] for k in ("id", "prompt", "text")}) + "\n" for r in rows if r["text"])
        )
    return path
