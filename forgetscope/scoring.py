"""Faster log-likelihood scoring for lm-eval: shared contexts run once, logits only where scored.

lm-eval's ``HFLM`` runs one full forward pass per (context, continuation) request and computes
logits and a log-softmax over the whole vocabulary at every position. For a multiple-choice
question with four answers that is four passes over the same question, and for a 150-token
prompt with a 3-token answer 147 positions of logits that are thrown away.

``PackedLM`` scores the same requests with the same arithmetic, arranged differently:

* requests that share a context are packed into one row: the context once, then each answer's
  tokens, with an attention mask that lets every answer see the context and itself only and
  position ids that restart after the context for each answer. The log-probability of answer
  token ``t`` is read from the position before it, exactly as in a separate pass;
* the output layer and the log-softmax run only at the positions that are scored.

Scores agree with ``HFLM`` up to float rounding (the same sums in a different order); accuracies
are the same. Models whose logits are not the output layer applied to the last hidden state
(softcapping, logit scales), ``batch_size="auto"`` and inputs that lm-eval would truncate go
through ``HFLM``'s own path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

# Architectures whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``.
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"}
LINE_TOKENS = 256  # short rows are packed side by side into lines of up to this many tokens

Request = tuple[tuple[str, str], list[int], list[int]]
Row = tuple[list[int], list[int], torch.Tensor, list[list[int]]]  # tokens, positions, mask, scored


class PackedLM(HFLM):
    """``HFLM`` whose ``loglikelihood`` (and rolling log-likelihood) shares contexts; see the module doc."""

    def _packable(self) -> bool:
        config = self.model.config
        return (self.backend == "causal" and isinstance(self.batch_size, int)
                and config.model_type in PLAIN_HEAD_TYPES
                and getattr(config, "final_logit_softcapping", None) is None)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not self._packable():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        fits = [i for i, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) <= self.max_length + 1]
        rest = sorted(set(range(len(requests))) - set(fits))
        out: dict[int, tuple[float, bool]] = {}
        if rest:  # lm-eval truncates these from the left; let it
            out.update(zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)))
        groups = [[fits[j] for j in group] for group in group_by_context([requests[i][1:] for i in fits], self.max_length)]
        rows = [layout(requests[g[0]][1], [requests[i][2] for i in g]) for g in groups]
        lines = pack_lines([len(row[0]) for row in rows], LINE_TOKENS)
        bar = tqdm(total=len(fits), disable=disable_tqdm or self.rank != 0, desc="Scoring (shared contexts)")
        for start in range(0, len(lines), self.batch_size):
            batch = lines[start:start + self.batch_size]
            members = [i for line in batch for r in line for i in groups[r]]
            for index, answer in zip(members, self._score_lines([[rows[r] for r in line] for line in batch],
                                                                 [requests[i][2] for i in members])):
                out[index] = answer
                self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            bar.update(len(members))
        bar.close()
        return [out[i] for i in range(len(requests))]

    @torch.no_grad()
    def _score_lines(self, lines: list[list[Row]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward pass over a batch of lines -> (log-likelihood, is greedy) per continuation, in order."""
        width = max(sum(len(row[0]) for row in line) for line in lines)
        ids = torch.zeros(len(lines), width, dtype=torch.long)
        positions = torch.zeros(len(lines), width, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(lines), 1, 1)  # padding sees itself only
        where = []  # (line, row positions) per continuation
        for b, line in enumerate(lines):
            offset = 0
            for tokens, pos, mask, scored in line:
                n = len(tokens)
                ids[b, offset:offset + n], positions[b, offset:offset + n] = torch.tensor(tokens), torch.tensor(pos)
                allowed[b, offset:offset + n, offset:offset + n] = mask
                where += [(b, [offset + s for s in cont]) for cont in scored]
                offset += n
        if self.model.config._attn_implementation == "sdpa":
            attention = allowed[:, None]
        else:
            attention = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill(~allowed, torch.finfo(self.model.dtype).min)[:, None]
        hidden = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=attention.to(self.device),
                                          position_ids=positions.to(self.device)).last_hidden_state
        picked = torch.cat([hidden[b, cols] for b, cols in where])
        logprobs = F.log_softmax(self.model.get_output_embeddings()(picked), dim=-1, dtype=self.softmax_dtype)
        target = torch.tensor([t for cont in targets for t in cont], device=logprobs.device)
        token_lp = logprobs.gather(1, target[:, None]).squeeze(1)
        hit = logprobs.argmax(dim=-1) == target
        answers, start = [], 0
        for cont in targets:
            end = start + len(cont)
            answers.append((float(token_lp[start:end].sum()), bool(hit[start:end].all())))
            start = end
        return answers


def layout(context: list[int], continuations: list[list[int]]) -> Row:
    """Pack one context and its continuations into a row.

    Returns the row's tokens, their position ids, its attention mask (``mask[q, k]``: query ``q``
    may attend to key ``k``) and, per continuation, the row positions whose outputs predict its
    tokens: the last context token, then each of its own tokens but the last.
    """
    tokens, positions, block = list(context), list(range(len(context))), [0] * len(context)
    scored = []
    for k, cont in enumerate(continuations, start=1):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(len(context), len(context) + len(cont) - 1)
        block += [k] * (len(cont) - 1)
        scored.append([len(context) - 1, *range(start, len(tokens))])
    block_t = torch.tensor(block)
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    same_or_context = (block_t[None, :] == 0) | (block_t[None, :] == block_t[:, None])
    return tokens, positions, causal & same_or_context, scored


def group_by_context(pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[list[int]]:
    """Group request indices: requests that share a context (of two or more tokens) form one
    group while its row stays within ``max_length``; every other request is a group alone."""
    groups: list[list[int]] = []
    open_groups: dict[tuple[int, ...], tuple[list[int], int]] = {}
    for i, (context, cont) in enumerate(pairs):
        key, extra = tuple(context), len(cont) - 1
        if len(context) >= 2 and key in open_groups and open_groups[key][1] + extra <= max_length:
            group, length = open_groups[key]
            group.append(i)
            open_groups[key] = (group, length + extra)
            continue
        groups.append([i])
        if len(context) >= 2:
            open_groups[key] = (groups[-1], len(context) + extra)
    return groups


def pack_lines(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: row indices -> lines of at most ``capacity`` tokens (a longer row is a
    line alone), longest lines first, so that a batch of lines carries little padding."""
    lines: list[list[int]] = []
    room: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        slot = next((k for k, free in enumerate(room) if free >= lengths[r]), None)
        if slot is None:
            lines.append([r])
            room.append(capacity - lengths[r])
        else:
            lines[slot].append(r)
            room[slot] -= lengths[r]
    return sorted(lines, key=lambda line: -sum(lengths[r] for r in line))
