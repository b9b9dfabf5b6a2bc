"""The on-disk run layout and the snapshot schedule.

```
runs/<name>/
  recipe.yaml              the resolved recipe (every default filled in, paths absolute)
  manifest.json            status, versions, seed, hashes, timings
  snapshots/step-000000/   meta.json (step 0 is the untouched base: no weights)
  snapshots/step-000050/   meta.json + adapter files (LoRA) or safetensors (full)
  evals/step-000050/       results.json (summary) + samples_<task>.jsonl (per item)
  curves.csv, curves.png   tidy table and figure of every step x task x metric
```
Every file and folder is written atomically (see :mod:`forgetscope.io`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetscope import io
from forgetscope.recipe import SnapshotConfig


def schedule(config: SnapshotConfig, steps: int) -> list[int]:
    """Steps to snapshot: always 0 (the base) and the last step (the model trained), and between
    them the schedule's."""
    if config.schedule == "at":
        return sorted({0, *config.at, steps})
    if config.schedule == "every":
        return sorted({0, *range(config.every, steps + 1, config.every), steps})
    # log: count-1 points log-spaced over 1..steps, rounded; duplicates at the dense end merge.
    points = np.unique(np.round(np.geomspace(1, steps, config.count - 1)).astype(int)) if steps > 0 else []
    return sorted({0, *(int(p) for p in points), steps})


def probe_steps(every: int | None, scheduled: list[int], total: int) -> list[int]:
    """The cascade's probe steps between the ``scheduled`` snapshots: every ``every`` steps up to ``total``."""
    if not every:
        return []
    taken = set(scheduled)
    return [s for s in range(every, total + 1, every) if s not in taken]


def step_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.csv"

    @property
    def figure(self) -> Path:
        return self.root / "curves.png"

    def snapshot(self, step: int) -> Path:
        return self.root / "snapshots" / step_name(step)

    def eval_dir(self, step: int) -> Path:
        return self.root / "evals" / step_name(step)

    def eval_steps(self) -> list[int]:
        """Steps whose evaluation finished (their results.json exists)."""
        return sorted(int(p.parent.name.split("-")[1]) for p in (self.root / "evals").glob("step-*/results.json"))

    def read_manifest(self) -> dict[str, Any]:
        manifest = io.read_json(self.manifest) if self.manifest.is_file() else {}
        if not isinstance(manifest, dict):
            raise io.damaged(self.manifest, "not a mapping")
        return manifest

    def update_manifest(self, **fields: Any) -> None:
        io.write_json(self.manifest, {**self.read_manifest(), **fields})


def save_snapshot(layout: RunLayout, step: int, model, tokenizer, meta: dict[str, Any], weights: bool) -> Path:
    """Write ``snapshots/step-N``: meta.json plus, when ``weights``, what ``save_pretrained`` writes
    (adapter files only for a peft model; full safetensors and the tokenizer otherwise)."""
    target = layout.snapshot(step)
    with io.atomic_dir(target) as tmp:
        if weights:
            model.save_pretrained(tmp, safe_serialization=True)
            if not hasattr(model, "peft_config"):
                tokenizer.save_pretrained(tmp)
        io.write_json(tmp / "meta.json", meta)
    return target


def save_eval(layout: RunLayout, step: int, tokens: int | None, evaluation: dict[str, Any]) -> Path:
    """Write ``evals/step-N``: results.json (summary per task, and the tokens trained on: None when
    the trainer did not count them) and samples_<task>.jsonl (per item)."""
    target = layout.eval_dir(step)
    with io.atomic_dir(target) as tmp:
        for task, samples in evaluation["samples"].items():
            lines = (json.dumps(s) for s in samples)
            (tmp / f"samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        io.write_json(tmp / "results.json", {"step": step, "tokens": tokens, "tasks": evaluation["results"]})
    return target
