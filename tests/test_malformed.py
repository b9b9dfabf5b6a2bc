"""A generated set of malformed recipes and data files: every one ends in exit code 2 with
`forgetscope: error:` lines naming the problem, no traceback, and nothing written."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from forgetscope import cli, schema
from forgetscope.recipe import Recipe

# Wrong values to try per type; only those the schema really rejects for a field are kept.
BAD_VALUES = ["seven", 2.5, -3, True, [1, 2], {"a": 1}, "", None]


def _fields(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(path, type hint) of every leaf field of the recipe schema."""
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        hint = schema.hints(cls)[f.name]
        section = schema.section_class(hint)
        out += _fields(section, (*prefix, f.name)) if section else [((*prefix, f.name), hint)]
    return out


def _set(data: dict, path: tuple[str, ...], value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict) or key not in node else node[key]
        if not isinstance(node, dict):
            return data
    node[path[-1]] = value
    return data


def _type_cases() -> list[tuple[str, tuple[str, ...], object]]:
    cases = []
    for path, hint in _fields(Recipe):
        if path == ("runs_dir",):  # the tests point it at a temporary folder
            continue
        wrong = [v for v in BAD_VALUES if not schema._coerce(v, hint)[0]][:3]
        cases += [("type", path, value) for value in wrong]
    return cases


SECTIONS = ["task", "lora", "train", "replay", "snapshots", "evals"]
STRUCTURE = ([("unknown key", (s, "bogus_key"), 1) for s in SECTIONS]
             + [("section is a scalar", (s,), 42) for s in SECTIONS]
             + [("section is a list", (s,), [1, 2]) for s in SECTIONS if s not in ("lora", "replay")]
             + [("unknown top-level key", ("bogus",), {}), ("name escapes", ("name",), "../../etc"),
                ("absolute name", ("name",), "/tmp/x"), ("empty name", ("name",), ""),
                ("negative steps", ("train", "steps"), -1), ("zero batch", ("train", "batch_size"), 0),
                ("negative lr", ("train", "lr"), -1e-3), ("nan lr", ("train", "lr"), float("nan")),
                ("seq_len zero", ("train", "seq_len"), 0), ("rank zero", ("lora", "r"), 0),
                ("negative limit", ("evals", "limit"), -5), ("unknown eval", ("evals", "general"), ["not_a_task"]),
                ("empty new evals and general", ("evals",), {"new": [], "general": []}),
                ("unknown base", ("base",), "no-such-model-alias"), ("missing data file", ("task",), {"name": None, "path": "nope.jsonl"}),
                ("snapshot count zero", ("snapshots",), {"schedule": "log", "count": 0}), ("replay samples zero", ("replay", "samples"), 0),
                ("replay temperature zero", ("replay", "temperature"), 0.0), ("replay top_p above 1", ("replay", "top_p"), 1.5),
                ("grad accum zero", ("train", "grad_accum"), 0)])

BROKEN_YAML = {
    "unclosed brace": "train: {lr: 1e-3\n",
    "tab indentation": "train:\n\tlr: 1e-3\n",
    "top-level list": "- base: tiny-random\n",
    "top-level scalar": "just a string\n",
    "python tag": "base: !!python/object/apply:os.system ['true']\n",
    "binary garbage": "\x00\x01\x02 base: \xff\n",
    "duplicate mapping": "train: {lr: 1, lr: 2}\nbogus: [\n",
    "unclosed quote": "name: 'run\n",
    "bad indentation": "train:\n  lr: 1\n lr2: 2\n",
    "anchor to nothing": "train: *missing\n",
}

DATA_FILES = {
    "broken json line": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: b}\n', "jsonl"),
    "not json at all": ("hello world\n", "jsonl"),
    "empty file": ("", "jsonl"),
    "only blank lines": ("\n\n  \n", "jsonl"),
    "json array instead of lines": ('[{"prompt": "a", "completion": "b"}]\n', "jsonl"),
    "line is a list": ('[1, 2]\n', "jsonl"),
    "line is a number": ('42\n', "jsonl"),
    "missing completion and text": ('{"prompt": "a"}\n', "jsonl"),
    "wrong field names": ('{"question": "a", "answer": "b"}\n', "jsonl"),
    "prompt is a number": ('{"prompt": 5, "completion": "b"}\n', "jsonl"),
    "completion is null": ('{"prompt": "a", "completion": null}\n', "jsonl"),
    "text is a list": ('{"text": ["a", "b"]}\n', "jsonl"),
    "invalid utf-8": (b'{"prompt": "\xff\xfe", "completion": "b"}\n', "jsonl"),
    "truncated last line": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl', "jsonl"),
    "csv without the columns": ("question,answer\na,b\n", "csv"),
    "csv header only": ("prompt,completion\n", "csv"),
    "empty csv": ("", "csv"),
    "unsupported extension": ('{"prompt": "a", "completion": "b"}\n', "txt"),
    "parquet name, text inside": ("not parquet", "parquet"),
}


def _check_exit_2(path, runs, capsys, extra=()) -> None:
    code = cli.main(["run", str(path), "--set", f"runs_dir={runs}", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # progress bars aside
    assert code == 2, err
    assert any(line.startswith("forgetscope: error:") for line in lines), err
    assert all(line.startswith("forgetscope: ") for line in lines), err
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir()), "something was written"


CASES = _type_cases() + STRUCTURE


def test_the_generated_set_is_large():
    assert len(CASES) + len(BROKEN_YAML) + len(DATA_FILES) >= 100


@pytest.mark.parametrize("kind, path, value", CASES, ids=[f"{k}:{'.'.join(p)}={v!r}"[:60] for k, p, v in CASES])
def test_malformed_recipe(tmp_path, capsys, tiny_recipe_data, kind, path, value):
    data = _set({**tiny_recipe_data, "replay": {"source": "self", "samples": 4}}, path, value)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(data))
    _check_exit_2(recipe, tmp_path / "runs", capsys)


@pytest.mark.parametrize("name", list(BROKEN_YAML))
def test_broken_yaml(tmp_path, capsys, name):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(BROKEN_YAML[name].encode("latin-1"))
    _check_exit_2(recipe, tmp_path / "runs", capsys)


@pytest.mark.parametrize("name", list(DATA_FILES))
def test_malformed_data_file(tmp_path, capsys, tiny_recipe_data, name):
    content, ext = DATA_FILES[name]
    data_path = tmp_path / f"data.{ext}"
    data_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe_data, "task": {"name": None, "path": data_path.name}}))
    _check_exit_2(recipe, tmp_path / "runs", capsys)
