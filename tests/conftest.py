"""Shared fixtures. Tests never touch the network: the Hugging Face offline switches are set."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh cache per test session: converted models, base samples and cached results start empty.
os.environ["FORGETSCOPE_CACHE"] = tempfile.mkdtemp(prefix="forgetscope-test-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


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
