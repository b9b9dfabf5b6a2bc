"""Faults: a run folder in use, a diverging loss, over-long examples, pickle weights, remote code."""

import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

from forgetscope import cli, io, models, train
from forgetscope.load import load_recipe
from forgetscope.runner import run


def _write(tmp_path, data, name="r.yaml"):
    data = {**data, "runs_dir": str(tmp_path / "runs")}
    (tmp_path / name).write_text(yaml.safe_dump(data))
    return tmp_path / name


def test_a_run_folder_in_use_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from forgetscope import io\n"
                f"with io.exclusive(Path({str(lock)!r}), 'runs/x'):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(io.BusyError, match=r"runs/x is in use by forgetscope process \d+"),
        io.exclusive(lock, "runs/x"),
    ):
        pass
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
    with io.exclusive(lock, "runs/x"):  # the kernel released the dead process's lock
        pass


def test_a_report_glancing_at_a_lock_does_not_turn_a_writer_away(tmp_path):
    """A report asks whether a run is being written by taking a reader's lock for an instant; a
    writer starting in that instant waited instead of being refused."""
    import fcntl
    import threading

    lock = tmp_path / "x.lock"
    lock.write_text("")
    reader = open(lock)  # noqa: SIM115
    fcntl.flock(reader, fcntl.LOCK_SH)
    threading.Timer(0.03, reader.close).start()  # lets go 30 ms later
    with io.exclusive(lock, "runs/x"):
        pass


def test_second_run_on_the_same_folder_exits_2(tmp_path, tiny_recipe_data, capsys, monkeypatch):
    path = _write(tmp_path, tiny_recipe_data)
    recipe = load_recipe(path)
    from forgetscope import session

    with io.exclusive(session.lock_file(tmp_path / "runs" / "t"), "held by test"):
        assert cli.main(["run", str(path)]) == 2
    assert "is in use by" in capsys.readouterr().err
    assert run(recipe).name == "t"  # free again afterwards


def test_a_run_folder_written_by_a_process_with_another_cache_is_refused(tmp_path, monkeypatch):
    """The cache's lock excludes processes that share a cache; a writer with another
    FORGETSCOPE_CACHE (another user, another machine on a shared disk) is met by the folder's own
    lock before anything of it is touched."""
    from forgetscope.session import FOLDER_LOCK, RunSession

    root = tmp_path / "runs" / "x"
    writer = RunSession(root, {}, "another run")
    with writer.locked():
        writer.start(None, None)
        (root / "step-000001.tmp-1").write_text("a temporary of the live writer")
        monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "other-cache"))
        other = RunSession(root, {}, "another run")
        with other.locked(), pytest.raises(io.BusyError, match=rf"{root} is in use by forgetscope process \d+"):
            other.start(None, None)
        assert (root / "step-000001.tmp-1").is_file()  # not swept from under the writer
    assert (root / FOLDER_LOCK).is_file()
    with other.locked():
        other.start(None, None)  # free again once the writer let go
    assert not (root / "step-000001.tmp-1").exists()


def test_a_nan_loss_stops_the_run_and_keeps_earlier_results(tmp_path, tiny_recipe_data, capsys, monkeypatch):
    original = train.SnapshotCallback.on_step_end

    def poison(self, args, state, control, model=None, **kwargs):
        original(self, args, state, control, model=model, **kwargs)
        if state.global_step == 1:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    monkeypatch.setattr(train.SnapshotCallback, "on_step_end", poison)
    data = {
        **tiny_recipe_data,
        "train": {**tiny_recipe_data["train"], "steps": 6},
        "snapshots": {"schedule": "at", "at": [1, 6]},
    }
    path = _write(tmp_path, data)
    assert cli.main(["run", str(path), "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "Try a lower train.lr" in err
    root = tmp_path / "runs" / "t"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "TrainingDiverged" in manifest["error"]
    assert (root / "evals" / "step-000001" / "results.json").is_file()  # the snapshot before the NaN stays
    assert not (root / "evals" / "step-000006").exists()


def test_over_long_examples_are_counted_and_can_be_an_error(tmp_path, tiny_recipe_data, capsys):
    from forgetscope import data as fdata
    from forgetscope.recipe import TaskConfig

    records = [
        {"prompt": "short", "completion": "ok"},
        {"prompt": "x" * 40, "completion": "y" * 40},  # truncated inside the completion
        {"prompt": "x" * 80, "completion": "y"},  # the prompt fills seq_len: nothing left to learn
    ]
    examples = fdata.tokenize(records, models.byte_tokenizer(), TaskConfig(name=None), 64)
    err = capsys.readouterr().err
    assert len(examples) == 2 and "2 of 3 examples are longer than train.seq_len=64" in err
    assert "1 of 3 examples keep no completion token within train.seq_len=64 and are left out" in err
    with pytest.raises(fdata.DataError, match=r"2 of 3 examples are longer than train\.seq_len=64"):
        fdata.tokenize(records, models.byte_tokenizer(), TaskConfig(name=None, too_long="error"), 64)


def test_pickle_weights_need_an_explicit_opt_in(tmp_path):
    model, tokenizer = models.load(models.resolve("tiny-random"))
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the old pickle format
    with pytest.raises(models.ModelError, match="allow_pickle: true"):
        models.load(str(folder))
    loaded, _ = models.load(str(folder), allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_trust_remote_code_is_off_unless_asked_and_recorded(tmp_path, tiny_recipe_data):
    recipe = load_recipe(_write(tmp_path, tiny_recipe_data))
    assert recipe.trust_remote_code is False and recipe.allow_pickle is False
    root = run(recipe)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["trust_remote_code"] is False and manifest["allow_pickle"] is False


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_curves(tmp_path, tiny_recipe_data):
    """SIGKILL a run at 5 random moments; running the same command again finishes it, recomputes
    nothing that was finished, and gives the curves of an uninterrupted run."""
    import os
    import random
    import signal

    import pandas as pd

    data = {
        **tiny_recipe_data,
        "method": "full",
        "lora": None,
        "train": {**tiny_recipe_data["train"], "steps": 200, "lr": 3e-3},
        "snapshots": {"schedule": "every", "every": 20},
        "evals": {**tiny_recipe_data["evals"], "limit": 3},
    }
    baseline = run(load_recipe(_write(tmp_path, {**data, "name": "straight"}, "straight.yaml")))
    expected = pd.read_csv(baseline / "curves.csv").drop(columns=["run", "recipe"])

    path = _write(tmp_path, {**data, "name": "killed"}, "killed.yaml")
    command = [sys.executable, "-m", "forgetscope", "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(0)
    root = tmp_path / "runs" / "killed"

    def evaluated() -> int:
        return len(list(root.glob("evals/step-*/results.json")))

    for _ in range(5):
        # Kill at a random point of progress (1-2 new evaluations, then 0-0.4 s more: inside a
        # training step, an evaluation or a checkpoint save), whatever the machine's speed.
        target = evaluated() + rng.randint(1, 2)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while proc.poll() is None and evaluated() < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (root / "manifest.json").is_file():  # whatever is on disk parses: nothing half-written
            json.loads((root / "manifest.json").read_text())
            for results in root.glob("evals/step-*/results.json"):
                json.loads(results.read_text())
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_from"].startswith("stage-1/checkpoint-")
    assert not list(root.glob("**/*.tmp-*"))
    got = pd.read_csv(root / "curves.csv").drop(columns=["run", "recipe"])
    pd.testing.assert_frame_equal(got, expected)
    log, straight_log = (pd.read_csv(folder / "train_log.csv") for folder in (root, baseline))
    assert list(log.columns) == list(straight_log.columns) and log["step"].tolist() == straight_log["step"].tolist()


@pytest.mark.parametrize(
    "error,advice",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "lower train.batch_size"),
        (OSError(28, "No space left on device"), "the disk is full"),
    ],
)
def test_out_of_memory_and_full_disk_say_what_to_change(tmp_path, tiny_recipe_data, capsys, monkeypatch, error, advice):
    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(train.Trainer, "train", fail)
    assert cli.main(["run", str(_write(tmp_path, tiny_recipe_data))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: error:")]
    assert len(err) == 1 and advice in err[0] and "run the same command to resume" in err[0]
    manifest = json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())
    assert manifest["status"] == "failed"


def test_ctrl_c_is_one_line_and_the_run_goes_on_when_run_again(tmp_path, tiny_recipe_data, capsys, monkeypatch):
    real = train.Trainer.train

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "train", interrupted)
    path = str(_write(tmp_path, tiny_recipe_data))
    assert cli.main(["run", path]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "forgetscope: interrupted; what finished is kept: run the same command to go on"
    assert not any("Traceback" in line for line in err)
    assert json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.setattr(train.Trainer, "train", real)
    assert cli.main(["run", path]) == 0


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, tiny_recipe_data):
    """docker stop, SLURM and timeout send SIGTERM: the run is marked failed (not left "running"),
    the command says so in one line with exit code 143, and the same command finishes it."""
    import os
    import signal

    data = {**tiny_recipe_data, "train": {**tiny_recipe_data["train"], "steps": 200}}
    data["snapshots"] = {"schedule": "every", "every": 20}
    command = [sys.executable, "-m", "forgetscope", "run", str(_write(tmp_path, data))]
    root = tmp_path / "runs" / "t"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list(root.glob("evals/step-*/results.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM, err[-5:]
    assert "forgetscope: stopped by SIGTERM; what finished is kept: run the same command to go on" in err
    assert not any("Traceback" in line for line in err)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "SIGTERM" in manifest["error"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads((root / "manifest.json").read_text())["status"] == "finished"


def test_sigterm_ends_a_forked_child_quietly(capfd, monkeypatch):
    """A process forked under `forgetscope` (lm-eval's bootstrap pool for perplexity metrics)
    inherits the SIGTERM handler; the pool ends its workers with SIGTERM at every snapshot. The
    worker dies as SIGTERM's default action kills it, without a `Terminated` traceback."""
    import multiprocessing
    import signal

    exitcodes = []

    def command(args):
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        child = ctx.Process(target=lambda: (ready.set(), time.sleep(60)))
        child.start()
        assert ready.wait(30)
        child.terminate()  # SIGTERM, as multiprocessing.Pool.terminate sends it
        child.join(30)
        exitcodes.append(child.exitcode)

    monkeypatch.setattr(cli, "_cmd_fields", command)
    assert cli.main(["fields"]) == 0
    assert exitcodes == [-signal.SIGTERM]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Terminated" not in err, err


def test_nothing_touches_the_network_when_offline(tmp_path, tiny_recipe_data):
    """A whole run with every socket connection refused (HF offline variables set, as `make` does)."""
    path = _write(tmp_path, tiny_recipe_data)
    script = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network access attempted')\n"
        "def local_only(connect):\n"  # the data loader's workers talk over local (AF_UNIX) sockets
        "    return lambda s, *a, **k: connect(s, *a, **k) if s.family == socket.AF_UNIX else refuse()\n"
        "socket.socket.connect = local_only(socket.socket.connect)\n"
        "socket.socket.connect_ex = local_only(socket.socket.connect_ex)\n"
        "socket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
        "from forgetscope.cli import main\n"
        f"sys.exit(main(['run', {str(path)!r}]))\n"
    )
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network access attempted" not in proc.stderr
    assert json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())["status"] == "finished"


def test_a_full_disk_leaves_no_temporary_and_a_clear_failure(tmp_path, monkeypatch, capsys):
    # the write that fills the disk leaves no half-written temporary; marking the run failed on that disk
    # fails too: a warning, and the first error (with its advice) is what the user sees
    import errno

    from forgetscope.session import RunError, RunSession

    target = tmp_path / "manifest.json"

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(io.os, "replace", full)
        with pytest.raises(OSError):
            io.write_text(target, "{}")
    assert list(tmp_path.iterdir()) == []
    session = RunSession(tmp_path / "run", {}, "another run")
    with session.locked():
        session.start(None, None)
        monkeypatch.setattr(io.os, "replace", full)
        with pytest.raises(RunError, match="the disk is full"), session.failing():
            full()
    assert "could not mark" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.tmp-*"))


def test_unwritable_run_and_cache_folders_are_one_line(tmp_path, monkeypatch):
    from forgetscope.errors import UserError
    from forgetscope.session import RunError, RunSession

    (tmp_path / "file").write_text("")
    session = RunSession(tmp_path / "file" / "run", {}, "another run")
    with session.locked(), pytest.raises(RunError, match="cannot create the run folder"):
        session.start(None, None)
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(UserError, match=r"cannot write forgetscope's cache .* FORGETSCOPE_CACHE"):
        RunSession(tmp_path / "run", {}, "another run").acquire()


def test_a_damaged_result_cache_entry_is_scored_again(tmp_path, monkeypatch):
    from forgetscope import evaluate
    from forgetscope.recipe import EvalConfig

    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path))
    model, tokenizer = models.load(models.resolve("tiny-random"))
    suite = evaluate.prepare_suite(EvalConfig(new=[], general=["world_capitals"], limit=3), tmp_path, chat=False)
    first = evaluate.evaluate_model(model.eval(), tokenizer, suite)
    [entry] = (tmp_path / "results").glob("*.json")
    entry.write_text(entry.read_text()[:40])  # cut short
    again = evaluate.evaluate_model(model, tokenizer, suite)
    assert again["cached"] == [] and again["results"] == first["results"]
    assert evaluate.evaluate_model(model, tokenizer, suite)["cached"] == ["world_capitals"]  # rewritten
