"""Benchmark: training throughput at the GPU shape (SmolLM2-135M full fine-tuning, 64 x 512 tokens a
step, bf16 autocast over fp32 weights): forgetscope's Trainer against a bare transformers Trainer with
the same settings and a plain PyTorch loop. Writes JSON: ms/step, tokens/s and model FLOPs
utilisation (MFU = 6 x parameters x tokens/s / the GPU's dense bf16 peak) of each, and forgetscope's
overhead over the bare Trainer.

    python benchmarks/train_speed.py [--compile] [--steps 20] [--out bench/train_speed_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s by GPU name


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (the GPU synchronised at its end)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def steady_ms(ends: list[float], warmup: int) -> float:
    """Mean milliseconds per step after ``warmup`` steps."""
    timed = ends[warmup:]
    return 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)


def examples(vocab: int, batch: int, seq: int, steps: int) -> list[dict[str, list[int]]]:
    """Full rows of random tokens: every position trains, nothing is padding."""
    ids = torch.randint(3, vocab, (batch * steps, seq), generator=torch.Generator().manual_seed(0)).tolist()
    return [{"input_ids": row, "labels": row, "attention_mask": [1] * seq} for row in ids]


def settings(args) -> dict:
    return {
        "base": args.base,
        "method": "full",
        "task": {"name": "numerals"},
        "train": {
            "lr": 1e-4,
            "steps": args.steps,
            "batch_size": args.batch,
            "seq_len": args.seq,
            "warmup_steps": 2,
            "precision": "bf16",
            "compile": args.compile,
            "max_grad_norm": 1.0,
        },
        "snapshots": {"schedule": "at", "at": [args.steps], "resumable": False, "keep_weights": False},
        "evals": {"new": [], "general": ["prose_ppl"]},
        "runs_dir": tempfile.mkdtemp(),
    }


def run_forgetscope(args, path: str, data: list[dict]) -> list[float]:
    from forgetscope import models, train
    from forgetscope.load import recipe_from_dict

    recipe = recipe_from_dict(settings(args))
    model, tokenizer = models.load(path)
    model = train.prepare_model(model, recipe)
    timer = StepTimer()
    snapshot = train.SnapshotCallback([], lambda *a: None)  # the run's callbacks, with no snapshot in the timed steps
    trainer = train.make_trainer(model, tokenizer, data, recipe, tempfile.mkdtemp(), [snapshot, timer])
    trainer.train()
    return timer.ends


def run_trainer(args, path: str, data: list[dict], liger: bool = False) -> list[float]:
    """A bare Trainer with forgetscope's settings (bf16, fused AdamW, the same schedule and clipping);
    ``liger``: with transformers' ``use_liger_kernel`` (fused kernels, the loss without full logits)."""
    import datasets
    from transformers import DataCollatorForSeq2Seq

    from forgetscope import models, seams, train

    model, tokenizer = models.load(path)
    if args.compile:
        train.compile_blocks(model)
        seams.compile_loss(model)
    timer = StepTimer()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        warmup_steps=2,
        max_grad_norm=1.0,
        bf16=True,
        optim="adamw_torch_fused",
        save_strategy="no",
        report_to=[],
        logging_steps=max(1, args.steps // 20),
        dataloader_drop_last=True,
        use_liger_kernel=liger,
    )
    Trainer(
        model=model,
        args=targs,
        train_dataset=datasets.Dataset.from_list(data),
        callbacks=[timer],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    ).train()
    return timer.ends


def run_loop(args, path: str, data: list[dict]) -> list[float]:
    """A plain PyTorch loop: bf16 autocast, fused AdamW, clipping."""
    from forgetscope import models, seams, train

    model, _ = models.load(path)
    if args.compile:
        train.compile_blocks(model)
        seams.compile_loss(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(rows: list[dict]) -> None:
        ids = torch.tensor([r["input_ids"] for r in rows], device=model.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ends = []
    for index in range(args.steps):
        step(data[index * args.batch : (index + 1) * args.batch])
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
    if args.profile:  # 3 more steps under the profiler, outside the timing
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for index in range(3):
                step(data[index * args.batch : (index + 1) * args.batch])
            torch.cuda.synchronize()
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6, help="steps left out of the timing (compilation, allocator)")
    parser.add_argument(
        "--compile", action="store_true", help="train.compile: regional torch.compile of the blocks, and the loss"
    )
    parser.add_argument(
        "--variants", default="forgetscope,trainer,loop", help="also: trainer_liger (pip install liger-kernel)"
    )
    parser.add_argument("--profile", action="store_true", help="print the plain loop's top CUDA kernels")
    parser.add_argument("--out", default=None, help="default bench/train_speed_cuda[_compile].json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_speed.py measures the GPU path; no CUDA device here")

    from forgetscope import models

    path = models.resolve(args.base)
    model, _ = models.load(path)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    del model
    data = examples(vocab, args.batch, args.seq, args.steps)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    result = {
        "benchmark": "full fine-tuning steps at the GPU shape; bf16 autocast, fp32 weights, fused AdamW",
        "base": args.base,
        "parameters": params,
        "batch": args.batch,
        "seq_len": args.seq,
        "compile": args.compile,
        "steps_timed": args.steps - args.warmup - 1,
        "device": name,
        "peak_bf16_flops": peak,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "variants": {},
    }
    runners = {
        "forgetscope": run_forgetscope,
        "trainer": run_trainer,
        "loop": run_loop,
        "trainer_liger": lambda *a: run_trainer(*a, liger=True),
    }
    for variant in args.variants.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tick = time.perf_counter()
        ends = runners[variant](args, path, data)
        ms = steady_ms(ends, args.warmup)
        tokens_per_s = args.batch * args.seq / (ms / 1000)
        result["variants"][variant] = {
            "ms_per_step": round(ms, 1),
            "tokens_per_s": round(tokens_per_s),
            "mfu": round(6 * params * tokens_per_s / peak, 3) if peak else None,
            "first_steps_s": round(ends[args.warmup] - tick, 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
        }
        print(variant, result["variants"][variant], flush=True)
    if {"forgetscope", "trainer"} <= set(result["variants"]):
        ours, bare = result["variants"]["forgetscope"]["ms_per_step"], result["variants"]["trainer"]["ms_per_step"]
        result["forgetscope_overhead_over_trainer"] = round(ours / bare - 1, 3)
    out = Path(args.out or f"bench/train_speed_cuda{'_compile' if args.compile else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
