"""Audit of what trainers really write: a plain Trainer's output folder without tokenizer files,
sharded safetensors, peft adapters with modules_to_save and resized embeddings, TRL's SFTTrainer,
axolotl's layout, Hugging Face ids; the lock and failure marking of the one flow."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import pandas as pd
import pytest
import torch
from conftest import tiny_sft_trainer
from transformers import Trainer, TrainingArguments, default_data_collator

from forgetscope import audit, cli, data, evaluate, io, models, session
from forgetscope.recipe import EvalConfig, TaskConfig

GENERAL = ["--general", "prose_ppl", "--limit", "3"]


def _examples(tokenizer, n: int = 32, length: int = 48) -> list[dict]:
    """numerals examples padded to one length, as scripts that pre-tokenize do (no collator
    holding the tokenizer, so the Trainer never sees it)."""
    task = TaskConfig(max_examples=n)
    out = []
    for ex in data.tokenize(data.load_records(task, None), tokenizer, task, length):
        pad = length - len(ex["input_ids"])
        out.append(
            {
                "input_ids": ex["input_ids"] + [tokenizer.pad_token_id] * pad,
                "labels": ex["labels"] + [-100] * pad,
                "attention_mask": ex["attention_mask"] + [0] * pad,
            }
        )
    return out


def _plain_trainer(out, model, tokenizer, steps: int = 4, save_steps: int = 2) -> Trainer:
    """A user's plain transformers Trainer: not handed the tokenizer."""
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(_examples(tokenizer)),
        data_collator=default_data_collator,
    )
    trainer.train()
    trainer.save_model(str(out))
    return trainer


def _audit(tmp_path, checkpoints: list[str], *extra: str, name: str = "a", base: str = "tiny-random") -> int:
    return cli.main(
        [
            "audit",
            "--base",
            base,
            "--checkpoints",
            *checkpoints,
            *GENERAL,
            *extra,
            "--name",
            name,
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )


def _bits(tmp_path, name: str = "a") -> pd.Series:
    table = pd.read_csv(tmp_path / "runs" / name / "curves.csv")
    return table[(table.task == "prose_ppl") & (table.metric == "bits_per_byte")].set_index("step")["value"]


def test_a_plain_trainers_output_without_tokenizer_files(tmp_path, capsys):
    model, tokenizer = models.load(models.resolve("tiny-random"))
    _plain_trainer(tmp_path / "out", model, tokenizer)
    assert not models.has_tokenizer(tmp_path / "out" / "checkpoint-2")  # what the user had
    assert _audit(tmp_path, [str(tmp_path / "out")]) == 0, capsys.readouterr().err
    bits = _bits(tmp_path)
    # checkpoint-2, checkpoint-4; the final model in out/ is step 4 again, so it is not scored twice
    assert list(bits.index) == [0, 2, 4] and bits.nunique() == 3
    table = pd.read_csv(tmp_path / "runs" / "a" / "curves.csv")
    assert set(table["task"]) == {"prose_ppl"}  # no new task is scored unless asked (--new)
    manifest = json.loads((tmp_path / "runs" / "a" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["kind"] == "audit"


def test_a_vocabulary_the_base_tokenizer_overruns_is_one_line_before_anything_is_written(tmp_path, capsys):
    model, _ = models.load(models.resolve("tiny-random"))
    model.resize_token_embeddings(200)  # fewer rows than the byte tokenizer's 259 tokens
    model.save_pretrained(tmp_path / "small")
    assert _audit(tmp_path, [str(tmp_path / "small")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: error:")]
    assert len(err) == 1 and "vocabulary (200 tokens) is smaller than its base's tokenizer (259)" in err[0]
    assert not (tmp_path / "runs").exists()


def test_sharded_safetensors_score_like_the_single_file(tmp_path):
    model, _tokenizer = models.load(models.resolve("tiny-random"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.3)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert _audit(tmp_path, [str(tmp_path / "one")], name="one") == 0
    assert _audit(tmp_path, [str(tmp_path / "sharded")], name="sharded") == 0
    assert _bits(tmp_path, "sharded")[1] == _bits(tmp_path, "one")[1] != _bits(tmp_path, "one")[0]


def _adapter_with_resized_vocabulary(folder):
    """A LoRA adapter trained after adding two tokens: resized embeddings, the output layer in
    modules_to_save, the tokenizer saved beside (as a Trainer handed it does)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load(models.resolve("tiny-random"))
    tokenizer.add_tokens(["<ticket>", "<reply>"])
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_adapter_with_modules_to_save_and_resized_embeddings(tmp_path, capsys):
    _adapter_with_resized_vocabulary(tmp_path / "adapter")
    assert _audit(tmp_path, [str(tmp_path / "adapter")]) == 0, capsys.readouterr().err
    assert _bits(tmp_path)[1] == pytest.approx(_fresh_bits(tmp_path / "adapter", tmp_path), rel=1e-9)
    assert _bits(tmp_path)[1] != _bits(tmp_path)[0]


def test_fingerprints_count_modules_to_save():
    """Two adapters that differ only in their modules_to_save copy are different snapshots; the
    original layer under the copy hashes as the base's."""
    from peft import LoraConfig, get_peft_model

    base, _ = models.load(models.resolve("tiny-random"))
    base_fp = evaluate.fingerprint(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert evaluate.fingerprint(model, base_only=True) == base_fp
    first = evaluate.fingerprint(model, base=base_fp)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "modules_to_save" in n).add_(1.0)
    assert evaluate.fingerprint(model, base=base_fp) != first


def test_axolotl_layout_checkpoints_and_the_final_adapter_beside_them(tmp_path, capsys):
    """axolotl (and HF Trainer with peft) write checkpoint-N/ with adapter files and
    trainer_state.json, and the final adapter into the output folder itself."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load(models.resolve("tiny-random"))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _plain_trainer(tmp_path / "out", model, tokenizer, steps=5, save_steps=2)
    shutil.rmtree(tmp_path / "out" / "checkpoint-5")  # the end of the run is only in out/ itself
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert _audit(tmp_path, [str(tmp_path / "out")]) == 0, capsys.readouterr().err
    bits = _bits(tmp_path)
    assert list(bits.index) == [0, 2, 4, 5] and bits.nunique() == 4  # step 5 from max_steps in trainer_state.json
    meta = json.loads((tmp_path / "runs" / "a" / "snapshots" / "step-000005" / "meta.json").read_text())
    assert meta["source"] == str(tmp_path / "out")


def test_trl_sft_trainer_checkpoints(tmp_path, capsys):
    """TRL's SFTTrainer with a LoRA config: its checkpoint-N folders hold adapters."""
    from peft import LoraConfig

    trainer = tiny_sft_trainer(
        tmp_path / "sft", save_steps=2, peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    trainer.train()
    assert (tmp_path / "sft" / "checkpoint-4" / "adapter_config.json").is_file()
    assert _audit(tmp_path, [str(tmp_path / "sft")], "--new", "numerals") == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "runs" / "a" / "curves.csv")
    assert set(table["step"]) == {0, 2, 4} and set(table["task"]) == {"numerals", "prose_ppl"}
    assert _bits(tmp_path).nunique() == 3


def test_hugging_face_ids_as_base_and_checkpoint(tmp_path):
    """Both come from the local HF cache (offline): a base and a fine-tune published on the Hub."""
    hub = tmp_path / "hub"
    for repo, scale in (("org/base", 1.0), ("org/tuned", 1.2)):
        model, tokenizer = models.load(models.resolve("tiny-random"))
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)
        folder = hub / f"models--{repo.replace('/', '--')}"
        model.save_pretrained(folder / "snapshots" / "c0ffee")
        tokenizer.save_pretrained(folder / "snapshots" / "c0ffee")
        io.write_text(folder / "refs" / "main", "c0ffee")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "forgetscope",
        "audit",
        "--base",
        "org/base",
        "--checkpoints",
        "org/tuned",
        *GENERAL,
        "--name",
        "a",
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bits = _bits(tmp_path)
    assert list(bits.index) == [0, 1] and bits[0] != bits[1]
    cmd[cmd.index("org/tuned")] = "org/missing"
    missing = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert missing.returncode == 2 and "huggingface-cli download org/missing" in missing.stderr


def test_audit_takes_the_lock_and_marks_a_failure(tmp_path, capsys, monkeypatch):
    model, _tokenizer = models.load(models.resolve("tiny-random"))
    model.save_pretrained(tmp_path / "ckpt")
    root = tmp_path / "runs" / "a"
    with io.exclusive(session.lock_file(root), "held by test"):
        assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 2
    assert "is in use by" in capsys.readouterr().err and not root.exists()

    original, calls = evaluate.evaluate_model, []

    def broken(*args, **kwargs):  # the base (step 0) scores, the checkpoint does not
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("scoring broke")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", broken)
    with pytest.raises(RuntimeError, match="scoring broke"):
        _audit(tmp_path, [str(tmp_path / "ckpt")])
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "scoring broke" in manifest["error"]
    assert (root / "evals" / "step-000000" / "results.json").is_file()  # the base's evaluation stays
    monkeypatch.setattr(evaluate, "evaluate_model", original)
    assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 0  # the same command finishes it
    assert json.loads((root / "manifest.json").read_text())["status"] == "finished"


def test_an_adapter_trained_on_another_base_is_one_line(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load(models.resolve("tiny-random"))  # hidden 32
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert _audit(tmp_path, [str(tmp_path / "adapter")], base="scratch:layers=2,hidden=16,heads=2,seed=0") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope:")]  # not the bars
    assert len(err) == 1 and "its adapter does not fit the --base (size mismatch for " in err[0]
    assert "lora_A.weight: (2, 32), where the base's layer maps 16 to 16); give the base it was trained from" in err[0]
    assert not (tmp_path / "runs").exists()  # found before anything is written


def test_tasks_include_names_a_missing_folder(capsys):
    assert cli.main(["tasks", "--include", "/no/such/folder"]) == 2
    assert "--include /no/such/folder: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--limit", "-3"], "forgetscope audit: error: argument --limit: expected a whole number of items, 0 for all"),
        (
            ["--base", "tiny-randon"],
            "forgetscope: error: --base: unknown model 'tiny-randon'; did you mean 'tiny-random'?",
        ),
        (["--general", "prose_pl"], "forgetscope: error: --new/--general: unknown eval task 'prose_pl'; did you mean"),
    ],
)
def test_a_bad_audit_flag_is_named_as_the_flag(tmp_path, capsys, flags, message):
    argv = ["audit", "--base", "tiny-random", "--checkpoints", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    try:
        code = cli.main([*argv, *flags])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message)
    assert "recipe" not in err[0] and "null" not in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_full_checkpoint_of_another_architecture_is_refused_before_anything_is_written(tmp_path, capsys):
    model, tokenizer = models.load(models.resolve("scratch:layers=1,hidden=16,heads=2,seed=0"))
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    assert _audit(tmp_path, [str(tmp_path / "other")]) == 2  # against tiny-random: hidden 32, 2 layers
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope:")]
    assert len(err) == 1 and "not a fine-tune of the --base (hidden_size 16, num_hidden_layers 1" in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_given_twice_is_refused(tmp_path):
    model, _ = models.load(models.resolve("tiny-random"))
    model.save_pretrained(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(audit.AuditError, match="checkpoint-2 is given twice"):
        audit.find_checkpoints([str(tmp_path / "out"), str(tmp_path / "out" / "checkpoint-2")])


def _early_stopped_trainer(out, model, tokenizer) -> Trainer:
    """A plain Trainer planned for 40 steps, evaluated and saved every 2, that EarlyStoppingCallback
    stops at step 4 (no improvement counts); load_best_model_at_end keeps the highest eval loss,
    step 2's, so the final model saved into ``out`` holds checkpoint-2's weights."""
    from transformers import EarlyStoppingCallback

    examples = datasets.Dataset.from_list(_examples(tokenizer))
    args = TrainingArguments(
        str(out),
        max_steps=40,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        eval_dataset=examples.select(range(4)),
        data_collator=default_data_collator,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=100.0)],
    )
    trainer.train()
    trainer.save_model(str(out))
    return trainer


def test_an_early_stopped_runs_final_model_takes_the_step_where_training_ended(tmp_path, capsys):
    """Not max_steps (40, a step that never ran): the Trainer saved checkpoint-4 where it stopped,
    so the final model is that step, already scored, and left out with one line naming the best
    checkpoint whose weights load_best_model_at_end gave it."""
    model, tokenizer = models.load(models.resolve("tiny-random"))
    trainer = _early_stopped_trainer(tmp_path / "out", model, tokenizer)
    assert trainer.state.global_step == 4 and trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert _audit(tmp_path, [str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert list(_bits(tmp_path).index) == [0, 2, 4]
    manifest = json.loads((tmp_path / "runs" / "a" / "manifest.json").read_text())
    assert manifest["snapshot_steps"] == [0, 2, 4] and {row["step"] for row in manifest["final_vs_base"]} == {4}
    [line] = [line for line in capsys.readouterr().err.splitlines() if "final model" in line]
    assert "training ended at step 4, scored from checkpoint-4" in line
    assert f"best_model_checkpoint {trainer.state.best_model_checkpoint}" in line


def _fake_checkpoint(folder, **state) -> None:
    """A folder that looks like a model (config.json), with ``state`` as its trainer_state.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps(state))


def test_a_final_model_past_the_latest_checkpoint_of_an_early_stopping_run_is_left_out(tmp_path, capsys):
    """An early-stopping run (best_model_checkpoint set) whose latest checkpoint is not where it
    stopped: the final model's step is not recorded anywhere, so it is left out, in one line."""
    _fake_checkpoint(tmp_path / "out", global_step=None)  # the final model, no trainer_state.json
    (tmp_path / "out" / "trainer_state.json").unlink()
    _fake_checkpoint(
        tmp_path / "out" / "checkpoint-6", global_step=6, max_steps=40, best_model_checkpoint="x/checkpoint-6"
    )
    found = audit.find_checkpoints([str(tmp_path / "out")])
    assert [(c.step, c.folder.name) for c in found] == [(6, "checkpoint-6")]
    [line] = [line for line in capsys.readouterr().err.splitlines() if "final model" in line]
    assert "left out" in line and "after step 6" in line and "give it alone to score it" in line


def test_checkpoints_numbered_by_order_or_merged_from_several_runs_are_named(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "run" / "checkpoint-3")
    _fake_checkpoint(tmp_path / "final")
    found = audit.find_checkpoints([str(tmp_path / "run"), str(tmp_path / "final")])
    assert [(c.step, c.folder.name) for c in found] == [(1, "checkpoint-3"), (2, "final")]
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: warning:")]
    assert f"{tmp_path / 'final'} has no step number" in line and "numbered 1, 2 in the order given" in line

    _fake_checkpoint(tmp_path / "other" / "checkpoint-2")
    found = audit.find_checkpoints([str(tmp_path / "run"), str(tmp_path / "other")])
    assert [(c.step, c.folder.parent.name) for c in found] == [(2, "other"), (3, "run")]
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: warning:")]
    assert f"the checkpoints of {tmp_path / 'run'} and {tmp_path / 'other'} are merged into one curve" in line
    # checkpoints given one by one: of one run (one folder) silently, of two runs with the warning
    found = audit.find_checkpoints([str(tmp_path / "run" / "checkpoint-3"), str(tmp_path / "other" / "checkpoint-2")])
    assert [c.step for c in found] == [2, 3]
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: warning:")]
    assert f"the checkpoints of {tmp_path / 'run'} and {tmp_path / 'other'} are merged into one curve" in line
    _fake_checkpoint(tmp_path / "run" / "checkpoint-5")
    audit.find_checkpoints([str(tmp_path / "run" / "checkpoint-3"), str(tmp_path / "run" / "checkpoint-5")])
    assert "warning" not in capsys.readouterr().err


def _lora_adapter(folder, seed: int = 1, modules_to_save: list[str] | None = None) -> None:
    """A LoRA adapter on tiny-random with random updates (and its ``modules_to_save`` copies)."""
    from peft import LoraConfig, get_peft_model

    model, _ = models.load(models.resolve("tiny-random"))
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)


def _fresh_bits(folder, tmp_path) -> float:
    """prose_ppl's bits per byte of an adapter as peft loads it on a freshly loaded base (resized
    to its own tokenizer when it saved one), the reference an audit must match."""
    from peft import PeftModel

    base, tokenizer = models.load(models.resolve("tiny-random"))
    if models.has_tokenizer(folder):
        tokenizer = models.load_tokenizer(str(folder))
        base.resize_token_embeddings(len(tokenizer))
    fresh = PeftModel.from_pretrained(base, str(folder)).eval()
    suite = evaluate.prepare_suite(EvalConfig(new=[], general=["prose_ppl"], limit=3), tmp_path, False)
    return evaluate.evaluate_model(fresh, tokenizer, suite)["results"]["prose_ppl"]["metrics"]["bits_per_byte"]["value"]


def test_adapters_of_different_runs_score_each_as_on_a_fresh_base(tmp_path, capsys):
    """An adapter that saves more than LoRA matrices (resized embeddings, modules_to_save) changes
    the base it loads into; the adapters after it must not see that, in either order."""
    _lora_adapter(tmp_path / "plain")
    _lora_adapter(tmp_path / "head", seed=2, modules_to_save=["lm_head"])
    _adapter_with_resized_vocabulary(tmp_path / "resized")
    reference = {name: _fresh_bits(tmp_path / name, tmp_path) for name in ("plain", "head", "resized")}
    assert len(set(reference.values())) == 3
    for order in (["plain", "resized", "plain"], ["resized", "head", "plain"]):
        run = "-".join(order)
        for i, name in enumerate(order, start=1):
            shutil.copytree(tmp_path / name, tmp_path / run / f"{name}-{i}")
        assert _audit(tmp_path, sorted(str(p) for p in (tmp_path / run).iterdir()), name=run) == 0
        assert "warning" not in capsys.readouterr().err  # each adapter records tiny-random as its base
        bits = _bits(tmp_path, run)
        assert [bits[i] for i in range(1, 4)] == pytest.approx([reference[n] for n in order], rel=1e-9, abs=0), run


def test_a_pickle_only_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys):
    model, _ = models.load(models.resolve("tiny-random"))
    model.save_pretrained(tmp_path / "out" / "checkpoint-2")
    model.config.save_pretrained(tmp_path / "out" / "checkpoint-4")
    torch.save(model.state_dict(), tmp_path / "out" / "checkpoint-4" / "pytorch_model.bin")
    assert _audit(tmp_path, [str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope:")]
    assert len(err) == 1 and "checkpoint-4 has no safetensors weights, only pickle-based ones" in err[0]
    assert "--allow-pickle" in err[0]
    assert not (tmp_path / "runs").exists()


def test_an_adapter_trained_on_another_named_base_is_scored_with_a_warning(tmp_path, capsys):
    _lora_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/another-model"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert _audit(tmp_path, [str(tmp_path / "adapter")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: warning:")]
    assert len(warnings) == 1 and "was trained on 'org/another-model'" in warnings[0]
    assert "not --base 'tiny-random'" in warnings[0]


def _errors(capsys) -> list[str]:
    """The ``forgetscope:`` lines an audit printed to stderr (not the progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope:")]


def test_an_audit_of_checkpoints_saved_again_is_refused_not_called_finished(tmp_path, capsys):
    """Retraining into the same folders: the finished audit is not "already finished" with the old
    results, in one line, and its files stay as they were."""
    model, _ = models.load(models.resolve("tiny-random"))
    model.save_pretrained(tmp_path / "ckpt")
    assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 0
    assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 0  # unchanged: the same results
    assert "already finished" in capsys.readouterr().out
    curves = (tmp_path / "runs" / "a" / "curves.csv").read_text()
    with torch.no_grad():
        model.model.norm.weight.mul_(1.3)
    model.save_pretrained(tmp_path / "ckpt")  # retrained
    assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 2
    [line] = _errors(capsys)
    assert line.startswith("forgetscope: error: --checkpoints: the checkpoints changed since the audit in ")
    assert f"({tmp_path / 'ckpt'}: weights" in line and "pass another --name" in line
    assert (tmp_path / "runs" / "a" / "curves.csv").read_text() == curves
    assert _audit(tmp_path, [str(tmp_path / "ckpt")], name="b") == 0  # another --name audits them afresh
    assert _bits(tmp_path, "b")[1] != _bits(tmp_path)[1]


def test_a_killed_audit_resumed_after_retraining_is_refused(tmp_path, capsys, monkeypatch):
    """A failed audit resumes only over the checkpoints it began with: one curve never mixes steps
    of two trainings; unchanged, it resumes."""
    model, _ = models.load(models.resolve("tiny-random"))
    for step in (2, 4):
        model.save_pretrained(tmp_path / "out" / f"checkpoint-{step}")
    original, calls = evaluate.evaluate_model, []

    def broken(*args, **kwargs):  # the base and checkpoint-2 are scored, then the audit dies
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", broken)
    with pytest.raises(RuntimeError, match="killed"):
        _audit(tmp_path, [str(tmp_path / "out")])
    monkeypatch.setattr(evaluate, "evaluate_model", original)
    root = tmp_path / "runs" / "a"
    stamp = (root / "manifest.json").read_text()
    times = {f: f.stat() for f in (tmp_path / "out" / "checkpoint-4").iterdir()}
    with torch.no_grad():
        model.model.norm.weight.mul_(1.3)
    model.save_pretrained(tmp_path / "out" / "checkpoint-4")  # retrained while the audit was down
    assert _audit(tmp_path, [str(tmp_path / "out")]) == 2
    [line] = _errors(capsys)
    assert "the checkpoints changed since the audit in" in line and "checkpoint-4: weights" in line
    assert (root / "manifest.json").read_text() == stamp and sorted(os.listdir(root / "evals")) == [
        "step-000000",
        "step-000002",
    ]
    with torch.no_grad():
        model.model.norm.weight.div_(1.3)
    model.save_pretrained(tmp_path / "out" / "checkpoint-4")  # the same bytes and times as before: unchanged
    for file, stat in times.items():
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _audit(tmp_path, [str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert list(_bits(tmp_path).index) == [0, 2, 4]


@pytest.mark.parametrize(
    "name, step",
    [
        ("checkpoint-500", 500),
        ("step-000050", 50),
        ("step_7", 7),
        ("step9", 9),
        ("global_step12", 12),
        ("iter_0001000", 1000),
        ("300", 300),
        ("plain-3", 3),
        ("final_bf16", None),
        ("model-fp16", None),
        ("lora_r16", None),
        ("model-v2", None),
        ("merged", None),
    ],
)
def test_a_step_is_read_only_from_a_name_that_carries_one(tmp_path, name, step):
    assert audit._step_of(tmp_path / name) == step


def test_unnumbered_checkpoints_come_after_the_numbered_ones(tmp_path, capsys):
    """``final_bf16`` is no step 16, nor step 1 before the others: numbered after checkpoint-2 and -4."""
    for name in ("checkpoint-2", "final_bf16", "checkpoint-4"):
        _fake_checkpoint(tmp_path / name)
    found = audit.find_checkpoints([str(tmp_path / n) for n in ("checkpoint-2", "final_bf16", "checkpoint-4")])
    assert [(c.step, c.folder.name) for c in found] == [(1, "checkpoint-2"), (2, "checkpoint-4"), (3, "final_bf16")]
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("forgetscope: warning:")]
    assert f"{tmp_path / 'final_bf16'} has no step number" in line
    assert "numbered 1, 2, 3 in the order given, those without one last" in line


def test_an_axolotl_merged_folder_is_the_end_of_training(tmp_path, capsys):
    """axolotl's ``merged/`` beside checkpoint-N is the final model: at the step where training
    ended, not step 1 renumbering the others; left out when a checkpoint is that step."""
    for step in (2, 4):
        _fake_checkpoint(tmp_path / "out" / f"checkpoint-{step}", global_step=step, max_steps=6)
    _fake_checkpoint(tmp_path / "out" / "merged")
    found = audit.find_checkpoints([str(tmp_path / "out")])
    assert [(c.step, c.folder.name) for c in found] == [(2, "checkpoint-2"), (4, "checkpoint-4"), (6, "merged")]
    assert "warning" not in capsys.readouterr().err

    _fake_checkpoint(tmp_path / "out" / "checkpoint-6", global_step=6, max_steps=6)
    (tmp_path / "out" / "config.json").write_text("{}")  # the final model saved into the folder too
    found = audit.find_checkpoints([str(tmp_path / "out")])
    assert [c.step for c in found] == [2, 4, 6] and found[-1].folder.name == "checkpoint-6"
    lines = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert len(lines) == 2 and f"{tmp_path / 'out' / 'merged'}: a final model (no step in its name)" in lines[1]
    assert all("training ended at step 6, scored from checkpoint-6" in line for line in lines)


def _damaged(folder, how: str) -> None:
    """A checkpoint of tiny-random in ``folder``, damaged as ``how`` says."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load(models.resolve("tiny-random"))
    if how.startswith("adapter"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    else:
        model.save_pretrained(folder, **({"max_shard_size": "20KB"} if how == "missing shard" else {}))
    if how in ("tokenizer.json not JSON", "tokenizer.json not a tokenizer", "more tokens than embeddings"):
        tokenizer.add_tokens(["<a>", "<b>"] if how == "more tokens than embeddings" else [])
        tokenizer.save_pretrained(folder)
    damage = {
        "config.json not JSON": lambda: (folder / "config.json").write_text('{"model_type": "llama", '),
        "adapter cut short": lambda: os.truncate(folder / "adapter_model.safetensors", 1000),
        "adapter_config.json not JSON": lambda: (folder / "adapter_config.json").write_text("{"),
        "weights cut short": lambda: os.truncate(folder / "model.safetensors", 20000),
        "missing shard": lambda: (folder / "model-00002-of-00006.safetensors").unlink(),
        "tokenizer.json not JSON": lambda: (folder / "tokenizer.json").write_text('{"version": "1.0", "model": '),
        "tokenizer.json not a tokenizer": lambda: (folder / "tokenizer.json").write_text("{}"),
        "more tokens than embeddings": lambda: None,
        "trainer_state.json not JSON": lambda: (folder / "trainer_state.json").write_text("{"),
    }
    damage[how]()


@pytest.mark.parametrize(
    "how, message",
    [
        ("config.json not JSON", "ckpt/config.json is not valid JSON (Expecting property name"),
        ("adapter cut short", "ckpt/adapter_model.safetensors is damaged or cut short (Error while deserializing"),
        ("adapter_config.json not JSON", "ckpt/adapter_config.json is not valid JSON"),
        ("weights cut short", "ckpt/model.safetensors is damaged or cut short"),
        ("missing shard", "ckpt/model.safetensors.index.json names model-00002-of-00006.safetensors, which is not"),
        ("tokenizer.json not JSON", "ckpt/tokenizer.json is not valid JSON"),
        ("tokenizer.json not a tokenizer", "ckpt: its tokenizer files do not load (KeyError"),
        ("more tokens than embeddings", "ckpt: the tokenizer (its own) has 261 tokens but the model only 259 embed"),
        ("trainer_state.json not JSON", "ckpt/trainer_state.json is not a trainer state"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_before_anything_is_written(tmp_path, capsys, how, message):
    _damaged(tmp_path / "ckpt", how)
    assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 2
    [line] = _errors(capsys)
    assert line.startswith("forgetscope: error: --checkpoints: ") and message in line, line
    assert not (tmp_path / "runs").exists()


def test_chat_template_on_without_one_names_the_flag(tmp_path, capsys):
    model, _ = models.load(models.resolve("tiny-random"))  # its byte tokenizer has no chat template
    model.save_pretrained(tmp_path / "ckpt")
    assert _audit(tmp_path, [str(tmp_path / "ckpt")], "--chat-template", "on") == 2
    [line] = _errors(capsys)
    assert line == (
        "forgetscope: error: --chat-template on: the base's tokenizer has no chat template; use auto or off"
    )
    assert not (tmp_path / "runs").exists()


def test_a_full_disk_names_the_audits_flags(tmp_path, capsys, monkeypatch):
    import errno

    model, _ = models.load(models.resolve("tiny-random"))
    model.save_pretrained(tmp_path / "ckpt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "evaluate_model", full)
    assert _audit(tmp_path, [str(tmp_path / "ckpt")]) == 2
    [line] = _errors(capsys)
    assert "the disk is full; free space, or point --runs-dir (and FORGETSCOPE_CACHE" in line
    assert "snapshots." not in line and "runs_dir" not in line and "run the same command to resume" in line
    assert json.loads((tmp_path / "runs" / "a" / "manifest.json").read_text())["status"] == "failed"


def test_a_checkpoint_tokenizer_without_the_bases_chat_template_is_one_line_up_front(tmp_path, capsys):
    # transformers 5 keeps the template in chat_template.jinja: a checkpoint whose tokenizer files were copied
    # without it would crash mid-run when the chat-format new task is scored
    model, tokenizer = models.load(models.resolve("tiny-random"))
    tokenizer.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    assert _audit(tmp_path, [str(tmp_path / "ckpt")], "--new", "numerals", base=str(tmp_path / "base")) == 2
    [line] = _errors(capsys)
    assert "ckpt: its tokenizer has no chat template, and its base's has one" in line and "--chat-template off" in line
    assert not (tmp_path / "runs").exists()
