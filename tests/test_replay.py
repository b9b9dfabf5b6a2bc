"""Self-generated replay: the buffer cache, the KL loss, the batch split, and training with both losses."""

import json
import re

import pandas as pd
import pytest
import torch
import yaml

from forgetscope import data as fdata
from forgetscope import evaluate, models, replay, train
from forgetscope.errors import UserError
from forgetscope.load import recipe_from_dict
from forgetscope.runner import run


@pytest.fixture
def replay_data(tiny_recipe_data):
    data = {
        **tiny_recipe_data,
        "method": "full",
        "lora": None,
        "replay": {"samples": 8, "max_new_tokens": 12, "ratio": 0.5, "loss": "kl", "topk": 8},
    }
    data["train"] = {**data["train"], "batch_size": 4}
    return data


def _base():
    return models.load(models.resolve("tiny-random"))


def test_buffer_is_cached_and_invalidated(tmp_path, replay_data, monkeypatch):
    calls = []
    real = replay.sampling.generate
    monkeypatch.setattr(replay.sampling, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tokenizer = _base()
    fp = evaluate.fingerprint(model)
    recipe = recipe_from_dict({**replay_data, "runs_dir": str(tmp_path)})
    first = replay.build_buffer(model, tokenizer, recipe, fp)
    assert len(calls) == 1 and len(first.examples) == 8 and first.topk_values.shape[-1] == 8
    again = replay.build_buffer(model, tokenizer, recipe, fp)  # same base, settings, seed: reused
    assert len(calls) == 1 and again.examples == first.examples
    assert torch.equal(again.topk_indices, first.topk_indices)
    for change in ({"seed": 1}, {"temperature": 0.7}, {"samples": 6}):
        other = recipe_from_dict({**replay_data, "replay": {**replay_data["replay"], **change}})
        replay.build_buffer(model, tokenizer, other, fp)
    assert len(calls) == 4
    replay.build_buffer(model, tokenizer, recipe, "another-base")  # another base: resampled
    assert len(calls) == 5
    ratio_only = recipe_from_dict({**replay_data, "replay": {**replay_data["replay"], "ratio": 0.25}})
    replay.build_buffer(model, tokenizer, ratio_only, fp)  # mixing settings do not touch the buffer
    assert len(calls) == 5


def test_kl_is_zero_when_current_equals_base(replay_data):
    model, tokenizer = _base()
    model.eval()
    recipe = recipe_from_dict(replay_data)
    examples = fdata.tokenize(fdata.load_records(recipe.task, None)[:4], tokenizer, recipe.task, 40)
    batch = {k: v.to(model.device) for k, v in replay.collate(examples, tokenizer.pad_token_id).items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values, indices = (t.to(model.device) for t in replay.base_topk(model, tokenizer, examples, k=16))
        assert replay.kl_topk(values, indices, logits, batch["labels"]).item() == pytest.approx(0, abs=1e-5)
        assert replay.kl_full(logits, logits, batch["labels"]).item() == pytest.approx(0, abs=1e-6)
        shifted = logits + torch.randn_like(logits)
        assert replay.kl_full(logits, shifted, batch["labels"]).item() > 0.01
        assert replay.kl_topk(values, indices, shifted, batch["labels"]).item() > 0.01
        values, indices = (t.to(model.device) for t in replay.base_topk(model, tokenizer, examples, k=100_000))
        assert values.shape[-1] == logits.shape[-1]  # k beyond the vocabulary: the whole of it, the exact KL
        assert replay.kl_topk(values, indices, shifted, batch["labels"]).item() == pytest.approx(
            replay.kl_full(logits, shifted, batch["labels"]).item(), rel=1e-4
        )
    lora = train.prepare_model(_base()[0], recipe_from_dict({**replay_data, "method": "lora", "lora": {"r": 2}}))
    with torch.no_grad(), lora.disable_adapter():  # LoRA at init: adapters are a no-op, so base == current
        base_logits = lora(input_ids=batch["input_ids"]).logits
    assert replay.kl_full(
        base_logits, lora(input_ids=batch["input_ids"]).logits, batch["labels"]
    ).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("batch_size,ratio,expected", [(8, 0.25, (6, 2)), (4, 0.5, (2, 2)), (10, 0.2, (8, 2))])
def test_split_batch(batch_size, ratio, expected):
    assert replay.split_batch(batch_size, ratio, 1) == expected
    with pytest.raises(Exception, match="must both divide"):
        replay.split_batch(8, 0.25, 4)


@pytest.mark.parametrize("method,loss", [("full", "kl"), ("full", "ntp"), ("lora", "kl")])
def test_both_losses_train_and_the_ratio_is_respected(tmp_path, replay_data, method, loss):
    data = {
        **replay_data,
        "method": method,
        "lora": {"r": 4, "alpha": 8} if method == "lora" else None,
        "replay": {**replay_data["replay"], "loss": loss, "coeff": 1.0},
        "train": {**replay_data["train"], "steps": 12, "batch_size": 8, "lr": 3e-2},
    }
    data["replay"]["ratio"] = 0.25
    recipe = recipe_from_dict({**data, "runs_dir": str(tmp_path)})
    model, tokenizer = _base()
    buffer = replay.build_buffer(model, tokenizer, recipe, evaluate.fingerprint(model))
    model = train.prepare_model(model, recipe)
    examples = fdata.tokenize(fdata.load_records(recipe.task, tmp_path), tokenizer, recipe.task, 48)
    trainer = train.make_trainer(model, tokenizer, examples, recipe, str(tmp_path / "t"), [], buffer)
    trainer.args.logging_steps = 4
    rows = []  # (replay, all) examples of every training forward pass (not the reference's, under no_grad)
    real_collate = replay.collate
    replay.collate = lambda examples, *a: rows.append(len(examples)) or real_collate(examples, *a)
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]) if torch.is_grad_enabled() else None,
        with_kwargs=True,
    )
    try:
        trainer.train()
    finally:
        replay.collate = real_collate
        hook.remove()
    assert set(zip(rows[::2], rows[1::2])) == {(2, 8)}  # 25% of every batch of 8 is replay
    logs = [entry for entry in trainer.state.log_history if "new_loss" in entry]
    assert len(logs) == 3
    assert logs[-1]["new_loss"] < logs[0]["new_loss"]
    if loss == "ntp":
        assert logs[-1]["replay_loss"] < logs[0]["replay_loss"]
    else:
        assert all(entry["replay_loss"] >= 0 for entry in logs)


def test_kl_replay_keeps_the_model_closer_to_the_base(tmp_path, replay_data):
    """With a strong KL weight the model drifts less from the base on its own samples than without."""
    drift = {}
    for weight in (0.0, 20.0):
        data = {
            **replay_data,
            "replay": {**replay_data["replay"], "coeff": weight, "ratio": 0.5},
            "train": {**replay_data["train"], "steps": 15, "batch_size": 4, "lr": 3e-2},
        }
        recipe = recipe_from_dict({**data, "runs_dir": str(tmp_path)})
        model, tokenizer = _base()
        buffer = replay.build_buffer(model, tokenizer, recipe, evaluate.fingerprint(model))
        examples = fdata.tokenize(fdata.load_records(recipe.task, tmp_path), tokenizer, recipe.task, 48)
        train.make_trainer(model, tokenizer, examples, recipe, str(tmp_path / "t"), [], buffer).train()
        batch = {k: v.to(model.device) for k, v in replay.collate(buffer.examples, tokenizer.pad_token_id).items()}
        with torch.no_grad():
            logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values, indices = buffer.topk_values.to(model.device), buffer.topk_indices.to(model.device)
        drift[weight] = replay.kl_topk(values, indices, logits, batch["labels"]).item()
    assert drift[20.0] < 0.5 * drift[0.0]


def test_replay_run_logs_both_losses(tmp_path, replay_data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**replay_data, "name": "rep", "runs_dir": str(tmp_path / "runs")}))
    from forgetscope.load import load_recipe

    root = run(load_recipe(path))
    log = pd.read_csv(root / "train_log.csv")
    assert {"step", "loss", "new_loss", "replay_loss", "replay_refresh"} <= set(log.columns) and len(log) >= 1
    assert log["replay_refresh"].notna().sum() == 1 and log.loc[log["replay_refresh"].notna(), "loss"].isna().all()
    assert (root / "train_loss.png").stat().st_size > 5_000
    assert json.loads((root / "manifest.json").read_text())["replay"]["coeff"] == 10.0


def test_rehearsal_from_old_data(tmp_path, replay_data):
    (tmp_path / "old.jsonl").write_text("".join(json.dumps({"text": f"old fact number {i}."}) + "\n" for i in range(6)))
    data = {**replay_data, "replay": {"source": "data", "path": "old.jsonl", "loss": "ntp", "ratio": 0.5}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    from forgetscope.load import load_recipe

    recipe = load_recipe(tmp_path / "r.yaml")
    model, tokenizer = _base()
    buffer = replay.build_buffer(model, tokenizer, recipe, evaluate.fingerprint(model))
    assert len(buffer.examples) == 6 and tokenizer.decode(buffer.examples[0]["input_ids"]) == "old fact number 0.</s>"
    assert buffer.topk_values is None  # ntp needs no base log-probs


def test_lora_buffer_refreshes_from_the_adapter_disabled_base(tmp_path, replay_data, monkeypatch):
    data = {
        **replay_data,
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "replay": {**replay_data["replay"], "refresh_every": 2, "loss": "kl", "ratio": 0.5},
        "train": {**replay_data["train"], "steps": 5, "batch_size": 4},
    }
    recipe = recipe_from_dict({**data, "runs_dir": str(tmp_path)})
    model, tokenizer = _base()
    buffer = replay.build_buffer(model, tokenizer, recipe, evaluate.fingerprint(model))
    model = train.prepare_model(model, recipe)
    adapters_on = []
    real = replay.sampling.generate

    def spy(m, *args, **kwargs):
        adapters_on.append(not getattr(m.base_model, "disable_adapters", False))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(replay.sampling, "generate", spy)
    examples = fdata.tokenize(fdata.load_records(recipe.task, tmp_path), tokenizer, recipe.task, 48)
    trainer = train.make_trainer(model, tokenizer, examples, recipe, str(tmp_path / "t"), [], buffer)
    trainer.train()
    assert adapters_on == [False, False]  # refreshed at steps 2 and 4, both times from the base
    assert trainer.buffer.examples != buffer.examples
    assert [e["step"] for e in trainer.state.log_history if "replay_refresh" in e] == [0, 2, 4]


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _scripted(model, answer_ids: list[int]):
    """Make ``model`` write ``answer_ids`` whatever it is asked: each forward pass of a call to
    ``sampling.generate`` (the prefill, then one per new token) pushes the next scripted token."""
    calls = []

    def push(module, args, output):
        token = answer_ids[min(len(calls), len(answer_ids) - 1)]
        calls.append(token)
        output[..., token] += 1e4
        return output

    return model.lm_head.register_forward_hook(push), calls


@pytest.mark.parametrize("completion", [" 321", "321"], ids=["space-led", "no-space"])
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_a_replayed_example_is_the_generation_token_for_token(tmp_path, replay_data, chat, completion, monkeypatch):
    """A model that answers exactly what training taught it is rehearsed exactly as it was trained:
    the replay example's ids are the generation's ids, prompt masked, whatever the spacing."""
    monkeypatch.setattr(replay.sampling, "WARMUP_STEPS", 1 << 30)  # the script is a Python hook: no CUDA graph
    model, tokenizer = _base()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    record = {"prompt": "rev 123 =", "completion": completion}
    (tmp_path / "old.jsonl").write_text(json.dumps(record) + "\n")
    recipe = recipe_from_dict(
        {
            **replay_data,
            "replay": {
                "prompts": "file",
                "path": "old.jsonl",
                "samples": 4,
                "max_new_tokens": 12,
                "temperature": 0.1,
                "loss": "ntp",
            },
        },
        str(tmp_path / "r.yaml"),
    )
    taught = fdata.tokenize([record], tokenizer, recipe.task, 64)[0]  # what training shows the model
    answer = [t for t, label in zip(taught["input_ids"], taught["labels"]) if label != fdata.IGNORE_INDEX]
    hook, calls = _scripted(model, answer)
    try:
        rows = replay.sampling.generate(model, tokenizer, ["rev 123 ="], chat, 12, 0.1, 1.0, seed=0)
        calls.clear()
        buffer = replay.build_buffer(model, tokenizer, recipe, "scripted")
    finally:
        hook.remove()
    assert rows[0]["prompt_ids"] + rows[0]["completion_ids"] == taught["input_ids"]
    assert rows[0]["text"] == completion.strip()  # the decoded text lost the space; the ids did not
    for example in buffer.examples:
        assert example["input_ids"] == taught["input_ids"] and example["labels"] == taught["labels"]


def test_full_fine_tuning_refreshes_from_a_frozen_copy_and_a_resumed_run_redraws_the_same_buffer(
    tmp_path, replay_data, monkeypatch
):
    data = {
        **replay_data,
        "replay": {**replay_data["replay"], "refresh_every": 2, "loss": "kl", "ratio": 0.5},
        "train": {**replay_data["train"], "steps": 5, "batch_size": 4, "lr": 3e-2},
    }
    recipe = recipe_from_dict({**data, "runs_dir": str(tmp_path)})
    model, tokenizer = _base()
    base_fp = evaluate.fingerprint(model)
    buffer = replay.build_buffer(model, tokenizer, recipe, base_fp)
    assert buffer.topk_values is None  # the copy gives the exact KL: no stored top-k
    sampled_from, draws = [], []
    real = replay.sampling.generate

    def spy(m, *args, **kwargs):
        sampled_from.append((m is model, evaluate.fingerprint(m)))
        draws.append(real(m, *args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(replay.sampling, "generate", spy)
    examples = fdata.tokenize(fdata.load_records(recipe.task, tmp_path), tokenizer, recipe.task, 48)
    trainer = train.make_trainer(model, tokenizer, examples, recipe, str(tmp_path / "t"), [], buffer)
    trainer.train()
    assert evaluate.fingerprint(model) != base_fp  # the model trained ...
    assert sampled_from == [(False, base_fp)] * 2  # ... but steps 2 and 4 sampled from the untouched copy
    assert [e["step"] for e in trainer.state.log_history if "replay_refresh" in e] == [0, 2, 4]
    assert trainer.buffer.examples == replay.as_examples(draws[-1], recipe.train.seq_len)

    fresh, _ = _base()  # a run resumed at step 3 holds the buffer of step 2, drawn again
    resumed = train.make_trainer(fresh, tokenizer, examples, recipe, str(tmp_path / "u"), [], buffer)
    resumed.state.global_step = 3
    resumed._maybe_refresh()
    assert resumed.buffer.examples == replay.as_examples(draws[0], recipe.train.seq_len)


def test_the_report_shows_the_replay_loss_beside_the_new_task_loss_and_the_buffer_draws(tmp_path, fake_run):
    layout = fake_run(tmp_path / "runs" / "rep", {0: {"i0": 1.0}, 5: {"i0": 1.0}, 10: {"i0": 0.0}})
    log = [
        {"replay_refresh": 8, "step": 0},
        {"loss": 2.0, "new_loss": 1.5, "replay_loss": 0.5, "step": 4},
        {"replay_refresh": 8, "step": 5},
        {"loss": 0.4, "new_loss": 0.3, "replay_loss": 0.01, "step": 8},
    ]
    layout.update_manifest(replay={"loss": "ntp", "refresh_every": 5}, train_log=log)
    fake_run(tmp_path / "runs" / "plain", {0: {"i0": 1.0}, 10: {"i0": 0.0}})
    from forgetscope import cli

    assert cli.main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| rep | 1.5 → 0.3 | 0.5 → 0.01 | 0, 5 |" in md and "![replay](replay.png)" in md
    assert "| plain |" not in md.split("## Replay")[1].split("##")[0]  # no replay, no row
    assert (tmp_path / "out" / "replay.png").stat().st_size > 10_000


def test_successive_draws_walk_the_prompt_pool(replay_data):
    recipe = recipe_from_dict({**replay_data, "replay": {**replay_data["replay"], "samples": 3}})
    _, tokenizer = _base()
    pool = ["p0", "p1", "p2", "p3", "p4"]
    recipe.replay.prompts = "tasks"
    assert [replay.draw_prompts(recipe, tokenizer, pool, draw) for draw in range(3)] == [
        ["p0", "p1", "p2"],
        ["p3", "p4", "p0"],
        ["p1", "p2", "p3"],
    ]
    recipe.replay.prompts = "chat"  # generic requests, seeded by the draw
    assert replay.draw_prompts(recipe, tokenizer, None, 0) != replay.draw_prompts(recipe, tokenizer, None, 1)
    recipe.replay.prompts = "bos"
    assert replay.draw_prompts(recipe, tokenizer, None, 4) == ["", "", ""]


@pytest.mark.parametrize(
    "replay_settings, content, message",
    [
        ({"source": "data", "path": "r.jsonl"}, '{"prompt": {"t": 1}, "completion": " x"}\n', "r.jsonl: record 1"),
        ({"source": "data", "path": "r.jsonl"}, '{"prompt": "a", "completion": ""}\n', "has an empty `completion`"),
        ({"source": "data", "path": "r.txt"}, "a prompt\n", "takes a .jsonl, .json, .csv, .parquet file of records"),
        ({"prompts": "file", "path": "r.txt"}, "\n\n", "r.txt: holds no prompts"),
        ({"prompts": "file", "path": "r.jsonl"}, '{"prompt": null}\n{"text": " "}\n', "r.jsonl: holds no prompts"),
    ],
)
def test_a_bad_replay_file_is_refused_before_anything_is_written(
    tmp_path, replay_data, replay_settings, content, message
):
    (tmp_path / replay_settings["path"]).write_text(content)
    data = {**replay_data, "replay": {"samples": 4, **replay_settings}, "runs_dir": str(tmp_path / "runs")}
    with pytest.raises(UserError, match=r"^replay\.path: .*" + re.escape(message)):
        run(recipe_from_dict(data, str(tmp_path / "r.yaml")))
    assert not (tmp_path / "runs").exists()


def test_a_prompt_file_reads_prompts_as_training_data_does(tmp_path):
    """Prompt/completion, text and conversations (the user message an answer follows); empty ones left out."""
    rows = [
        {"prompt": "Capital of France?", "completion": " Paris"},
        {"messages": [{"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid"}]},
        {"prompt": [{"role": "user", "content": "Of Peru?"}], "completion": [{"role": "assistant", "content": "Lima"}]},
        {"text": "Once upon a time"},
        {"prompt": None},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert replay._read_prompts(tmp_path / "p.jsonl") == [
        "Capital of France?",
        "And Spain?",
        "Of Peru?",
        "Once upon a time",
    ]
