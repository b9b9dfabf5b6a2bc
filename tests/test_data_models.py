"""New-task data (masking, chat template, files) and model references."""

import json
from pathlib import Path

import pytest

from forgetscope import cascade, data, models, tasks
from forgetscope.recipe import TaskConfig


def test_numerals_task_is_seeded_and_splits_are_disjoint():
    train, test = tasks.numerals("train"), tasks.numerals("test")
    assert len(test) == 500 and len(train) == 8500
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert tasks.numerals("test") == test  # fixed eval items
    assert tasks.numerals("train", seed=1) != train  # the seed orders the training split
    assert tasks.to_zorbic(4072) == "4=so 0=nu 7=ti 2=re"


def test_prose_probe_has_stable_ids_and_real_prose():
    passages = tasks.prose_passages()
    assert len(passages) > 200
    assert all(len(p["text"]) <= 600 for p in passages)
    assert passages[0]["id"] == "prose-0000" and "::=" not in passages[0]["text"]


def test_prompt_tokens_are_masked_and_completion_ends_with_eos():
    tokenizer = models.byte_tokenizer()
    [ex] = data.tokenize([{"prompt": "Q?", "completion": "yes"}], tokenizer, TaskConfig(name=None), 64)
    prompt_len = len(tokenizer("Q?").input_ids)
    assert ex["labels"][:prompt_len] == [-100] * prompt_len
    assert tokenizer.decode(ex["labels"][prompt_len:]) == " yes</s>"
    assert ex["input_ids"][prompt_len:] == ex["labels"][prompt_len:]


def test_chat_template_wraps_the_prompt():
    tokenizer = models.byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    task = TaskConfig(name=None)
    assert data.uses_chat_template(task, tokenizer)
    [ex] = data.tokenize([{"prompt": "Q?", "completion": "yes"}], tokenizer, task, 64)
    masked = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label == -100]
    assert tokenizer.decode(masked) == "<user>Q?<assistant>"
    assert not data.uses_chat_template(TaskConfig(name=None, chat_template="off"), tokenizer)
    with pytest.raises(data.DataError, match="has no chat template"):
        data.uses_chat_template(TaskConfig(name=None, chat_template="on"), models.byte_tokenizer())


def test_plain_text_records_train_on_every_token_and_truncate():
    tokenizer = models.byte_tokenizer()
    [ex] = data.tokenize([{"text": "hello world"}], tokenizer, TaskConfig(name=None), 5)
    assert ex["labels"] == ex["input_ids"] and len(ex["input_ids"]) == 5


def test_jsonl_and_csv_files(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n")
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\n")
    for name in ("d.jsonl", "d.csv"):
        assert data.load_records(TaskConfig(name=None, path=name), tmp_path) == [{"prompt": "a", "completion": "b"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_records(TaskConfig(name=None, path="bad.jsonl"), tmp_path)
    with pytest.raises(
        data.DataError, match=r"record 2 lacks `completion` \(1 of 2 records lack `prompt` and `completion`\)"
    ):
        data.tokenize(
            [{"prompt": "a", "completion": "b"}, {"prompt": "c"}], models.byte_tokenizer(), TaskConfig(name=None), 8
        )


def test_model_references(tmp_path):
    assert models.check_reference("tiny-random", tmp_path) == []
    assert "did you mean 'tiny-random'" in models.check_reference("tiny-randon", tmp_path)[0]
    (tmp_path / "m").mkdir()
    assert "has no config.json" in models.check_reference("m", tmp_path)[0]
    assert "HF_HUB_OFFLINE is set" in models.check_reference("org/never-downloaded", tmp_path)[0]
    with pytest.raises(models.ModelError, match="not in the local Hugging Face cache"):
        models.resolve("org/never-downloaded", tmp_path)


def test_tiny_random_is_tiny_and_cached():
    path = models.resolve("tiny-random")
    assert models.resolve("tiny-random") == path
    model, tokenizer = models.load(path)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert tokenizer.decode(tokenizer("héllo").input_ids) == "héllo"


def test_bad_data_file_fails_before_anything_is_written(tmp_path, tiny_recipe_data, capsys):
    import yaml

    from forgetscope import cli

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    data = {**tiny_recipe_data, "task": {"name": None, "path": "bad.jsonl"}, "runs_dir": str(tmp_path / "runs")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_files_with_a_byte_order_mark_read_as_without(tmp_path):
    from forgetscope import data

    (tmp_path / "bom.csv").write_bytes("\ufeffprompt,completion\nQ: 1+1?, 2\n".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"prompt": "Q: 1+1?", "completion": " 2"}\n'.encode())
    assert data.read_file(tmp_path / "bom.csv") == [{"prompt": "Q: 1+1?", "completion": " 2"}]
    assert data.read_file(tmp_path / "bom.jsonl") == [{"prompt": "Q: 1+1?", "completion": " 2"}]


def test_rows_that_would_train_nothing_or_lose_a_value_are_refused(tmp_path, capsys):
    from forgetscope import data

    (tmp_path / "extra.csv").write_text("prompt,completion\nQ: 1+1?, 2\nQ: 1,000+1?, 1001\n")
    (tmp_path / "short.csv").write_text("prompt,completion\nQ: 1+1?, 2\nQ: 2+2?\n")
    with pytest.raises(data.DataError, match=r"short.csv:3: 1 values, the header names 2; .* fill the missing ones"):
        data.read_file(tmp_path / "short.csv")
    (tmp_path / "twice.csv").write_text("prompt,prompt,completion\na,b,c\n")
    with pytest.raises(data.DataError, match=r"twice.csv:1: the header names the column `prompt` twice"):
        data.read_file(tmp_path / "twice.csv")
    (tmp_path / "twice.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "prompt": "b"}\n')
    with pytest.raises(data.DataError, match=r"twice.jsonl:2: the key 'prompt' is given twice in one record"):
        data.read_file(tmp_path / "twice.jsonl")
    with pytest.raises(
        data.DataError, match=r"extra.csv:3: 3 values, the header names 2; quote a value that holds a comma"
    ):
        data.read_file(tmp_path / "extra.csv")
    tokenizer, task = models.byte_tokenizer(), TaskConfig(name=None)
    for field, records in {
        "completion": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}],
        "text": [{"text": "x"}, {"text": ""}],
    }.items():
        with pytest.raises(data.DataError, match=rf"record 2 \(of 1 such\) has an empty `{field}`; fill it or remove"):
            data.tokenize(records, tokenizer, task, 16)
    (tmp_path / "blank.jsonl").write_text('{"prompt": "", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n')
    assert len(data.load_records(TaskConfig(name=None, path="blank.jsonl"), tmp_path)) == 2
    assert (
        "1 of 2 records have an empty `prompt`: their completions are trained without a prompt"
        in capsys.readouterr().err
    )


def test_an_empty_recipe_file_is_refused(tmp_path, capsys):
    from forgetscope import cli

    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert cli.main(["show", str(tmp_path / "empty.yaml")]) == 2
    assert "the file holds no settings; write the recipe's (examples in recipes/" in capsys.readouterr().err


DAMAGED_MODELS = {
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{broken"), "is not a valid JSON file"),
    "unknown architecture": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "nosuchmodel"})
        ),
        "nosuchmodel",
    ),
    "weights cut short": (lambda d: (d / "model.safetensors").write_bytes(b"\x10" * 100), "SafetensorError"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model weights in this folder"),
}


@pytest.mark.parametrize("name", list(DAMAGED_MODELS))
def test_a_damaged_model_folder_is_one_line_and_exit_2(tmp_path, capsys, name):
    import shutil

    from forgetscope import cli

    damage, message = DAMAGED_MODELS[name]
    folder = tmp_path / "model"
    shutil.copytree(models.resolve("tiny-random"), folder)
    damage(folder)
    capsys.readouterr()  # the tiny model's first build, when this test runs alone, prints its progress
    recipe = str(Path(__file__).parent.parent / "recipes" / "tiny.yaml")
    assert cli.main(["run", recipe, "--set", f"base={folder}", "--set", f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forgetscope: error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_file_that_is_not_gguf_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from forgetscope import cli

    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(b"not a gguf!")
    recipe = str(Path(__file__).parent.parent / "recipes" / "tiny.yaml")
    assert (
        cli.main(["run", recipe, "--set", f"base={tmp_path / 'model.gguf'}", "--set", f"runs_dir={tmp_path / 'runs'}"])
        == 2
    )
    assert "not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not any((tmp_path / "cache").rglob("config.json"))


CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And Spain?"},
    {"role": "assistant", "content": "Madrid"},
]


def _chat_tokenizer(template: str = CHATML):
    tokenizer = models.byte_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def _trained(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_conversations_train_on_the_assistant_turns_as_the_template_renders_them():
    tokenizer, task = _chat_tokenizer(), TaskConfig(name=None)
    [ex] = data.tokenize([{"messages": TALK}], tokenizer, task, 256)
    rendered = tokenizer.apply_chat_template(TALK, tokenize=False)
    assert tokenizer.decode(ex["input_ids"]) == rendered  # the whole conversation, as the template writes it
    assert _trained(tokenizer, ex) == "Paris<|end|>\nMadrid<|end|>\n"  # every answer, with its end of turn
    assert data.prompt_of({"messages": TALK}, task) == "Capital of France?"  # what replay and the KL probe sample
    # TRL's conversational prompt-completion: the prompt's own answers are context, the completion's are trained
    pair = {"prompt": TALK[:4], "completion": TALK[4:]}
    [ex] = data.tokenize([pair], tokenizer, task, 256)
    assert tokenizer.decode(ex["input_ids"]) == rendered and _trained(tokenizer, ex) == "Madrid<|end|>\n"
    assert data.prompt_of(pair, task) == "And Spain?"
    [ex] = data.tokenize([{"chat": TALK[1:3]}], tokenizer, TaskConfig(name=None, messages_field="chat"), 256)
    assert _trained(tokenizer, ex) == "Paris<|end|>\n"


def test_conversational_prompt_completion_masks_as_trl_does(tmp_path):
    """TRL's SFTTrainer is the reference for its own format: the same token ids, the same tokens trained."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    tokenizer = _chat_tokenizer()
    model, _ = models.load(models.resolve("tiny-random"))
    rows = [{"prompt": TALK[:4], "completion": TALK[4:]}, {"prompt": TALK[1:2], "completion": TALK[2:3]}]
    config = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=256, bf16=False)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    ours = data.tokenize(rows, tokenizer, TaskConfig(name=None), 256)
    for theirs, mine in zip(trainer.train_dataset, ours):
        assert theirs["input_ids"] == mine["input_ids"]
        assert theirs["labels"] == mine["labels"]  # TRL folds its completion mask into the labels


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"messages": TALK[:2]}], "record 1: `messages` has no assistant message to train on"),
        ([{"messages": [*TALK[:2], {"role": "assistant", "content": " "}]}], "has an empty assistant message"),
        ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}], "message 1 must be"),
        ([{"messages": "hello"}], "`messages` must be a list of messages"),
        (
            [{"messages": TALK}, {"prompt": "a", "completion": "b"}],
            "record 2: `messages` is not a conversation like record 1's",
        ),
    ],
)
def test_a_conversation_that_cannot_train_is_refused(records, message):
    with pytest.raises(data.DataError, match=message):
        data.tokenize(records, _chat_tokenizer(), TaskConfig(name=None), 256)


def test_conversations_need_a_chat_template_that_keeps_earlier_turns():
    with pytest.raises(data.DataError, match=r"rendered with the base model's chat template, and the base has none"):
        data.tokenize([{"messages": TALK}], models.byte_tokenizer(), TaskConfig(name=None), 256)
    with pytest.raises(data.DataError, match=r"and task.chat_template is off"):
        data.tokenize([{"messages": TALK}], _chat_tokenizer(), TaskConfig(name=None, chat_template="off"), 256)
    marks_the_last = (  # a template that renders a turn differently once another follows it
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if loop.last %}<last>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(data.DataError, match="renders earlier turns differently once an answer follows"):
        data.tokenize([{"messages": TALK}], _chat_tokenizer(marks_the_last), TaskConfig(name=None), 256)
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(
        data.DataError, match="record 2: the base's chat template refuses the conversation: System role"
    ):
        data.tokenize(
            [{"messages": TALK[1:3]}, {"messages": TALK}],
            _chat_tokenizer(no_system + CHATML),
            TaskConfig(name=None),
            256,
        )


def test_json_arrays_and_parquet_files(tmp_path):
    import pandas as pd

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame([{"messages": TALK}]).to_parquet(tmp_path / "chat.parquet")
    for name in ("d.json", "d.parquet"):
        assert data.load_records(TaskConfig(name=None, path=name), tmp_path) == rows
    [record] = data.load_records(TaskConfig(name=None, path="chat.parquet"), tmp_path)
    assert record == {"messages": TALK}  # a list column comes back as lists and dicts
    (tmp_path / "bad.json").write_text('[{"prompt": "a"},\n 3]')
    with pytest.raises(data.DataError, match=r"bad.json: item 2 of the array is not an object"):
        data.load_records(TaskConfig(name=None, path="bad.json"), tmp_path)
    (tmp_path / "broken.json").write_text('[{"prompt": "a"},\n {oops}]')
    with pytest.raises(
        data.DataError,
        match=r"broken.json:2: not valid JSON .*one JSON object \(or a .json file one array of objects\)",
    ):
        data.load_records(TaskConfig(name=None, path="broken.json"), tmp_path)
    (tmp_path / "fake.parquet").write_text("prompt,completion\n")
    with pytest.raises(data.DataError, match=r"fake.parquet: not a Parquet file pyarrow can read"):
        data.load_records(TaskConfig(name=None, path="fake.parquet"), tmp_path)


def test_conversation_errors_name_the_record_and_the_fields_it_came_from():
    hides_earlier_answers = (  # as templates that drop the reasoning of earlier answers do
        "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' and not loop.last %}(earlier answer)"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer, task = _chat_tokenizer(hides_earlier_answers), TaskConfig(path="talks.jsonl")
    [ex] = data.tokenize([{"messages": TALK[1:3]}], tokenizer, task, 256)  # one answer: nothing is rewritten
    assert _trained(tokenizer, ex) == "Paris"
    with pytest.raises(data.DataError, match=r"^task: talks.jsonl: record 2: the chat template renders earlier"):
        data.tokenize([{"messages": TALK[1:3]}, {"messages": TALK}], tokenizer, task, 256)
    trl = [{"prompt": TALK[1:2], "completion": TALK[2:3]}, {"prompt": TALK[1:2], "completion": TALK[1:2]}]
    with pytest.raises(
        data.DataError, match=r"record 2: `prompt` \+ `completion` has no assistant message to train on"
    ):
        data.tokenize(trl, _chat_tokenizer(), TaskConfig(name=None), 256)


def test_a_file_cut_at_max_examples_says_so(tmp_path, capsys):
    """`task.max_examples` (2000 by default) keeps a file's top rows, in order; a file with more says
    which setting to raise instead of training on a part of it in silence."""
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_records(TaskConfig(name=None, path="d.jsonl", max_examples=3), tmp_path) == rows[:3]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forgetscope: warning: task: d.jsonl has 5 records; ")
    assert "task.max_examples=3 keeps the first 3 (from the top, not a random sample)" in err
    assert "--set task.max_examples=5" in err
    assert data.load_records(TaskConfig(name=None, path="d.jsonl", max_examples=5), tmp_path) == rows
    assert len(data.load_records(TaskConfig(), tmp_path)) == TaskConfig().max_examples  # numerals: a seeded sample
    assert capsys.readouterr().err == ""
    # the cascade's KL probe reads the prompts again: training has warned already
    assert cascade.kl_prompts(TaskConfig(name=None, path="d.jsonl", max_examples=3), tmp_path, 2) == ["q0", "q1"]
    assert capsys.readouterr().err == ""


def test_column_errors_name_the_columns_asked_for_and_found(tmp_path):
    tokenizer = models.byte_tokenizer()
    records = [{"prompt": "a", "completion": "b"}]
    with pytest.raises(
        data.DataError,
        match=r"^task: record 1 has no `nope` \(task.prompt_field, with `completion`\) and no `text` "
        r"\(task.text_field\); its columns: `prompt`, `completion`; set task.prompt_field",
    ):
        data.tokenize(records, tokenizer, TaskConfig(name=None, prompt_field="nope"), 8)
    with pytest.raises(data.DataError, match=r"record 2 lacks `prompt`, `completion` .*; its columns: `text`; set"):
        data.tokenize([*records, {"text": "hello"}], tokenizer, TaskConfig(name=None), 8)
    (tmp_path / "tsv.csv").write_text("prompt\tcompletion\nu abc =\t ABC\n")
    with pytest.raises(data.DataError, match=r"tsv.csv:1: the file looks tab-separated \(one column, 'prompt\\tcomp"):
        data.load_records(TaskConfig(name=None, path="tsv.csv"), tmp_path)


def test_a_saved_dataset_folder_loads_as_a_file_does(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert data.load_records(TaskConfig(name=None, path="saved"), tmp_path) == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    assert data.load_records(TaskConfig(name=None, path="splits/train"), tmp_path) == rows
    with pytest.raises(data.DataError, match=r"splits: a saved dataset of several splits \(train\); point the path"):
        data.load_records(TaskConfig(name=None, path="splits"), tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(data.DataError, match=r"other: a folder, but not a dataset written by datasets' save_to_disk"):
        data.load_records(TaskConfig(name=None, path="other"), tmp_path)
    # a recipe takes the folder, and its hash follows the dataset's contents
    from forgetscope.load import recipe_from_dict
    from forgetscope.runner import recipe_hash

    recipe = {"name": "r", "base": "tiny-random", "task": {"name": None, "path": "saved"}}
    before = recipe_hash(recipe_from_dict(recipe, str(tmp_path / "r.yaml")))
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "saved"))
    assert recipe_hash(recipe_from_dict(recipe, str(tmp_path / "r.yaml"))) != before


def test_an_hf_dataset_out_of_reach_offline_is_one_line_and_writes_nothing(tmp_path, tiny_recipe_data, capsys):
    import yaml

    from forgetscope import cli

    recipe = {**tiny_recipe_data, "task": {"hf_dataset": "org/never-downloaded"}, "runs_dir": str(tmp_path / "runs")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("forgetscope")]
    assert line.startswith("forgetscope: error: task.hf_dataset: could not reach 'org/never-downloaded' on the ")
    assert "HF_DATASETS_OFFLINE" in line and "set task.path to that file" in line
    assert not (tmp_path / "runs").exists()
