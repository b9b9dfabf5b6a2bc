"""A recipe file to a checked :class:`~forgetscope.recipe.Recipe`: read the YAML, apply ``--set``
overrides, build the sections (:func:`forgetscope.schema.build`: unknown keys with a did-you-mean,
wrong types) and check the result (:func:`forgetscope.validate.check`: impossible combinations,
missing files, unknown models and tasks). Every problem is collected and raised once, as one
:class:`RecipeError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from forgetscope import validate
from forgetscope.errors import UserError
from forgetscope.recipe import Recipe
from forgetscope.schema import build, load_yaml, yaml_problem


class RecipeError(UserError):
    """A recipe (or its overrides) is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = "recipe"):
        self.problems = list(dict.fromkeys(problems))  # a problem found by two checks is said once
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" if source else p for p in self.problems))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "method=full"]`` into a nested mapping (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            problems.append(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
            continue
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:  # a key inside one an earlier pair gave a value (`replay=null`, then `replay.ratio`)
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[parts[-1]] = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problems.append(
                f"--set {pair!r}: the value is not YAML ({str(err).splitlines()[0]}); quote it or close its brackets"
            )
    if problems:
        raise RecipeError(problems, None)  # each line names its --set
    return nested


def _is_index(key: str) -> bool:
    """Whether a ``--set`` key part indexes a list: ``1`` or, from the end, ``-1``."""
    return re.fullmatch(r"-?[0-9]+", key) is not None


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``base`` with ``extra`` merged in, key by key; a list is entered by index (``stages.1.lr``).
    ``where``: the dotted path of ``base`` in the recipe, for errors."""
    out = dict(base)
    for key, value in extra.items():
        path = f"{where}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{path}.")
        elif isinstance(value, dict) and isinstance(out.get(key), list) and all(_is_index(k) for k in value):
            items = list(out[key])
            for index, item in value.items():
                if not -len(items) <= int(index) < len(items):
                    have = (
                        f"items 0..{len(items) - 1}, or -{len(items)}..-1 from the end"
                        if items
                        else "the list is empty"
                    )
                    raise RecipeError([f"--set {path}.{index}: there is no item {index} ({have})"], None)
                at = int(index) % len(items)
                mergeable = isinstance(item, dict) and isinstance(items[at], dict)
                items[at] = _merge(items[at], item, f"{path}.{index}.") if mergeable else item
            out[key] = items
        elif isinstance(value, dict) and isinstance(out.get(key), list):
            key_given = next(k for k in value if not _is_index(k))
            raise RecipeError(
                [f"--set {path}.{key_given}: {path} is a list; index its items by number ({path}.0, or {path}.-1)"],
                None,
            )
        elif isinstance(value, dict) and value and all(_is_index(k) for k in value) and out.get(key) is None:
            index = next(iter(value))
            raise RecipeError(
                [
                    f"--set {path}.{index}: the recipe has no {path} list to index; give the whole list: --set '{path}=[...]'"
                ],
                None,
            )
        else:
            out[key] = value
    return out


def _data_replaces_default_task(recipe: Recipe, data: dict[str, Any]) -> None:
    """A task that gives ``path`` or ``hf_dataset`` and no ``name`` has no embedded task: the
    default name stands only when no data is given (``task: {path: mine.jsonl}`` needs no
    ``name: null``). A task that gives a name and data is still refused, by validation."""
    given = [(recipe.task, data.get("task"))]
    given += [(stage.task, raw.get("task")) for stage, raw in zip(recipe.stages, data.get("stages") or [])]
    for task, raw in given:
        if isinstance(raw, dict) and "name" not in raw and (raw.get("path") or raw.get("hf_dataset")):
            task.name = None


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Build and validate a recipe from plain data; raises :class:`RecipeError` with every problem."""
    problems: list[str] = []
    recipe = build(Recipe, data if data is not None else {}, "", problems)
    recipe.source = source
    if not problems and data:
        _data_replaces_default_task(recipe, data)
    if not problems:
        problems += validate.check(recipe, data)
    if problems:
        raise RecipeError(problems, source or "recipe")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe YAML file, apply ``--set`` style overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a recipe file" if path.is_dir() else "no such recipe file"
        raise RecipeError([f"{what}; see recipes/ for examples"], str(path))
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(
            [f"not UTF-8 text ({err.reason} at byte {err.start}); save the recipe as UTF-8"], str(path)
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError([yaml_problem(err)], str(path)) from None
    if not data:  # an empty file would otherwise run every default (a LoRA of SmolLM2 on numerals)
        raise RecipeError(
            ["the file holds no settings; write the recipe's (examples in recipes/, every field: forgetscope fields)"],
            str(path),
        )
    if not isinstance(data, dict):
        raise RecipeError([f"expected a mapping of keys at the top level, got {type(data).__name__}"], str(path))
    parse_overrides(overrides or [])  # every malformed --set at once
    refused = []
    for pair in overrides or []:  # then in turn, so that the last --set of a setting holds (stages.0 = stages.-2)
        if problem := _turns_replay_on(pair, data):
            refused.append(problem)  # not merged: the rest is checked as if it had not been given
            continue
        data = _merge(data, parse_overrides([pair]))
    try:
        recipe = recipe_from_dict(data, str(path))
    except RecipeError as err:
        raise RecipeError(
            [*refused, *(_blame(problem, overrides or [], str(path), data) for problem in err.problems)], None
        ) from None
    if refused:
        raise RecipeError(refused, None)
    return recipe


NO_REPLAY = "the recipe has no replay"
"""How :func:`_turns_replay_on` opens its problem (``forgetscope sweep`` says it of ``--key``)."""


def _turns_replay_on(pair: str, data: dict[str, Any]) -> str | None:
    """The problem, if any, with a ``--set`` of a key inside ``replay`` when ``data`` (the recipe with
    the ``--set`` before this one) has none: it would turn replay on with every other setting at its
    default (KL, coeff 10, 256 samples from BOS), a method the user never chose. Giving the whole
    section (``--set replay={source: self, ...}``) turns it on. Not for ``cascade``: ``--set
    cascade.every=4`` is how a recipe without one is calibrated (README, "Cheap probes"), its
    defaults being its design; nor ``lora``, on with ``method: lora`` and refused by validation
    with ``method: full``."""
    key, _, value = pair.partition("=")
    section, dot, inner = key.strip().partition(".")
    if section != "replay" or not dot or data.get("replay") is not None:
        return None
    example = {"source": "self", "ratio": "0.25", "loss": "kl", inner: value.strip()}
    whole = "{" + ", ".join(f"{k}: {v}" for k, v in example.items()) + "}"
    state = "replay: null" if "replay" in data else "no `replay:` section"
    return (
        f"--set {pair}: {NO_REPLAY} ({state}), so this would turn replay on with every other "
        f"replay setting at its default; to turn it on, give the whole section (--set 'replay={whole}'; "
        "every field: forgetscope fields) or add a `replay:` section to the recipe"
    )


def overlaps(key: str, other: str) -> bool:
    """Whether two dotted keys touch the same setting: equal, or one a section holding the other."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def _from_start(key: str, data: Any) -> str:
    """A dotted ``--set`` key with its list indices counted from the start (``stages.-1.lr`` of
    three stages is ``stages.2.lr``), as validation names them."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(data, list) and _is_index(part) and -len(data) <= int(part) < len(data):
            parts[i] = str(int(part) % len(data))
            data = data[int(part)]
        else:
            data = data.get(part) if isinstance(data, dict) else None
    return ".".join(parts)


def _blame(problem: str, overrides: list[str], path: str, data: Any) -> str:
    """A validation line prefixed with its cause: the ``--set`` that gave its key, a section
    holding it or a key inside it, else the recipe file (``data``: the recipe's mapping)."""
    plain = problem.replace("[", ".").replace("]", "")
    keys = {plain.split(":", 1)[0], *re.findall(r"\w+(?:\.\w+)+", plain)}  # `key: ...`, and dotted keys it names
    for pair in reversed(overrides):  # the last --set of a key is the one that holds
        given = _from_start(pair.partition("=")[0].strip(), data)
        if any(overlaps(key, given) for key in keys):
            return f"--set {pair}: {problem}"
    return f"{path}: {problem}"
