"""Benchmark: score 5 LoRA snapshots with forgetscope vs. the `lm_eval` CLI once per snapshot.

Both sides score the same adapters on the same tasks, limit, batch size, device and dtype (fp32,
plain prompts). forgetscope (`forgetscope audit`, with an empty result cache so nothing is reused)
loads the base once, overwrites the adapter weights in place and scores with them merged, runs
prefixes that requests share once (a question for its answers) and computes logits only where
scored; the CLI starts a process, indexes its tasks and loads base + adapter for every snapshot.
Writes JSON with timings, peak memory and whether the scores agree.

    python benchmarks/eval_speed.py --out bench/eval_speed_cpu_limit20.json [--base smollm2-135m] [--limit 20]
        [--device cuda] [--batch-size 64]      (--limit 0: every item of every task)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TASKS = ["numerals", "world_capitals", "mmlu_shipped", "prose_ppl"]


def make_adapters(base_path: str, folder: Path, count: int = 5) -> list[Path]:
    """``count`` seeded LoRA adapters (r=16, all linear layers) whose updates grow with the index."""
    import torch
    from peft import LoraConfig, get_peft_model

    from forgetscope import models

    paths = []
    for i in range(count):
        model, _ = models.load(base_path)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002 * (i + 1))
        path = folder / f"checkpoint-{(i + 1) * 10}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=20, help="items per task; 0: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="both sides (forgetscope: lines of 128 tokens; lm_eval: requests) per forward pass; "
        "default 16 on the CPU, 64 on CUDA",
    )
    parser.add_argument("--snapshots", type=int, default=5, help="LoRA snapshots to score")
    parser.add_argument("--out", default=None, help="default bench/eval_speed_<device>_limit<limit>.json")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (64 if args.device == "cuda" else 16)
    args.out = args.out or f"bench/eval_speed_{args.device}_limit{args.limit or 'all'}.json"
    limit = args.limit or None

    from forgetscope import models
    from forgetscope.audit import audit
    from forgetscope.recipe import EvalConfig
    from forgetscope.registry import evals_dir

    base_path = models.resolve(args.base)  # conversion (if any) happens before the clocks start
    work = Path(tempfile.mkdtemp(prefix="forgetscope-bench-"))
    adapters = make_adapters(base_path, work / "adapters", args.snapshots)
    os.environ["FORGETSCOPE_CACHE"] = str(work / "cache")  # empty result cache: everything is scored
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # all four as general probes: each in its own lm-eval format, the requests the CLI scores (a new task
    # would be joined as training joins prompt and completion, which the CLI does not do)
    evals = EvalConfig(new=[], general=TASKS, limit=limit, batch_size=args.batch_size)
    tick = time.perf_counter()
    root = audit(
        base_path, [str(work / "adapters")], evals, name="bench", runs_dir=str(work / "runs"), chat_template="off"
    )
    ours_s = time.perf_counter() - tick
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import pandas as pd

    base_eval_s = json.loads((root / "manifest.json").read_text())["timings"]["eval_s"]["step-000000"]
    table = pd.read_csv(root / "curves.csv")
    cli_s, diffs, accuracies_equal = [], [], []  # diffs: (relative difference, where)
    for step, adapter in zip(range(10, 10 * len(adapters) + 1, 10), adapters):
        out = work / f"cli-{step}"
        cmd = [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={base_path},peft={adapter},dtype=float32",
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            str(evals_dir()),
            *(["--limit", str(limit)] if limit else []),
            "--batch_size",
            str(args.batch_size),
            "--device",
            args.device,
            "--output_path",
            str(out),
        ]
        tick = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_s.append(time.perf_counter() - tick)
        theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
        for row in table[table.step == step].itertuples():
            other = theirs[row.task][f"{row.metric},none"]
            if row.metric.startswith("acc"):
                accuracies_equal.append(row.value == other)
            else:
                where = {
                    "step": step,
                    "task": row.task,
                    "metric": row.metric,
                    "forgetscope": row.value,
                    "lm_eval": other,
                }
                diffs.append((abs(row.value - other) / max(abs(other), 1e-12), where))
    cli_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    worst = max(diffs, key=lambda d: d[0])

    result = {
        "benchmark": f"score {len(adapters)} LoRA snapshots: forgetscope (base loaded once, adapters swapped) vs lm_eval CLI once per snapshot",
        "base": args.base,
        "tasks": TASKS,
        "limit": limit,
        "batch_size": args.batch_size,
        "dtype": "float32",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "forgetscope_total_s": round(ours_s, 1),
        "forgetscope_total_includes": "loading the base, scoring the base (step 0) and the snapshots",
        "forgetscope_snapshots_s": round(ours_s - base_eval_s, 1),
        "forgetscope_per_snapshot_s": round((ours_s - base_eval_s) / len(adapters), 2),
        "forgetscope_snapshots_includes": "the total minus scoring the base, which the CLI runs do not do",
        "lm_eval_cli_s": round(sum(cli_s), 1),
        "lm_eval_cli_per_snapshot_s": [round(s, 1) for s in cli_s],
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if args.device == "cuda" else None,
        "speedup": round(sum(cli_s) / (ours_s - base_eval_s), 2),
        "speedup_including_the_base": round(sum(cli_s) / ours_s, 2),
        "scores_compared": len(diffs) + len(accuracies_equal),
        "accuracies_identical": all(accuracies_equal),
        "max_relative_difference_of_other_scores": worst[0],
        "largest_difference": worst[1],
        "scores_identical": all(accuracies_equal) and worst[0] < 1e-6,
        "scores_identical_means": "every accuracy equal; log-likelihoods and perplexities equal to float32 rounding "
        "(relative 1e-6: forgetscope sums the same terms in a different order)",
        "peak_rss_mb": {"forgetscope": round(ours_rss), "lm_eval_cli_largest_process": round(cli_rss)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
