"""Typed dataclasses as a configuration schema: build them from YAML data with every problem
collected, and print their documentation.

Fields carry their documentation in ``metadata["help"]`` (see :func:`option`). Nested sections
are dataclass-typed fields; a list of sections (``list[StageConfig]``) is built item by item.
Used by :mod:`forgetscope.recipe`, :mod:`forgetscope.load` and :mod:`forgetscope.gate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently, so a repeated ``train:`` would drop the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse YAML ``text`` as :func:`yaml.safe_load` does, refusing duplicate keys (``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line N: not valid YAML (what is wrong)``."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    return f"{where}not valid YAML ({getattr(err, 'problem', None) or err})"


def option(default: Any, help: str) -> Any:
    """A dataclass field with its documentation attached (printed by ``forgetscope fields``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a dataclass."""
    return typing.get_type_hints(cls)


def section_class(hint: Any) -> type | None:
    """The dataclass of a hint like ``TaskConfig`` or ``LoraSettings | None``."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    for arg in (hint, *args):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def item_class(hint: Any) -> type | None:
    """The dataclass of the items of a hint like ``list[StageConfig]``."""
    if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return typing.get_args(hint)[0]
    return None


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "mapping"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check ``value`` against a type hint; returns (ok, value converted where lossless)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):  # YAML 1.1 reads on/off as true/false
            return True, "on" if value else "off"
        return value in choices, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, converted = _coerce(item, typing.get_args(hint)[0])
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if origin is dict:  # keys and values are checked by the caller (e.g. one section per key)
        return isinstance(value, dict), value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)):
            return math.isfinite(value), float(value)  # nan and inf are never meant
        return False, value
    if hint is str:
        return isinstance(value, str), value
    return False, value


def did_you_mean(word: str, options: typing.Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the option closest to a misspelt ``word``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, appending every problem found."""
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    if not isinstance(data, dict):
        where = f"{prefix.rstrip('.')}: " if prefix else ""
        keys = ", ".join(f"{name}:" for name in names)
        got = repr(data) if len(repr(data)) <= 40 else f"a {type(data).__name__}"  # not a whole file echoed
        problems.append(f"{where}expected a mapping of keys ({keys}), got {got}")
        return cls()
    field_types = hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            allowed = ", ".join(names)
            problems.append(f"{prefix}{key}: unknown key{did_you_mean(str(key), names)} (allowed: {allowed})")
            continue
        hint = field_types[key]
        section = section_class(hint)
        if section is not None:
            if value is None:
                kwargs[key] = None
            else:
                kwargs[key] = build(section, value, f"{prefix}{key}.", problems)
            continue
        item = item_class(hint)
        if item is not None and isinstance(value, list):
            kwargs[key] = [build(item, entry, f"{prefix}{key}[{i}].", problems) for i, entry in enumerate(value)]
            continue
        ok, converted = _coerce(value, hint)
        if ok:
            kwargs[key] = converted
        else:
            choices = [a for a in typing.get_args(hint) if isinstance(a, str)] if _is_choice(hint) else []
            words = hint is str or bool(choices)
            if words and isinstance(value, (bool, int, float)):  # `yes` unquoted is YAML's true
                hint_text = "; YAML read it as a number or a boolean: quote it"
            elif isinstance(value, str) and choices:
                hint_text = did_you_mean(value, choices)
            elif value is None:
                hint_text = "; the value is empty"
            else:
                hint_text = ""
            problems.append(f"{prefix}{key}: expected {type_name(hint)}, got {value!r}{hint_text}")
    return cls(**kwargs)


def _is_choice(hint: Any) -> bool:
    """Whether ``hint`` is a Literal of words (or one of them or None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    literal = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    return typing.get_origin(literal) is Literal and all(isinstance(a, str) for a in typing.get_args(literal))


def reference(root: type) -> str:
    """Every field of ``root`` and its sections with type, default and documentation; the fields
    of a list's items under ``<name>[i].``. A class's own fields come before its sections, so that
    none reads as a field of the section above it."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        types_ = hints(cls)
        defaults = cls()
        fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
        plain = [f for f in fields if not section_class(types_[f.name]) and not item_class(types_[f.name])]
        for f in plain + [f for f in fields if f not in plain]:
            kind = f"{type_name(types_[f.name])}, default {getattr(defaults, f.name)!r}"
            if section := section_class(types_[f.name]):
                lines.append(f"\n{prefix}{f.name}:  {f.metadata['help']}")
                walk(section, f"{prefix}{f.name}.")
            elif item := item_class(types_[f.name]):  # a heading of its own, then its items' fields
                lines.append(f"\n{prefix}{f.name} ({kind}):  {f.metadata['help']}")
                lines.append(f"\n{prefix}{f.name}[i]:  {item.__doc__}")
                walk(item, f"{prefix}{f.name}[i].")
            else:
                lines.append(f"  {prefix}{f.name} ({kind})")
                lines.append(f"      {f.metadata['help']}")

    walk(root, "")
    return "\n".join(lines).lstrip("\n") + "\n"
