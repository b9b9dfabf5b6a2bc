"""A generated set of malformed recipes and data files: every one ends in exit code 2 with
`forgetscope: error:` lines naming the problem and the offending key (or file), no traceback, and
nothing written."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing

import pytest
import yaml

from forgetscope import cli
from forgetscope.recipe import Recipe

# Wrong values for a field of each declared type, picked by hand (YAML gives these Python types).
# A union takes the values wrong for every member; a Literal none of its options.
WRONG = {
    str: [5, 2.5, True, [1, 2], {"a": 1}, None],
    int: ["seven", 2.5, True, [1, 2], {"a": 1}, None],
    float: ["seven", True, [1, 2], {"a": 1}, None, float("nan")],  # "2e-4" is a number (YAML 1.1 reads it as text)
    bool: ["seven", 2.5, -3, [1, 2], {"a": 1}, None],
    type(None): ["seven", 5, 2.5, True, [1, 2], {"a": 1}],
    list[str]: ["seven", 5, 2.5, True, [1, 2], {"a": 1}, None],
    list[int]: ["seven", 5, 2.5, True, ["a"], {"a": 1}, None],
    typing.Literal: ["seven", 5, 2.5, True, [1, 2], {"a": 1}, None],
    "sections": ["seven", 5, [1, 2], None],  # a list of sections (stages); [1, 2]: items that are not mappings
}
STAGES = [{"task": {"name": "sym_sort"}, "steps": 2}, {"task": {"name": "sym_shift"}, "steps": 2}]


def _wrong(hint) -> list:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return [v for v in WRONG[typing.Literal] if v not in typing.get_args(hint)]
    if origin in (typing.Union, types.UnionType):
        members = [_wrong(arg) for arg in typing.get_args(hint)]
        return [v for v in members[0] if all(repr(v) in map(repr, other) for other in members[1:])]
    if origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return WRONG["sections"]
    return WRONG[hint]


def _leaves(cls: type, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, type hint) of every field of the recipe schema that holds a value (not a section);
    the fields of a list's sections under index 0."""
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        hint = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
        section = next((a for a in (hint, *args) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            out += _leaves(section, (*prefix, f.name))
            continue
        out.append(((*prefix, f.name), hint))
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            out += _leaves(typing.get_args(hint)[0], (*prefix, f.name, 0))
    return out


def _key(path: tuple) -> str:
    """``("stages", 0, "steps")`` -> ``stages[0].steps``, as errors name it."""
    return ".".join(str(p) for p in path).replace(".0.", "[0].").replace(".0", "[0]")


def _set(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return data


def _type_cases() -> list[tuple[str, tuple, object, str]]:
    cases = []
    for path, hint in _leaves(Recipe):
        if path == ("runs_dir",):  # the tests point it at a temporary folder
            continue
        cases += [("type", path, value, _key(path)) for value in _wrong(hint)[:3]]
    return cases


SECTIONS = ["task", "lora", "train", "replay", "snapshots", "evals"]
# (kind, path, value, the key the error must name)
STRUCTURE = (
    [("unknown key", (s, "bogus_key"), 1, f"{s}.bogus_key") for s in SECTIONS]
    + [("section is a scalar", (s,), 42, s) for s in SECTIONS]
    + [("section is a list", (s,), [1, 2], s) for s in SECTIONS if s not in ("lora", "replay")]
    + [
        ("stage is a scalar", ("stages", 1), 7, "stages[1]"),
        ("stage task is a list", ("stages", 0, "task"), [1], "stages[0].task"),
        ("unknown stage key", ("stages", 1, "stps"), 3, "stages[1].stps"),
        ("unknown top-level key", ("bogus",), {}, "bogus"),
        ("name escapes", ("name",), "../../etc", "name"),
        ("absolute name", ("name",), "/tmp/x", "name"),
        ("empty name", ("name",), "", "name"),
        ("negative steps", ("train", "steps"), -1, "train.steps"),
        ("zero batch", ("train", "batch_size"), 0, "train.batch_size"),
        ("negative lr", ("train", "lr"), -1e-3, "train.lr"),
        ("nan lr", ("train", "lr"), float("nan"), "train.lr"),
        ("seq_len zero", ("train", "seq_len"), 0, "train.seq_len"),
        ("rank zero", ("lora", "r"), 0, "lora.r"),
        ("negative limit", ("evals", "limit"), -5, "evals.limit"),
        ("unknown eval", ("evals", "general"), ["not_a_task"], "evals"),
        ("empty new evals and general", ("evals",), {"new": [], "general": []}, "evals"),
        ("unknown base", ("base",), "no-such-model-alias", "base"),
        ("scratch key unknown", ("base",), "scratch:layer=2", "base"),
        ("scratch size zero", ("base",), "scratch:layers=0", "base"),
        ("scratch odd head dimension", ("base",), "scratch:hidden=12,heads=4", "base"),  # RoPE needs even
        ("scratch hidden not divisible by heads", ("base",), "scratch:hidden=30,heads=4", "base"),
        ("missing data file", ("task",), {"name": None, "path": "nope.jsonl"}, "task.path"),
        ("snapshot count zero", ("snapshots",), {"schedule": "log", "count": 0}, "snapshots.count"),
        ("replay samples zero", ("replay", "samples"), 0, "replay.samples"),
        ("replay temperature zero", ("replay", "temperature"), 0.0, "replay.temperature"),
        ("replay top_p above 1", ("replay", "top_p"), 1.5, "replay.top_p"),
        ("grad accum zero", ("train", "grad_accum"), 0, "train.grad_accum"),
        ("negative weight decay", ("train", "weight_decay"), -0.1, "train.weight_decay"),
        ("cascade probes nothing", ("cascade",), {"cheap": [], "kl": False}, "cascade"),
        ("negative max_grad_norm", ("train", "max_grad_norm"), -1.0, "train.max_grad_norm"),
    ]
)

# (content, what the error must name: the line YAML stopped at, else the file)
BROKEN_YAML = {
    "unclosed brace": ("train: {lr: 1e-3\n", "line 2"),
    "tab indentation": ("train:\n\tlr: 1e-3\n", "line 2"),
    "top-level list": ("- base: tiny-random\n", "bad.yaml"),
    "top-level scalar": ("just a string\n", "bad.yaml"),
    "python tag": ("base: !!python/object/apply:os.system ['true']\n", "line 1"),
    "binary garbage": ("\x00\x01\x02 base: \xff\n", "bad.yaml"),
    "duplicate mapping": ("train: {lr: 1, lr: 2}\nbogus: [\n", "line 3"),
    "unclosed quote": ("name: 'run\n", "line 2"),
    "bad indentation": ("train:\n  lr: 1\n lr2: 2\n", "line 3"),
    "anchor to nothing": ("train: *missing\n", "line 1"),
}

# (content, extension, what the error must name: the file and line, else the key to change)
DATA_FILES = {
    "broken json line": (
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: b}\n',
        "jsonl",
        "data.jsonl:2",
    ),
    "not json at all": ("hello world\n", "jsonl", "data.jsonl:1"),
    "empty file": ("", "jsonl", "task"),
    "only blank lines": ("\n\n  \n", "jsonl", "task"),
    "json array instead of lines": ('[{"prompt": "a", "completion": "b"}]\n', "jsonl", "data.jsonl:1"),
    "line is a list": ("[1, 2]\n", "jsonl", "data.jsonl:1"),
    "line is a number": ("42\n", "jsonl", "data.jsonl:1"),
    "missing completion and text": ('{"prompt": "a"}\n', "jsonl", "task.prompt_field"),
    "wrong field names": ('{"question": "a", "answer": "b"}\n', "jsonl", "task.prompt_field"),
    "prompt is a number": ('{"prompt": 5, "completion": "b"}\n', "jsonl", "task"),
    "completion is null": ('{"prompt": "a", "completion": null}\n', "jsonl", "task"),
    "text is a list": ('{"text": ["a", "b"]}\n', "jsonl", "task"),
    "invalid utf-8": (b'{"prompt": "\xff\xfe", "completion": "b"}\n', "jsonl", "data.jsonl"),
    "truncated last line": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl', "jsonl", "data.jsonl:2"),
    "csv without the columns": ("question,answer\na,b\n", "csv", "task.prompt_field"),
    "csv header only": ("prompt,completion\n", "csv", "task"),
    "empty csv": ("", "csv", "task"),
    "unsupported extension": ('{"prompt": "a", "completion": "b"}\n', "txt", "task.path"),
    "parquet name, text inside": ("not parquet", "parquet", "data.parquet: not a Parquet file pyarrow can read"),
    "json array of numbers": ("[1, 2]", "json", "data.json: item 1 of the array is not an object"),
    "json array cut short": ('[{"prompt": "a", "completion": "b"},\n', "json", "data.json:2: not valid JSON"),
    "conversation on a base without a chat template": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        "jsonl",
        "conversations (lists of messages), which are rendered with the base model's chat template, and the base has none",
    ),
    "prompts that fill seq_len": (
        '{"prompt": "' + "word " * 40 + '", "completion": " yes"}\n',  # 200 bytes > seq_len 64
        "jsonl",
        "no example keeps a completion token within train.seq_len=64",
    ),
}


def _check_exit_2(path, runs, capsys, names: str) -> None:
    """The run stops with exit code 2 and one-line errors only, one of them naming ``names`` (a key
    such as ``train.lr``, a file, a line)."""
    code = cli.main(["run", str(path), "--set", f"runs_dir={runs}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # progress bars aside
    assert code == 2, err
    assert any(line.startswith("forgetscope: error:") for line in lines), err
    assert all(line.startswith("forgetscope: ") for line in lines), err
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir()), "something was written"
    named = re.compile(rf"(?<![\w.]){re.escape(names)}(?!\w)")  # train.lr, not train.lr_x nor x.train.lr
    messages = [line.replace(str(path.parent), "") for line in lines]  # the folder's name holds the test's
    assert any(named.search(message) for message in messages), f"no error names {names!r}:\n{err}"


CASES = _type_cases() + STRUCTURE


def test_the_generated_set_is_large_and_covers_every_field():
    assert len(CASES) + len(BROKEN_YAML) + len(DATA_FILES) >= 100
    covered = {key for kind, _, _, key in CASES if kind == "type"}
    assert {_key(path) for path, _ in _leaves(Recipe)} - covered == {"runs_dir"}


@pytest.mark.parametrize("kind, path, value, key", CASES, ids=[f"{k}:{n}={v!r}"[:60] for k, _, v, n in CASES])
def test_malformed_recipe(tmp_path, capsys, tiny_recipe_data, kind, path, value, key):
    data = {**tiny_recipe_data, "replay": {"source": "self", "samples": 4}}
    if path[0] == "stages":  # a recipe of stages: no task, no train.steps
        data = {**data, "stages": STAGES, "train": {k: v for k, v in data["train"].items() if k != "steps"}}
        del data["task"]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(_set(data, path, value)))
    _check_exit_2(recipe, tmp_path / "runs", capsys, key)


@pytest.mark.parametrize("name", list(BROKEN_YAML))
def test_broken_yaml(tmp_path, capsys, name):
    recipe = tmp_path / "bad.yaml"
    text, names = BROKEN_YAML[name]
    recipe.write_bytes(text.encode("latin-1"))
    _check_exit_2(recipe, tmp_path / "runs", capsys, names)


@pytest.mark.parametrize("name", list(DATA_FILES))
def test_malformed_data_file(tmp_path, capsys, tiny_recipe_data, name):
    content, ext, names = DATA_FILES[name]
    data_path = tmp_path / f"data.{ext}"
    data_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe_data, "task": {"name": None, "path": data_path.name}}))
    _check_exit_2(recipe, tmp_path / "runs", capsys, names)
