"""Faster log-likelihood scoring for lm-eval: shared prefixes run once, logits only where scored.

lm-eval's ``HFLM`` runs one full forward pass per (context, continuation) request and computes
logits and a log-softmax over the whole vocabulary at every position. For a multiple-choice
question with four answers that is four passes over the same question, and for a 150-token
prompt with a 3-token answer 147 positions of logits that are thrown away.

``PackedLM`` scores the same requests with the same arithmetic, arranged differently:

* requests are sorted so that those sharing a prefix are neighbours, and taken in turn into
  lines of about 128 tokens. A line is one prefix tree: a prefix that several of its requests
  share (a question and its four answers; a prompt template) is run once. Each token attends to
  its ancestors only and its position id is its depth, so every request sees exactly the tokens
  it would see in a separate pass, at the same positions. The log-probability of continuation
  token ``t`` is read from the node before it, as in a separate pass;
* the output layer and the log-softmax run only at the positions that are scored;
* lines of nearly equal length are batched into forward passes of about ``batch_size`` x 128
  tokens, so that little compute goes to padding. All the windows of a rolling log-likelihood
  (perplexity) are scored together the same way.

Scores agree with ``HFLM`` up to float rounding (the same sums in a different order); accuracies
are the same. Models whose logits are not the output layer applied to the last hidden state
(softcapping, logit scales) and inputs that lm-eval would truncate go through ``HFLM``'s own
path unchanged.

Under several processes each scores its share of the requests (lm-eval splits them by rank and
gathers the results on rank 0); ``PackedLM`` takes its rank from the process group.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from forgetscope import distributed, seams

# Architectures whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``.
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"}
LINE_TOKENS = 128  # requests are taken into a line while its prefix tree stays within this many tokens
SLACK_TOKENS = 16  # a line joins a forward pass only if at most this much shorter than its longest
HEAD_ROWS = 1024  # scored positions per chunk of output layer + log-softmax (bounds the logits' memory)
MAX_AUTO_LINES = 512  # `auto` on CUDA: at most this many lines (65k tokens) per forward pass
# part of the result cache's key: raise it whenever a change may move a score or a prompt
# (3: lm-eval's default seeds and few-shot examples as chat turns, as `lm_eval run` gives them;
# 4: a group's results record its subtasks; 5: new multiple-choice tasks join choices as training;
# 6: a group's results record how lm-eval weighs its subtasks; 7: new generate_until tasks drop the space
# training put before the answer)
SCORER_VERSION = 7

Request = tuple[tuple[str, str], list[int], list[int]]
Pair = tuple[list[int], list[int]]  # a request's context and continuation tokens
Line = tuple[
    list[int], list[int], list[int], list[list[int]]
]  # tokens, position ids, subtree ends, scored nodes per request


class PackedLM(HFLM):
    """``HFLM`` whose ``loglikelihood`` (and rolling log-likelihood) runs shared prefixes once; see the module doc."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lines_per_pass = self.batch_size  # forward passes carry about this many lines of LINE_TOKENS
        self.greedy_needed = True  # whether callers read "is greedy" (a rolling log-likelihood does not)
        seams.set_hflm_ranks(self, distributed.rank(), distributed.world_size())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor``, stacked (HFLM's goes through an accelerate object we do not make)."""
        if self.world_size <= 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts)

    def barrier(self) -> None:
        distributed.barrier()

    def _packable(self) -> bool:
        config = self.model.config
        return (
            self.backend == "causal"
            and isinstance(self.lines_per_pass, int)
            and config.model_type in PLAIN_HEAD_TYPES
            and getattr(config, "final_logit_softcapping", None) is None
        )

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if not self._packable():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        fits = [
            i
            for i, (_, ctx, cont) in enumerate(requests)
            if ctx and cont and len(ctx) + len(cont) <= self.max_length + 1
        ]
        rest = sorted(set(range(len(requests))) - set(fits))
        out: dict[int, tuple[float, bool]] = {}
        if rest:  # lm-eval truncates these from the left (and never sends empty ones); let it
            with seams.hflm_batch_size(self, self.lines_per_pass):
                out.update(zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm)))
        lines = [
            [fits[j] for j in line]
            for line in plan_lines([requests[i][1:] for i in fits], LINE_TOKENS, self.max_length)
        ]
        layouts = [layout_line([requests[i][1:] for i in line]) for line in lines]
        longest_first = sorted(range(len(lines)), key=lambda k: -len(layouts[k][0]))
        budget = self.lines_per_pass * LINE_TOKENS
        bar = tqdm(total=len(fits), disable=disable_tqdm or self.rank != 0, desc="Scoring (shared prefixes)")
        for batch in batch_lines([len(layouts[k][0]) for k in longest_first], budget, SLACK_TOKENS):
            chosen = [longest_first[b] for b in batch]
            members = [i for k in chosen for i in lines[k]]
            for index, answer in zip(
                members, self._score_within_memory([layouts[k] for k in chosen], [requests[i][2] for i in members])
            ):
                out[index] = answer
                if requests[index][0] is not None:  # rolling windows carry no request string
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            bar.update(len(members))
        bar.close()
        return [out[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's, with every window handed to ``_loglikelihood_tokens`` in one call (HFLM hands
        over ``batch_size`` windows at a time, too few to pack into full lines)."""
        if not self._packable():
            return super().loglikelihood_rolling(requests, disable_tqdm)
        self.greedy_needed = False
        try:
            with seams.hflm_batch_size(self, sys.maxsize):
                return super().loglikelihood_rolling(requests, disable_tqdm)
        finally:
            self.greedy_needed = True

    def _score_within_memory(self, lines: list[Line], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """``_score_lines``; a batch that runs out of accelerator memory is scored in halves, and
        later batches are made smaller too."""
        try:
            return self._score_lines(lines, targets)
        except torch.OutOfMemoryError:
            if len(lines) == 1:
                raise
        torch.cuda.empty_cache()
        half = len(lines) // 2
        self.lines_per_pass = max(1, min(self.lines_per_pass, half))
        split = sum(len(line[3]) for line in lines[:half])  # requests in the first half
        return self._score_within_memory(lines[:half], targets[:split]) + self._score_within_memory(
            lines[half:], targets[split:]
        )

    @torch.no_grad()
    def _score_lines(self, lines: list[Line], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward pass over a batch of lines -> (log-likelihood, is greedy) per request, in
        the order of the lines' requests (``targets``: their continuations, in that order)."""
        width = max(len(line[0]) for line in lines)
        ids = torch.zeros(len(lines), width, dtype=torch.long)
        positions = torch.zeros(len(lines), width, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(lines), 1, 1)  # padding sees itself only
        rows: dict[tuple[int, int], int] = {}  # (line, node) -> row of the output layer's input
        for b, (tokens, depths, ends, _) in enumerate(lines):
            n = len(tokens)
            ids[b, :n], positions[b, :n] = torch.tensor(tokens), torch.tensor(depths)
            allowed[b, :n, :n] = ancestry_mask(ends)
        # answers that differ only in their last token are predicted from the same nodes: one row each
        token_rows = torch.tensor(
            [
                rows.setdefault((b, node), len(rows))
                for b, line in enumerate(lines)
                for nodes in line[3]
                for node in nodes
            ]
        )
        attention = seams.attention_mask(self.model, allowed[:, None].to(self.device))
        hidden = self.model.get_decoder()(
            input_ids=ids.to(self.device), attention_mask=attention, position_ids=positions.to(self.device)
        ).last_hidden_state
        device = hidden.device
        lines_t, nodes_t = torch.tensor(list(rows), device=device).T
        picked, token_rows = hidden[lines_t, nodes_t], token_rows.to(device)
        target = torch.tensor([t for cont in targets for t in cont], device=device)
        token_lp, hit = (
            torch.empty(len(target), device=device),
            torch.zeros(len(target), dtype=torch.bool, device=device),
        )
        for start in range(0, len(rows), HEAD_ROWS):  # in chunks: all the logits at once can be gigabytes
            logprobs = F.log_softmax(
                self.model.get_output_embeddings()(picked[start : start + HEAD_ROWS]), dim=-1, dtype=self.softmax_dtype
            )
            here = (token_rows >= start) & (token_rows < start + HEAD_ROWS)
            local = token_rows[here] - start
            token_lp[here] = logprobs[local, target[here]].to(token_lp.dtype)
            if self.greedy_needed:  # max's indices: argmax's (the first maximum), at twice the speed
                hit[here] = logprobs.max(dim=-1).indices[local] == target[here]
        token_lp, hit = token_lp.cpu(), hit.cpu()
        answers, start = [], 0
        for cont in targets:
            end = start + len(cont)
            answers.append((float(token_lp[start:end].sum()), bool(hit[start:end].all())))
            start = end
        return answers


def auto_lines(model, precision: str) -> int:
    """Lines per forward pass for ``batch_size: auto``: on CUDA as many as the activations of a
    no-grad forward pass in ``precision`` fit in a quarter of the free memory (at most
    ``MAX_AUTO_LINES``); 16 on the CPU, where larger passes are no faster."""
    if model.device.type != "cuda":
        return 16
    config = model.config
    element = 2 if precision == "bf16" else next(model.parameters()).element_size()
    heads = config.num_attention_heads
    per_line = (
        LINE_TOKENS * element * (8 * config.hidden_size + 4 * config.intermediate_size) + heads * LINE_TOKENS**2 * 8
    )
    free = torch.cuda.mem_get_info(model.device)[0] - HEAD_ROWS * config.vocab_size * 8
    return max(1, min(MAX_AUTO_LINES, int(free // 4 // per_line)))


def plan_lines(pairs: list[Pair], capacity: int, max_length: int) -> list[list[int]]:
    """Request indices -> lines. Requests are sorted, so that those sharing a prefix are
    neighbours, and taken in turn: a line closes when the next context's requests would take its
    prefix tree past ``capacity`` tokens. Requests sharing a context of two or more tokens stay in
    one line (a line longer than ``capacity`` if need be) while the line stays within
    ``max_length``; one-token contexts (the windows of a rolling log-likelihood) are not kept together."""
    units: list[list[int]] = []  # requests that must share a line
    sizes: list[int] = []  # each unit's tokens laid out alone (at most; answers may share prefixes too)
    for i in sorted(range(len(pairs)), key=lambda i: pairs[i]):
        context, cont = pairs[i]
        if (
            units
            and len(context) >= 2
            and pairs[units[-1][0]][0] == context
            and sizes[-1] + len(cont) - 1 <= max_length
        ):
            units[-1].append(i)
            sizes[-1] += len(cont) - 1
        else:
            units.append([i])
            sizes.append(len(context) + len(cont) - 1)
    lines: list[list[int]] = []
    size, last = 0, []
    for unit, alone in zip(units, sizes):
        joined = alone - common_prefix(last, path(pairs[unit[0]]))
        if lines and size + joined <= capacity:
            lines[-1] += unit
            size += joined
        else:
            lines.append(list(unit))
            size = alone
        last = path(pairs[unit[-1]])
    return lines


def layout_line(pairs: list[Pair]) -> Line:
    """Lay a line's requests out as one prefix tree of their inputs (the context, then every
    continuation token but the last, which predicts nothing).

    Returns the tree's tokens in depth-first order, their position ids (depths), each token's
    subtree end (see ``ancestry_mask``) and, per request, the nodes whose outputs predict its
    continuation: the last context token, then each of the continuation's own tokens but the last.
    """
    paths = [path(pair) for pair in pairs]
    tokens: list[int] = []
    depths: list[int] = []
    ends: list[int] = []
    nodes: list[list[int]] = [[] for _ in pairs]
    previous_path: list[int] = []  # in sorted order, the path before shares the most with this one
    previous_nodes: list[int] = []
    for i in sorted(range(len(pairs)), key=lambda i: paths[i]):
        shared = common_prefix(previous_path, paths[i])
        new = range(len(tokens), len(tokens) + len(paths[i]) - shared)
        tokens += paths[i][shared:]
        depths += range(shared, len(paths[i]))
        ends += [0] * len(new)
        nodes[i] = previous_nodes[:shared] + list(new)
        for node in nodes[i]:  # ids grow along a path and from path to path: the latest path ends every subtree on it
            ends[node] = nodes[i][-1] + 1
        previous_path, previous_nodes = paths[i], nodes[i]
    scored = [nodes[i][len(context) - 1 :] for i, (context, _) in enumerate(pairs)]
    return tokens, depths, ends, scored


def ancestry_mask(ends: list[int]) -> torch.Tensor:
    """Attention mask of a prefix tree in depth-first order: query ``q`` may attend to key ``k``
    when ``k`` is ``q`` or an ancestor of it, i.e. ``k <= q < ends[k]`` (a node's descendants
    are the nodes after it, up to its subtree end)."""
    index = torch.arange(len(ends))
    return (index[None, :] <= index[:, None]) & (index[:, None] < torch.tensor(ends)[None, :])


def path(pair: Pair) -> list[int]:
    """A request's input tokens: its context, then its continuation but the last token."""
    context, cont = pair
    return context + cont[:-1]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def batch_lines(lengths: list[int], budget: int, slack: int) -> list[list[int]]:
    """Lines (longest first) -> forward passes: consecutive lines while the padded batch stays
    within ``budget`` tokens and each line is at most ``slack`` tokens shorter than the first."""
    batches: list[list[int]] = []
    for k, length in enumerate(lengths):
        if batches:
            width = lengths[batches[-1][0]]
            if (len(batches[-1]) + 1) * width <= budget and width - length <= slack:
                batches[-1].append(k)
                continue
        batches.append([k])
    return batches
