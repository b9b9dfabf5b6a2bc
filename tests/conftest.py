"""Shared fixtures. Tests never touch the network: the Hugging Face offline switches are set."""

import json
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh cache per test session: converted models, base samples and cached results start empty.
os.environ["FORGETSCOPE_CACHE"] = tempfile.mkdtemp(prefix="forgetscope-test-cache-")

from pathlib import Path

import numpy as np
import pytest

from forgetscope.snapshots import RunLayout

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def accelerate_launch(processes: int, precision: str = "no") -> list[str]:
    """The ``accelerate launch`` command line for ``processes`` local processes at ``precision``."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", precision, "--dynamo_backend", "no"]  # fmt: skip


@pytest.fixture
def tiny_recipe_data() -> dict:
    """The content of a minimal recipe on the tiny random model (3 steps, cheap evals)."""
    return {
        "name": "t",
        "base": "tiny-random",
        "method": "lora",
        "task": {"name": "numerals", "max_examples": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 1e-2, "steps": 3, "batch_size": 4, "seq_len": 64, "warmup_steps": 0, "precision": "fp32"},
        "snapshots": {"schedule": "at", "at": [1, 3]},
        "evals": {"new": ["numerals"], "general": ["prose_ppl"], "limit": 4},
    }


def make_fake_run(
    root: Path,
    steps_items: dict[int, dict[str, object]],
    task="facts",
    metric="acc",
    method="full",
    learned: float = 1.0,
) -> RunLayout:
    """A run folder with per-item samples of one general task (and a new task, scored 0 at the
    first step and ``learned`` after it) at given steps."""
    layout = RunLayout(root)
    root.mkdir(parents=True)
    layout.manifest.write_text(json.dumps({"status": "finished", "method": method}))
    for i, (step, items) in enumerate(sorted(steps_items.items())):
        folder = layout.eval_dir(step)
        folder.mkdir(parents=True)
        values = list(items.values())
        if metric == "bits_per_byte":  # items hold [log-likelihood, bytes]; lm-eval's corpus value
            value = -sum(v[0] for v in values) / sum(v[1] for v in values) / math.log(2)
        else:
            value = sum(values) / len(values)
        (folder / f"samples_{task}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "item_id": k,
                        metric: v,
                        "metrics": [metric],
                        "target": 0,
                        "arguments": [[f"Question {k}?", f" answer {k}"]],
                    }
                )
                + "\n"
                for k, v in items.items()
            )
        )
        (folder / "samples_new.jsonl").write_text(
            json.dumps({"item_id": "n0", "acc": learned * (i > 0), "metrics": ["acc"]}) + "\n"
        )
        (folder / "results.json").write_text(
            json.dumps(
                {
                    "step": step,
                    "tokens": step * 10,
                    "tasks": {
                        "new": {
                            "role": "new",
                            "n": 1,
                            "metrics": {"acc": {"value": learned * (i > 0), "stderr": None, "higher_is_better": True}},
                        },
                        task: {
                            "role": "general",
                            "n": len(items),
                            "metrics": {
                                metric: {"value": float(value), "stderr": None, "higher_is_better": metric == "acc"}
                            },
                        },
                    },
                }
            )
        )
    return layout


@pytest.fixture
def fake_run():
    """A factory of run folders with hand-made per-item results (no model involved)."""
    return make_fake_run


def add_fake_probe(
    layout: RunLayout, task: str, steps_items: dict[int, dict[str, float]], choices: int = 1, role: str = "general"
) -> None:
    """Add a 0/1 probe with ``choices`` answers per item to every step of a fake run (see
    :func:`make_fake_run`); a step missing from ``steps_items`` leaves the probe unscored there."""
    for step, items in steps_items.items():
        folder = layout.eval_dir(step)
        args = [[f"Q {task}?", f" choice {c}"] for c in range(choices)]
        (folder / f"samples_{task}.jsonl").write_text(
            "".join(
                json.dumps({"item_id": k, "acc": v, "metrics": ["acc"], "target": 0, "arguments": args}) + "\n"
                for k, v in items.items()
            )
        )
        result = json.loads((folder / "results.json").read_text())
        result["tasks"][task] = {
            "role": role,
            "n": len(items),
            "metrics": {
                "acc": {"value": float(np.mean(list(items.values()))), "stderr": None, "higher_is_better": True}
            },
        }
        (folder / "results.json").write_text(json.dumps(result))


@pytest.fixture
def fake_probe():
    """Adds a probe to a fake run (:func:`add_fake_probe`)."""
    return add_fake_probe


@pytest.fixture
def bf16_accelerator():
    """A fresh accelerate ``Accelerator`` with bf16 mixed precision, as a Trainer makes one (its
    process-wide state is reset before and after: earlier tests set it up without mixed precision)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from forgetscope import seams

    if not torch.cuda.is_available() and not seams.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 for accelerate's mixed precision")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(mixed_precision="bf16", cpu=not torch.cuda.is_available())
    AcceleratorState._reset_state(reset_partial_state=True)


def make_probe_run(
    root: Path, steps: dict, value_of, metric="acc", task="probe", higher=True, subtasks=None, weight_by_size=None
) -> RunLayout:
    """A finished run folder with one general probe: ``steps`` maps step -> {item_id: per-item value
    as forgetscope stores it}, and each step's corpus value is ``value_of(items)`` (lm-eval's
    aggregation of them); ``subtasks``: the probe is a group of these tasks, weighted as
    ``weight_by_size`` says (None: not recorded, as runs scored before forgetscope recorded it)."""
    layout = RunLayout(root)
    root.mkdir(parents=True)
    layout.manifest.write_text(json.dumps({"status": "finished", "method": "full"}))
    for step, items in steps.items():
        folder = layout.eval_dir(step)
        folder.mkdir(parents=True)
        rows = [{"item_id": k, metric: v, "metrics": [metric], "target": 0} for k, v in items.items()]
        (folder / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {metric: {"value": float(value_of(items)), "stderr": None, "higher_is_better": higher}}
        result = {
            "step": step,
            "tokens": step,
            "tasks": {
                task: {
                    "role": "general",
                    "n": len(items),
                    "metrics": metrics,
                    **({"subtasks": subtasks} if subtasks else {}),
                    **({"weight_by_size": {metric: weight_by_size}} if weight_by_size is not None else {}),
                }
            },
        }
        (folder / "results.json").write_text(json.dumps(result))
    return layout


@pytest.fixture
def probe_run():
    """A factory of run folders of one probe under any metric and aggregation (:func:`make_probe_run`)."""
    return make_probe_run


def tiny_sft_trainer(out: Path, save_steps: int | None = None, **kwargs):
    """TRL's SFTTrainer as a user builds it: 4 steps of the tiny model on the numerals task's
    prompt-completion rows (completions led by a space), saving every ``save_steps`` (never: None);
    ``kwargs`` go to SFTTrainer (``peft_config``)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from forgetscope import data, models
    from forgetscope.recipe import TaskConfig

    model, tokenizer = models.load(models.resolve("tiny-random"))
    rows = [
        {"prompt": r["prompt"], "completion": " " + r["completion"]}
        for r in data.load_records(TaskConfig(max_examples=32), None)
    ]
    saving = {"save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    config = SFTConfig(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        max_length=64,
        bf16=False,
        **saving,
    )
    return SFTTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, **kwargs
    )


class Tango:
    """Tango's (1998) score test of a paired change of a proportion, computed independently of
    forgetscope: the maximum-likelihood share of right -> wrong items under H0 found numerically
    (scipy), not by the closed form forgetscope uses, and bounds by root finding. ``Tango(lost,
    gained, n)`` for one pool; ``Tango.stratified([(lost, gained, n), ...], weights)`` for a group of
    subtasks: Zou and Donner's MOVER combination of each subtask's Tango bounds."""

    def __init__(self, lost: int, gained: int, n: int):
        self.strata, self.weights = [(lost, gained, n)], [1.0]

    @classmethod
    def stratified(cls, strata: list[tuple[int, int, int]], weights: list[float]) -> "Tango":
        test = cls(*strata[0])
        test.strata, test.weights = strata, [w / sum(weights) for w in weights]
        return test

    @property
    def change(self) -> float:
        return sum(w * (gained - lost) / n for w, (lost, gained, n) in zip(self.weights, self.strata))

    @staticmethod
    def _z(lost: int, gained: int, n: int, d0: float) -> float:
        """One stratum's statistic, its restricted MLE found numerically."""
        from scipy.optimize import minimize_scalar

        rest = n - lost - gained

        def minus_loglik(q: float) -> float:
            terms = [(gained, q + d0), (lost, q), (rest, 1 - 2 * q - d0)]
            return -sum(count * math.log(p) for count, p in terms if count)

        low, high = max(0.0, -d0), (1 - d0) / 2
        bounds = (low + 1e-13, high - 1e-13)
        q = minimize_scalar(minus_loglik, bounds=bounds, method="bounded", options={"xatol": 1e-14}).x
        return (gained - lost - n * d0) / math.sqrt(n * (2 * q + d0 * (1 - d0)))

    @classmethod
    def _bound(cls, lost: int, gained: int, n: int, z: float) -> float:
        """One stratum's change where its statistic equals ``z`` (brentq)."""
        from scipy.optimize import brentq

        change = (gained - lost) / n
        if z == 0 or (abs(change) == 1 and change * z < 0):  # nothing lies beyond an edge
            return change
        inside = min(max(change, -0.999999), 0.999999)  # the likelihood needs a change strictly inside (-1, 1)
        low, high = (-0.999999, inside) if z > 0 else (inside, 0.999999)
        f = lambda d: cls._z(lost, gained, n, d) - z  # noqa: E731
        if f(low) * f(high) > 0:  # no root inside: the bound sits at the edge of what is possible
            return low if z > 0 else high
        return brentq(f, low, high, xtol=1e-12)

    def bound(self, z: float) -> float:
        """The bound at ``z`` (lower for z > 0, upper for z < 0)."""
        if len(self.strata) == 1:
            return self._bound(*self.strata[0], z)
        spread = math.sqrt(
            sum(w * w * (self._bound(*s, z) - (s[1] - s[0]) / s[2]) ** 2 for w, s in zip(self.weights, self.strata))
        )
        return self.change - math.copysign(spread, z)

    def z(self, d0: float) -> float:
        """The statistic of H0 "the change is d0": the z whose bound is d0."""
        from scipy.optimize import brentq

        if len(self.strata) == 1:
            return self._z(*self.strata[0], d0)
        return brentq(lambda z: self.bound(z) - d0, -30, 30, xtol=1e-10)

    def p_noninferior(self, margin: float) -> float:
        """One-sided p of H0: the accuracy fell by ``margin`` or more."""
        from scipy.stats import norm

        return float(norm.sf(self.z(-margin)))

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The two-sided score interval of the change (new accuracy minus old)."""
        from scipy.stats import norm

        z = norm.isf((1 - confidence) / 2)
        return self.bound(z), self.bound(-z)

    def drop_bound(self, level: float) -> float:
        """The one-sided ``1 - level`` upper bound of the drop (the accuracy's fall)."""
        from scipy.stats import norm

        return -self.bound(norm.isf(level))


@pytest.fixture
def tango():
    """Tango's score test, independently (:class:`Tango`): ``tango(lost, gained, n)``."""
    return Tango
