"""ForgettingCallback in users' own training scripts: the example script offline (TensorBoard
included), peft models, the Trainer's log, bad settings, a crashing script, accelerate launch."""

import json
import os
import signal
import subprocess
import sys

import datasets
import pandas as pd
import pytest
from at_exit import threads_left
from conftest import ROOT, accelerate_launch, tiny_sft_trainer
from transformers import Trainer, TrainerCallback, TrainingArguments

from forgetscope import ForgettingCallback, cli, data, load_results, models, session
from forgetscope.callback import CallbackError
from forgetscope.io import BusyError
from forgetscope.recipe import TaskConfig

EXAMPLE = ROOT / "examples" / "trainer_callback.py"


def _run_example(tmp_path, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if launcher:  # CPU processes over gloo, also on a GPU machine (NCCL takes one GPU per process)
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [
        *(launcher or [sys.executable]),
        str(EXAMPLE),
        "--steps",
        "4",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--output-dir",
        str(tmp_path / "trainer_output"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)


def test_the_example_script_writes_a_run_that_report_gate_and_tensorboard_read(tmp_path, capsys):
    proc = _run_example(tmp_path, "--report-to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "my-sft"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["kind"] == "callback" and manifest["method"] == "full"
    table = load_results([root])
    assert sorted(table["step"].unique()) == manifest["snapshot_steps"] == [0, 1, 2, 3, 4]
    assert set(table["task"]) == {"numerals", "prose_ppl", "world_capitals"}
    assert (root / "curves.png").is_file() and (root / "train_log.csv").is_file()

    # TensorBoard got the same numbers, through the Trainer's own log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = {p.parent for p in (tmp_path / "trainer_output" / "runs").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("eval/forgetscope/prose_ppl/bits_per_byte")}
    bits = table[(table.task == "prose_ppl") & (table.metric == "bits_per_byte")].set_index("step")["value"]
    assert sorted(logged) == [0, 1, 2, 3, 4]
    assert [logged[s] for s in sorted(logged)] == pytest.approx(list(bits.sort_index()), rel=1e-6)

    assert cli.main(["report", str(root), "-o", str(tmp_path / "report")]) == 0
    assert "my-sft" in (tmp_path / "report" / "report.md").read_text()
    policy = tmp_path / "policy.yaml"
    policy.write_text("general:\n  default: {max_drop: 10}\n")
    assert cli.main(["gate", str(root), "--policy", str(policy)]) == 0
    shipped = ROOT / "examples" / "callback_policy.yaml"  # the one the example's docstring names
    assert f"--policy examples/{shipped.name}" in EXAMPLE.read_text()
    assert cli.main(["gate", str(root), "--policy", str(shipped), "--out", str(tmp_path / "ci")]) in (0, 1)
    assert json.loads((tmp_path / "ci" / "gate.json").read_text())["verdict"] in ("pass", "fail")


def _trainer(tmp_path, lora: bool = False, steps: int = 4, callbacks=(), **settings) -> Trainer:
    """A plain Trainer of the tiny model, as a user's script builds it; ``settings`` override its
    TrainingArguments."""
    model, tokenizer = models.load(models.resolve("tiny-random"))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    task = TaskConfig(max_examples=32)
    examples = data.tokenize(data.load_records(task, None), tokenizer, task, 48)
    args = TrainingArguments(
        str(tmp_path / "out"),
        **{
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "report_to": [],
            "use_cpu": True,
            "logging_steps": 1,
            "save_strategy": "no",
            **settings,
        },
    )
    from transformers import DataCollatorForSeq2Seq

    return Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=list(callbacks),
    )


def test_a_peft_model_is_scored_and_its_scores_reach_the_trainers_log(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "cache"))  # a cache hit below is this run's step 0
    trainer = _trainer(tmp_path, lora=True)
    callback = ForgettingCallback(
        trainer,
        evals={"general": ["prose_ppl"], "limit": 3},
        snapshots={"schedule": "at", "at": [2, 4]},
        name="peft",
        runs_dir=str(tmp_path / "runs"),
    )
    trainer.add_callback(callback)
    trainer.train()
    root = tmp_path / "runs" / "peft"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["status"] == "finished"
    table = pd.read_csv(root / "curves.csv")
    bits = table[table.metric == "bits_per_byte"].set_index("step")["value"]
    assert list(bits.index) == [0, 2, 4] and bits.nunique() == 3  # the adapters trained between snapshots
    logged = {
        e["step"]: e["eval_forgetscope/prose_ppl/bits_per_byte"]
        for e in trainer.state.log_history
        if "eval_forgetscope/prose_ppl/bits_per_byte" in e
    }
    assert logged == pytest.approx(bits.to_dict(), rel=1e-9)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]  # no loss log swallowed

    # step 0 is the base: the plain model's evaluation is the same cache entry
    from forgetscope import evaluate
    from forgetscope.recipe import EvalConfig

    base, tokenizer = models.load(models.resolve("tiny-random"))
    base.to(trainer.model.device)  # the trainer's device (the CPU), as the cache is kept per device kind
    suite = evaluate.prepare_suite(EvalConfig(new=[], general=["prose_ppl"], limit=3), tmp_path, chat=False)
    direct = evaluate.evaluate_model(base, tokenizer, suite)
    assert direct["cached"] == ["prose_ppl"]
    assert direct["results"]["prose_ppl"]["metrics"]["bits_per_byte"]["value"] == bits[0]


def test_bad_settings_are_refused_before_training(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(CallbackError) as err:
        ForgettingCallback(
            trainer,
            evals={"general": ["prose_pp"], "limt": 3},
            snapshots={"schedule": "evry"},
            runs_dir=str(tmp_path / "runs"),
        )
    lines = str(err.value).splitlines()
    assert any("evals.limt: unknown key; did you mean 'limit'?" in line for line in lines)
    assert any("snapshots.schedule: expected" in line for line in lines)
    with pytest.raises(CallbackError, match="did you mean 'prose_ppl'"):
        ForgettingCallback(trainer, evals={"general": ["prose_pp"]}, runs_dir=str(tmp_path / "runs"))
    with pytest.raises(CallbackError, match=r"name: '\.\./elsewhere' must be ASCII letters"):  # it would leave runs_dir
        ForgettingCallback(
            trainer, evals={"general": ["prose_ppl"]}, name="../elsewhere", runs_dir=str(tmp_path / "runs")
        )
    trainer.processing_class = None
    with pytest.raises(CallbackError, match="processing_class=tokenizer"):
        ForgettingCallback(trainer, evals={"general": ["prose_ppl"]}, runs_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_script_that_crashes_leaves_the_run_marked_failed(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from transformers import TrainerCallback
from test_callback import _trainer
from forgetscope import ForgettingCallback

class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("the user's script broke")

trainer = _trainer(Path({str(tmp_path)!r}), callbacks=[Boom()])
trainer.add_callback(ForgettingCallback(trainer, evals={{"general": ["prose_ppl"], "limit": 2}},
                                        snapshots={{"schedule": "at", "at": [2, 4]}}, runs_dir={str(tmp_path / "runs")!r}))
trainer.train()
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1 and "the user's script broke" in proc.stderr
    root = tmp_path / "runs" / "forgetting"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "the user's script broke" in manifest["error"]
    assert sorted(p.name for p in (root / "evals").iterdir()) == ["step-000000", "step-000002"]


@pytest.mark.slow
def test_the_example_under_accelerate_launch_with_two_processes(tmp_path):
    launcher = [*accelerate_launch(2), str(ROOT / "tests" / "at_exit.py"), str(tmp_path / "exits")]
    proc = _run_example(tmp_path, "--lora", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert threads_left(tmp_path / "exits") == [[], []]  # the group is gone before exit: the callback keeps no Trainer
    root = tmp_path / "runs" / "my-sft"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["processes"] == 2 and manifest["method"] == "lora"
    assert sorted(pd.read_csv(root / "curves.csv")["step"].unique()) == [0, 1, 2, 3, 4]


def test_trl_sft_trainers_own_train_metrics_stay_in_its_train_records(tmp_path):
    """SFTTrainer's log adds the metrics it accumulates (entropy, mean_token_accuracy, num_tokens)
    to whatever is logged next and clears them, picking train or eval ones by the model's mode:
    the snapshot's scores are logged as Trainer.evaluate logs, in eval mode, so they take none."""
    trainer = tiny_sft_trainer(tmp_path / "sft")
    trainer.add_callback(
        ForgettingCallback(
            trainer,
            evals={"general": ["prose_ppl"], "limit": 2},
            snapshots={"schedule": "at", "at": [2, 4]},
            runs_dir=str(tmp_path / "runs"),
        )
    )
    trainer.train()
    trl_metrics = {"entropy", "mean_token_accuracy", "num_tokens"}
    train = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and all(trl_metrics <= set(e) for e in train)
    scores = [e for e in trainer.state.log_history if "eval_forgetscope/prose_ppl/bits_per_byte" in e]
    assert [e["step"] for e in scores] == [0, 2, 4]
    assert not any(key.removeprefix("eval_") in trl_metrics for e in scores for key in e)
    log = pd.read_csv(tmp_path / "runs" / "forgetting" / "train_log.csv")
    assert log["mean_token_accuracy"].notna().all() and list(log["step"]) == [1, 2, 3, 4]


def test_every_bad_setting_is_one_line_and_steps_are_the_trainers_max_steps(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(CallbackError) as err:
        ForgettingCallback(trainer, evals=["prose_ppl"], snapshots={"schedule": "every"}, name="../x")
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("ForgettingCallback: ") for line in lines)
    assert "evals: expected a mapping of keys (new:, general:" in lines[0]
    assert any("snapshots.every: set a positive interval" in line for line in lines)
    assert any("name: '../x' must be ASCII letters" in line for line in lines)
    with pytest.raises(CallbackError) as err:  # the evals' names are checked beside a bad schedule
        ForgettingCallback(trainer, evals={"general": ["prose_pp"]}, snapshots={"schedule": "every"})
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "did you mean 'prose_ppl'" in lines[0] and "snapshots.every" in lines[1]

    callback = ForgettingCallback(
        trainer,
        evals={"general": ["prose_ppl"], "limit": 2},
        snapshots={"schedule": "at", "at": [2, 50]},
        runs_dir=str(tmp_path / "runs"),
    )
    trainer.add_callback(callback)
    with pytest.raises(CallbackError) as err:
        trainer.train()
    assert str(err.value) == (
        "ForgettingCallback: snapshots.at: steps [50] fall outside 0..the Trainer's max_steps=4; list steps 0 to 4"
    )
    # the run folder was left free: the script can build the callback again
    ForgettingCallback(trainer, evals={"general": ["prose_ppl"]}, runs_dir=str(tmp_path / "runs")).session.release()


EVALS = {"general": ["prose_ppl"], "limit": 2}
AT_2_4 = {"schedule": "at", "at": [2, 4]}


class _Boom(TrainerCallback):
    """The user's script breaks after step ``at`` (in this process: a notebook's cell fails)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise RuntimeError("the user's script broke")


def _evals(root) -> list[str]:
    return sorted(p.name for p in (root / "evals").iterdir())


def test_a_training_begun_again_from_step_0_is_refused_and_a_resumed_one_goes_on(tmp_path):
    runs, root = str(tmp_path / "runs"), tmp_path / "runs" / "twice"
    counting = {"include_num_input_tokens_seen": True, "save_strategy": "steps", "save_steps": 2}
    trainer = _trainer(tmp_path, callbacks=[_Boom(3)], **counting)
    trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, snapshots=AT_2_4, name="twice", runs_dir=runs))
    with pytest.raises(RuntimeError, match="the user's script broke"):
        trainer.train()
    assert _evals(root) == ["step-000000", "step-000002"]

    # the same script again from scratch (another learning rate): its steps 4 would follow the other's step 2
    trainer = _trainer(tmp_path, learning_rate=1e-4)
    trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, snapshots=AT_2_4, name="twice", runs_dir=runs))
    with pytest.raises(CallbackError) as err:
        trainer.train()
    assert str(err.value) == (
        f"ForgettingCallback: {root} holds snapshots of an earlier training (steps [2]) and this training starts "
        "at step 0; give another name= (or remove that folder), or continue that training with "
        "trainer.train(resume_from_checkpoint=...)"
    )
    assert _evals(root) == ["step-000000", "step-000002"] and not (root / "curves.csv").exists()
    assert json.loads((root / "manifest.json").read_text())["status"] == "failed"  # the crashed training's

    # resumed from its checkpoint, the first training goes on where it stopped
    trainer = _trainer(tmp_path, **counting)
    trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, snapshots=AT_2_4, name="twice", runs_dir=runs))
    trainer.train(resume_from_checkpoint=True)
    assert json.loads((root / "manifest.json").read_text())["status"] == "finished"
    tokens = pd.read_csv(root / "curves.csv").groupby("step")["tokens"].first()
    assert list(tokens.index) == [0, 2, 4] and tokens[0] == 0 < tokens[2] < tokens[4]


def test_a_training_resumed_into_a_new_run_folder_is_refused_before_anything_is_written(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[_Boom(3)], save_strategy="steps", save_steps=2)
    with pytest.raises(RuntimeError, match="the user's script broke"):
        trainer.train()  # without the callback: checkpoint-2 is all there is
    runs, root = str(tmp_path / "runs"), tmp_path / "runs" / "late"
    trainer = _trainer(tmp_path)
    trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, snapshots=AT_2_4, name="late", runs_dir=runs))
    with pytest.raises(CallbackError) as err:
        trainer.train(resume_from_checkpoint=True)
    assert str(err.value) == (
        f"ForgettingCallback: {root} has no step 0 (the base) and this training resumes at step 2: there is no "
        "base to measure forgetting from; add the callback from the training's first step, or score the base "
        "and the checkpoints with `forgetscope audit --base ... --checkpoints ...`"
    )
    assert not (tmp_path / "runs").exists()
    ForgettingCallback(trainer, evals=EVALS, name="late", runs_dir=runs)  # the folder was left free


def test_a_callback_built_again_in_the_same_process_takes_the_folder_over(tmp_path):
    runs, root = str(tmp_path / "runs"), tmp_path / "runs" / "nb"

    def build() -> Trainer:
        trainer = _trainer(tmp_path, steps=2)
        trainer.add_callback(
            ForgettingCallback(trainer, evals=EVALS, snapshots={"schedule": "at", "at": [2]}, name="nb", runs_dir=runs)
        )
        return trainer

    first = build()
    second = build()  # a notebook's cell run again, the first Trainer still alive
    with pytest.raises(CallbackError, match=f"this callback no longer holds {root} .*took it over"):
        first.train()
    second.train()
    assert json.loads((root / "manifest.json").read_text())["status"] == "finished"
    assert _evals(root) == ["step-000000", "step-000002"]

    # a folder that another process holds is still refused
    lock = session.lock_file(tmp_path / "runs" / "other")
    lock.parent.mkdir(parents=True, exist_ok=True)
    hold = (
        "import fcntl, os, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write(f'forgetscope process {os.getpid()}'); f.flush(); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"in use by forgetscope process {holder.pid};"):
            ForgettingCallback(_trainer(tmp_path), evals=EVALS, name="other", runs_dir=runs)
    finally:
        holder.stdin.close()
        holder.wait()


def test_sigterm_marks_the_run_failed_unless_the_script_handles_sigterm_itself(tmp_path):
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from transformers import TrainerCallback
from test_callback import EVALS, AT_2_4, _trainer
from forgetscope import ForgettingCallback

class Stop(TrainerCallback):  # docker stop, a SLURM time limit
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

trainer = _trainer(Path({str(tmp_path)!r}), callbacks=[Stop()])
trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, snapshots=AT_2_4, runs_dir={str(tmp_path / "runs")!r}))
trainer.train()
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]  # killed by it, as without the callback
    root = tmp_path / "runs" / "forgetting"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "stopped by SIGTERM"
    assert _evals(root) == ["step-000000", "step-000002"]

    # in this process: the callback's handler only while it trains, and a script's own handler is left alone
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(signal.getsignal(signal.SIGTERM))

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        for name, before in (("default", signal.SIG_DFL), ("own", handler)):
            signal.signal(signal.SIGTERM, before)
            trainer = _trainer(tmp_path, steps=1, callbacks=[Probe()])
            trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, name=name, runs_dir=str(tmp_path / "runs")))
            trainer.train()
            assert signal.getsignal(signal.SIGTERM) is before
        assert seen[0] not in (signal.SIG_DFL, handler) and seen[1] is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_tokens_a_plain_trainer_does_not_count_are_recorded_as_unknown_not_0(tmp_path):
    trainer = _trainer(tmp_path)  # include_num_input_tokens_seen is off by default
    trainer.add_callback(ForgettingCallback(trainer, evals=EVALS, snapshots=AT_2_4, runs_dir=str(tmp_path / "runs")))
    trainer.train()
    root = tmp_path / "runs" / "forgetting"
    recorded = {
        s: json.loads((root / "evals" / f"step-00000{s}" / "results.json").read_text())["tokens"] for s in (0, 2, 4)
    }
    assert recorded == {0: 0, 2: None, 4: None}
    tokens = pd.read_csv(root / "curves.csv").groupby("step", dropna=False)["tokens"].agg(lambda t: list(t.unique()))
    assert tokens[0] == [0] and all(pd.isna(t) for t in tokens[2] + tokens[4])
