"""The evaluation cascade: cheap label-free probes at every probe step, the full battery only
where it is needed.

At every probe step (the snapshot schedule, plus every ``cascade.every`` steps in between) the
model is scored on the cheap probes: the label-free lm-eval probes in ``cascade.cheap`` (by
default ``base_samples_ppl``, the base's own text) and ``new_task_kl``, the KL from the base on
new-task prompts, which Shenfeld et al. 2025 ("RL's Razor") found predicts forgetting. The full
battery (every other eval of the recipe) runs at the scheduled snapshots and wherever a cheap
probe has moved by its threshold since the last full battery (:func:`decide`).

``new_task_kl`` is ``KL(base || current)`` per token along continuations that the base itself
sampled for the first ``kl_prompts`` prompts of the new task's data (prompts only: no labels). By
the chain rule, summing the per-token KL of the next-token distributions along sequences drawn
from the base estimates the sequence-level ``KL(pi_0(.|x) || pi(.|x))`` without bias. The base's
distribution is the adapter-disabled model for LoRA (exact), and for full fine-tuning its top-k
log-probs at every position, kept from step 0 (:func:`forgetscope.replay.base_topk`; the KL over
the k tokens and "the rest" is a lower bound, exact when the base's mass lies in its top k).

The run flow calls :meth:`Cascade.score` where it would score the whole suite; each probe step's
decision, cheap values and timings go to the manifest (``cascade``), so a resumed run continues
with the same reference. :func:`simulate` replays the rule on a run that scored the full battery
at every probe step, to measure what a cascade would save and miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from forgetscope import data, distributed, evaluate, io, metrics, results, sampling
from forgetscope.curves import primary_metric
from forgetscope.errors import UserError
from forgetscope.models import cache_dir
from forgetscope.recipe import CascadeConfig, Recipe, TaskConfig
from forgetscope.replay import base_topk, collate, kl_full, kl_topk
from forgetscope.schema import did_you_mean
from forgetscope.snapshots import RunLayout, probe_steps


def thresholds(config: CascadeConfig) -> dict[str, float]:
    """{cheap probe: the move since the last full battery that calls for the full battery}."""
    out = {name: config.cheap_threshold for name in config.cheap}
    if config.kl:
        out[metrics.KL_PROBE] = config.kl_threshold
    return out


def decide(
    step: int, values: dict[str, float], reference: dict[str, float], limits: dict[str, float], scheduled: set[int]
) -> tuple[bool, str]:
    """Whether to score the full battery at ``step``, and why: at a scheduled snapshot, or where a
    cheap probe's value has moved by at least its limit (``|v_t - v_ref| >= limit``) since the
    last full battery (``reference``: the cheap values there)."""
    if step in scheduled:
        return True, "scheduled"
    for name, limit in limits.items():
        if name in values and name in reference and abs(values[name] - reference[name]) >= limit:
            return True, f"{name} moved {values[name] - reference[name]:+.4g} (threshold {limit:g})"
    return False, ""


# ---------------------------------------------------------------- the KL probe


@dataclass
class KLProbe:
    """New-task prompts with the base's own continuations (prompt tokens masked), and for full
    fine-tuning the base's top-k next-token log-probs along them."""

    examples: list[dict[str, list[int]]]
    texts: list[tuple[str, str]]  # (prompt, continuation)
    lora: bool
    precision: str  # evals.precision: the KL is scored like every probe (the base's top-k too, so step 0 reads 0)
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None


def kl_prompts(task: TaskConfig, base_dir: Path, n: int) -> list[str]:
    """The first ``n`` prompts of the new task's data (:func:`forgetscope.data.prompt_of`; a
    text-only record gives its first 100 characters)."""
    records = data.load_records(task, base_dir, warn=False)[:n]  # training loads and warns
    return [data.prompt_of(r, task) or str(r.get(task.text_field, ""))[:100] for r in records]


PROBE_FORMAT = 2  # in the cache key: 2 labels the newline a chat template ends the prompt with (data.split_pair)


def build_kl_probe(model, tokenizer, recipe: Recipe, chat: bool, base_fingerprint: str) -> KLProbe:
    """Sample the base's continuations of the new task's prompts (seeded, plain sampling at T = 1,
    so the per-token KL along them estimates the sequence KL) and, for full fine-tuning, keep the
    base's top-k log-probs along them. ``model`` must still be the base. Cached on disk, keyed by
    the base's weights, the prompts and the settings, so recipes sharing a base sample once."""
    config, lora = recipe.cascade, recipe.method == "lora"
    prompts = kl_prompts(recipe.task, recipe.base_dir, config.kl_prompts)
    key_data = [
        PROBE_FORMAT,
        sampling.SAMPLER_VERSION,
        base_fingerprint,
        prompts,
        chat,
        config.kl_tokens,
        recipe.train.seed,
        recipe.train.seq_len,
        recipe.evals.precision,
        None if lora else config.kl_topk,
    ]
    path = cache_dir() / "kl_probe" / f"{hashlib.sha256(json.dumps(key_data).encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        return KLProbe(**torch.load(path, weights_only=True))
    rows = sampling.generate(
        model,
        tokenizer,
        prompts,
        chat,
        config.kl_tokens,
        temperature=1.0,
        top_p=1.0,
        seed=recipe.train.seed,
        desc="sampling the KL probe from the base",
    )
    records = [{"prompt": r["prompt"], "completion": r["text"]} for r in rows if r["text"]]
    examples = data.tokenize(
        records, tokenizer, TaskConfig(name=None, chat_template="on" if chat else "off"), recipe.train.seq_len
    )
    probe = KLProbe(examples, [(r["prompt"], r["completion"]) for r in records], lora, recipe.evals.precision)
    if not lora:
        with evaluate.scoring_precision(model, probe.precision):
            probe.topk_values, probe.topk_indices = base_topk(model, tokenizer, examples, config.kl_topk)
    io.write_torch(path, asdict(probe))
    return probe


@torch.no_grad()
def measure_kl(probe: KLProbe, model, tokenizer, batch_size: int = 16) -> dict:
    """``KL(base || model)`` per token on the probe, as an evaluation entry (the shape of
    :func:`forgetscope.evaluate.evaluate_model`'s): per item ``kl = [sum of per-token KL, tokens]``,
    so the corpus value is ``sum(num) / sum(den)``, nats per continuation token."""
    was_training = model.training
    model.eval()
    length = max(len(e["input_ids"]) for e in probe.examples)
    per_item: list[tuple[float, float]] = []
    with evaluate.scoring_precision(model, probe.precision):
        for start in range(0, len(probe.examples), batch_size):
            batch = collate(probe.examples[start : start + batch_size], tokenizer.pad_token_id, length)
            inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
            labels = batch["labels"].to(model.device)
            logits = model(**inputs).logits
            if probe.lora:
                with model.disable_adapter():
                    base_logits = model(**inputs).logits
            for i in range(len(labels)):
                row = slice(i, i + 1)
                tokens = float((labels[row, 1:] != -100).sum())
                if probe.lora:
                    kl = kl_full(base_logits[row], logits[row], labels[row])
                else:
                    values = probe.topk_values[start + i : start + i + 1].to(logits.device)
                    indices = probe.topk_indices[start + i : start + i + 1].to(logits.device)
                    kl = kl_topk(values, indices, logits[row], labels[row])
                per_item.append((float(kl) * tokens, tokens))  # kl_full/kl_topk compute in float32 from the logits
    model.train(was_training)
    means = np.array([num / den for num, den in per_item])
    value = sum(num for num, _ in per_item) / sum(den for _, den in per_item)
    samples = [
        {"item_id": f"kl-{i:03d}", "kl": [num, den], "metrics": ["kl"], "arguments": [[prompt, " " + text]]}
        for i, ((num, den), (prompt, text)) in enumerate(zip(per_item, probe.texts))
    ]
    result = {
        "role": "drift",
        "n": len(per_item),
        "metrics": {
            "kl": {
                "value": value,
                "stderr": float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else None,
                "higher_is_better": False,
            }
        },
    }
    return {"results": {metrics.KL_PROBE: result}, "samples": {metrics.KL_PROBE: samples}, "cached": []}


# ---------------------------------------------------------------- the cascade in a run


class Cascade:
    """Scores one snapshot at a time: the cheap probes, then the rest of the suite if
    :func:`decide` says so. State (the cheap values at the last full battery) lives in the
    manifest, so a resumed run decides as an uninterrupted one would."""

    def __init__(
        self,
        recipe: Recipe,
        suite: evaluate.EvalSuite,
        scheduled: list[int],
        layout: RunLayout,
        kl_probe: KLProbe | None,
    ):
        self.config, self.layout, self.kl_probe = recipe.cascade, layout, kl_probe
        # the cheap probes and the rest of the battery as two suites, made once: each keeps the
        # batch size it finds on first use (evaluate._lines_per_pass) for the whole run
        self.cheap, self.rest = (
            dataclasses.replace(suite, roles={t: r for t, r in suite.roles.items() if (t in recipe.cascade.cheap) == c})
            for c in (True, False)
        )
        self.scheduled = set(scheduled)
        self.limits = thresholds(recipe.cascade)
        self.record = layout.read_manifest().get("cascade") or {
            "scheduled": sorted(scheduled),
            "probe_steps": probe_steps(recipe.cascade.every, scheduled, recipe.train.steps),
            "thresholds": self.limits,
            "steps": {},
        }

    def _reference(self, step: int) -> dict[str, float]:
        """The cheap values at the last full battery before ``step``."""
        full = [int(s) for s, entry in self.record["steps"].items() if entry["full"] and int(s) < step]
        return self.record["steps"][str(max(full))]["values"] if full else {}

    def score(self, model, tokenizer, step: int) -> dict | None:
        """Evaluate ``model`` at ``step`` as the cascade decides (same shape as
        :func:`forgetscope.evaluate.evaluate_model`); records the decision in the manifest. Under
        several processes every one calls this and scores its share of each suite; rank 0 measures
        the KL, decides, records and returns the evaluation (the others get None)."""
        tick = time.time()
        out = evaluate.evaluate_model(model, tokenizer, self.cheap)
        cheap_s = time.time() - tick
        full, reason, values = False, "", {}
        if distributed.is_main():
            if self.kl_probe is not None:
                kl = measure_kl(self.kl_probe, model, tokenizer)
                out["results"].update(kl["results"])
                out["samples"].update(kl["samples"])
            values = {
                task: entry["metrics"][primary_metric(list(entry["metrics"]))]["value"]
                for task, entry in out["results"].items()
            }
            full, reason = decide(step, values, self._reference(step), self.limits, self.scheduled)
        kl_s = time.time() - tick - cheap_s
        full = distributed.broadcast(full)
        tick = time.time()
        if full:
            rest = evaluate.evaluate_model(model, tokenizer, self.rest)
            if rest is not None:
                for key in ("results", "samples"):
                    out[key].update(rest[key])
                out["cached"] += rest["cached"]
        if not distributed.is_main():
            return None
        self.record["steps"][str(step)] = {
            "values": values,
            "full": full,
            "reason": reason,
            "cheap_s": round(cheap_s, 2),
            "kl_s": round(kl_s, 2),
            "full_s": round(time.time() - tick, 2),
        }
        self.layout.update_manifest(cascade=self.record)
        return out


def start(
    recipe: Recipe,
    suite: evaluate.EvalSuite,
    scheduled: list[int],
    layout: RunLayout,
    model,
    tokenizer,
    chat: bool,
    base_fingerprint: str,
) -> Cascade:
    """The cascade of a run; ``model`` must still be the base (the KL probe's reference)."""
    probe = build_kl_probe(model, tokenizer, recipe, chat, base_fingerprint) if recipe.cascade.kl else None
    return Cascade(recipe, suite, scheduled, layout, probe)


# ---------------------------------------------------------------- measuring a cascade


def simulate(run: str | Path, limits: dict[str, float], level: float = 0.02) -> dict:
    """What a cascade with ``limits`` would have done on ``run``, a run that scored the full battery
    at every probe step (a cascade with thresholds 0): the steps it would score fully, its
    evaluation time against the full battery everywhere, and the forgetting it would miss: the peak
    of the general forgetting ``F_t`` over every step against over its full steps, the first step
    with ``F_t >= level`` in each, and how far the forgetting curve drawn through its full steps
    (linear between them) strays from the measured ``F_t`` at a skipped step.

    ``limits`` is the cascade simulated, as ``thresholds`` builds it from a ``cascade:`` section: a probe
    it names is scored at every probe step, one it leaves out is not (``{"new_task_kl": 1.0}`` is
    ``cheap: []``: the cheap probes are scored with the battery, at its steps only). Times are the
    medians over the probe steps of the recorded cheap (all cheap probes together), KL and
    rest-of-battery times, so that a busy machine at a few steps does not decide the comparison:
    everywhere ``n (cheap + rest)``, the cascade ``n probes + n_full battery``."""
    layout = RunLayout(Path(run))
    record = layout.read_manifest().get("cascade") or {}
    steps = {int(s): entry for s, entry in record.get("steps", {}).items()}
    if not steps or not all(entry["full"] for entry in steps.values()):
        raise UserError(
            f"{run}: needs a run whose cascade scored the full battery at every probe step; run the recipe "
            "with --set cascade.cheap_threshold=0 --set cascade.kl_threshold=0"
        )
    recorded = set(next(iter(steps.values()))["values"])
    if unknown := sorted(set(limits) - recorded):
        name = unknown[0]
        raise UserError(
            f"limits: {run} recorded no probe {name!r}{did_you_mean(name, recorded)} (it has {', '.join(sorted(recorded))})"
        )
    scheduled, full, reference = set(record["scheduled"]), [], {}
    for step in sorted(steps):
        chosen, _ = decide(step, steps[step]["values"], reference, limits, scheduled)
        if chosen:
            full.append(step)
            reference = steps[step]["values"]
    cheap, kl, rest = (float(np.median([e[key] for e in steps.values()])) for key in ("cheap_s", "kl_s", "full_s"))
    if min(cheap, rest) < 0.05:  # read from the result cache, not scored: no time to compare
        print(
            f"forgetscope: warning: {run}'s probes and battery took {cheap:.2f} s and {rest:.2f} s a step: results read "
            "from the result cache, so the times saved mean nothing; run it with an empty FORGETSCOPE_CACHE to time them",
            file=sys.stderr,
        )
    cheap_probes = any(name != metrics.KL_PROBE for name in limits)  # else the cheap probes go with the battery
    probe = (cheap if cheap_probes else 0.0) + (kl if metrics.KL_PROBE in limits else 0.0)
    battery = rest + (0.0 if cheap_probes else cheap)
    everywhere, cascade = len(steps) * (cheap + rest), len(steps) * probe + len(full) * battery
    rows = metrics.primary_rows(results.load_results([layout.root]))
    forgetting = metrics.general_forgetting(rows).set_index("step")["forgetting"]
    seen = forgetting[forgetting.index.isin(full)]
    strays = (forgetting - np.interp(forgetting.index, seen.index, seen.to_numpy())).abs()

    def first(series):
        hits = series[series >= level]
        return int(hits.index[0]) if len(hits) else None

    return {
        "probe_steps": sorted(steps),
        "full_steps": full,
        "step_s": {"cheap": cheap, "kl": kl, "rest": rest},
        "eval_s_everywhere": round(everywhere, 1),
        "eval_s_cascade": round(cascade, 1),
        "saved": round(1 - cascade / everywhere, 3) if everywhere else 0.0,
        "peak": float(forgetting.max()),
        "peak_step": int(forgetting.idxmax()),
        "peak_seen": float(seen.max()),
        "peak_seen_step": int(seen.idxmax()),
        "level": level,
        "first_at_level": first(forgetting),
        "first_at_level_seen": first(seen),
        "curve_error": float(strays.max()),
        "curve_error_step": int(strays.idxmax()),
    }
