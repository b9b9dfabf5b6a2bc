"""Several processes: each scores its share of a snapshot's requests, rank 0 gathers, and the
scores equal one process's. Two CPU processes over gloo, started by torchrun."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from at_exit import threads_left
from conftest import ROOT

from forgetscope import evaluate, models
from forgetscope.recipe import EvalConfig

TASKS = dict(new=["numerals"], general=["world_capitals", "mmlu_shipped", "prose_ppl"], limit=12)

WORKER = textwrap.dedent("""
    import json, os, sys
    from forgetscope import distributed, evaluate, models, scoring
    from forgetscope.recipe import EvalConfig

    distributed.init()
    shares = []
    original = scoring.PackedLM._loglikelihood_tokens
    def counting(self, requests, *args, **kwargs):
        shares.append(len(requests))
        return original(self, requests, *args, **kwargs)
    scoring.PackedLM._loglikelihood_tokens = counting
    with distributed.main_first():
        path = models.resolve("tiny-random")
    model, tokenizer = models.load(path)
    suite = evaluate.prepare_suite(EvalConfig(**json.loads(sys.argv[2])), sys.argv[3], chat=False)
    result = evaluate.evaluate_model(model.eval(), tokenizer, suite)
    out = {"rank": distributed.rank(), "world": distributed.world_size(), "requests": sum(shares), "result": result}
    with open(os.path.join(sys.argv[1], f"rank{distributed.rank()}.json"), "w") as fh:
        json.dump(out, fh)
    distributed.finish()  # leave the process group, as PyTorch asks of every process
""")


@pytest.mark.slow
def test_two_processes_score_their_shares_and_agree_with_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "one"))
    model, tokenizer = models.load(models.resolve("tiny-random"))
    model = model.cpu()  # compared with CPU processes: the same kernels
    alone = evaluate.evaluate_model(
        model.eval(), tokenizer, evaluate.prepare_suite(EvalConfig(**TASKS), ROOT, chat=False)
    )

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    # CPU processes over gloo, also on a GPU machine (NCCL takes one GPU per process)
    env = {**os.environ, "FORGETSCOPE_CACHE": str(tmp_path / "two"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(ROOT / "tests" / "at_exit.py"),
            str(tmp_path / "exits"),
            str(script),
            str(tmp_path),
            json.dumps(TASKS),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert threads_left(tmp_path / "exits") == [[], []]  # each process left the group and it is gone
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[1]["result"] is None  # rank 1 handed its share to rank 0
    assert min(r["requests"] for r in ranks) > 0  # both scored
    gathered = ranks[0]["result"]
    for task, result in alone["results"].items():
        for metric, value in result["metrics"].items():
            theirs = gathered["results"][task]["metrics"][metric]["value"]
            assert theirs == pytest.approx(value["value"], rel=1e-5), (task, metric)
        ids = sorted(map(str, (s["item_id"] for s in alone["samples"][task])))
        assert sorted(map(str, (s["item_id"] for s in gathered["samples"][task]))) == ids  # every item, once


def test_fsdp_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from forgetscope import cli

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    assert cli.main(["run", str(ROOT / "recipes" / "tiny.yaml"), "--set", f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert "FSDP is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
