"""Benchmark: sampling from the embedded SmolLM2-135M (the replay buffer's and the drift probe's
sampler) against transformers' ``generate`` at the batch size forgetscope used before. Writes JSON:
tokens/s (tokens the model produced, up to its end-of-sequence token) for each number of samples.

    python benchmarks/sampling_speed.py [--samples 64 1024 4096] [--out bench/sampling_speed_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 1024, 4096])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from forgetscope import data, models, sampling

    model, tokenizer = models.load(models.resolve(args.base))
    chat = bool(getattr(tokenizer, "chat_template", None))
    result = {
        "benchmark": "sampling (temperature 1, top-p 0.95) from the base",
        "base": args.base,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "max_new_tokens": args.max_new_tokens,
        "forgetscope": {},
    }
    for n in args.samples:
        prompts = sampling.generic_prompts(n, seed=0)
        tick = time.perf_counter()
        rows = sampling.generate(model, tokenizer, prompts, chat, args.max_new_tokens, 1.0, 0.95, seed=0)
        seconds = time.perf_counter() - tick
        tokens = sum(len(r["completion_ids"]) for r in rows)
        result["forgetscope"][n] = {
            "seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds),
        }
        print(n, result["forgetscope"][n], flush=True)

    # transformers' generate, 16 sequences a batch as forgetscope sampled before (the first 64 prompts)
    prompts = [data.render_prompt(p, tokenizer, chat) for p in sampling.generic_prompts(64, seed=0)]
    tokenizer.padding_side = "left"
    tick, tokens = time.perf_counter(), 0
    for start in range(0, len(prompts), 16):
        batch = tokenizer(prompts[start : start + 16], return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        tokens += int((out[:, batch["input_ids"].shape[1] :] != tokenizer.pad_token_id).sum())
    seconds = time.perf_counter() - tick
    result["transformers_generate_batch16_64_samples"] = {
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds),
    }
    out = Path(args.out or f"bench/sampling_speed_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
