"""New-task data -> tokenized training examples.

Records come from an embedded task, a .jsonl/.json/.csv/.parquet file, a folder written by
``datasets``' ``save_to_disk`` or a Hugging Face dataset.
A record is a prompt/completion pair (loss on the completion only: prompt tokens get label -100),
plain text (loss on every token), or a conversation: a list of ``{role, content}`` messages
(OpenAI / TRL format), rendered with the chat template, loss on the assistant's turns. When the
tokenizer has a chat template (and ``task.chat_template`` allows it), a prompt is wrapped as a
user turn and the completion is the assistant's answer, exactly as lm-eval's
``--apply_chat_template`` renders it at evaluation. Without one, prompt and completion are joined
by a space where neither has whitespace at the seam (:func:`split_pair`), and new-task evals
join context and target the same way.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from forgetscope import tasks
from forgetscope.errors import UserError
from forgetscope.recipe import DATA_FILES, TaskConfig

IGNORE_INDEX = -100  # the label of a token that is not trained on


class DataError(UserError):
    """The new-task data cannot be used; the message names the file, line and fix."""


def load_records(task: TaskConfig, base_dir: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The raw training records of the recipe's new task: at most ``task.max_examples``, taken from
    the top of a file or dataset in its order (training shuffles the ones kept; the cut is not a
    random sample), with a warning when rows are left out or prompts are empty (``warn=False`` for a
    second read of data training already loaded, and warned about). Embedded tasks are shuffled by
    ``task.seed``."""
    if task.name:
        records = tasks.EMBEDDED_TASKS[task.name]("train", seed=task.seed)
    elif task.path:
        records = read_file(base_dir / task.path)
    else:
        records = _load_hf_dataset(task)
    if not records:
        raise DataError(f"task: the data has no records; add examples to {task.path or task.hf_dataset}")
    if task.max_examples and len(records) > task.max_examples:
        if warn and not task.name:  # an embedded task is a seeded sample already; a user's rows are cut from the top
            print(
                f"forgetscope: warning: task: {task.path or task.hf_dataset} has {len(records)} records; "
                f"task.max_examples={task.max_examples} keeps the first {task.max_examples} (from the top, not a "
                f"random sample); to train on more raise it, e.g. --set task.max_examples={len(records)} (null: all)",
                file=sys.stderr,
            )
        records = records[: task.max_examples]
    blank = sum(isinstance(r.get(task.prompt_field), str) and not r[task.prompt_field].strip() for r in records)
    if blank and warn:
        print(
            f"forgetscope: warning: {blank} of {len(records)} records have an empty `{task.prompt_field}`: "
            "their completions are trained without a prompt",
            file=sys.stderr,
        )
    return records


def _load_hf_dataset(task: TaskConfig) -> list[dict[str, Any]]:
    """The records of ``task.hf_dataset`` (from the hub, or the HF datasets cache when offline)."""
    import datasets

    try:
        return list(datasets.load_dataset(task.hf_dataset, task.hf_config, split=task.split))
    except ConnectionError as err:  # offline, or no network, and not in the HF datasets cache
        why = "offline: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else str(err)
        config = f", {task.hf_config!r}" if task.hf_config else ""
        raise DataError(
            f"task.hf_dataset: could not reach {task.hf_dataset!r} on the Hugging Face hub ({why}) and it is not in "
            f"the HF datasets cache; on a machine that is online save it, e.g. datasets.load_dataset("
            f"{task.hf_dataset!r}{config}, split={task.split!r}).to_json('train.jsonl'), and set task.path to that "
            "file instead"
        ) from None


def read_file(path: Path) -> list[dict[str, Any]]:
    """Records of a .csv file (by header), a .parquet file, a .jsonl file (one JSON object a line), a
    .json file (that, or one array of objects), or a folder of one dataset written by ``datasets``'
    ``save_to_disk``, checked record by record."""
    if path.is_dir():
        return _read_saved_dataset(path)
    try:
        return _read_file(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".json" and (text := path.read_text(encoding="utf-8-sig")).lstrip().startswith("["):
        return _read_json_array(text, path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the header
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if len(header) == 1 and "\t" in header[0]:
                raise DataError(
                    f"{path}:1: the file looks tab-separated (one column, {header[0]!r}); "
                    "save it with commas between values, or as .jsonl"
                )
            if twice := next((name for i, name in enumerate(header) if name in header[:i]), None):
                raise DataError(f"{path}:1: the header names the column `{twice}` twice; rename one")
            rows = []
            for row in reader:
                # DictReader files the values past the header's last column under None, and fills a short row with None
                values = len(header) + len(row[None]) if None in row else sum(v is not None for v in row.values())
                if values != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: {values} values, the header names {len(header)}; "
                        "quote a value that holds a comma, or fill the missing ones"
                    )
                rows.append(row)
            return rows
    records = []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = _parse_json(line, path, number)
            if not isinstance(record, dict):
                raise DataError(f'{path}:{number}: expected a JSON object like {{"prompt": ..., "completion": ...}}')
            records.append(record)
    return records


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    """The rows of a folder that ``datasets``' ``save_to_disk`` wrote for one dataset (a dataset
    dict's folder holds one such folder a split)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: a folder, but not a dataset written by datasets' save_to_disk; give a "
            f"{', '.join(DATA_FILES)} file or such a folder"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        splits = ", ".join(saved)
        raise DataError(
            f"{path}: a saved dataset of several splits ({splits}); point the path at one split's folder, "
            f"e.g. {path / next(iter(saved), 'train')}"
        )
    return saved.to_list()


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file as records (list columns, such as conversations, as Python lists)."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: not a Parquet file pyarrow can read ({err}); write it with pandas' to_parquet"
        ) from None


def _read_json_array(text: str, path: Path) -> list[dict[str, Any]]:
    """The records of a .json file (its ``text``) that holds one array of objects (the other kind: one object a line)."""
    items = _parse_json(text, path)
    bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if bad is not None:
        raise DataError(
            f'{path}: item {bad + 1} of the array is not an object like {{"prompt": ..., "completion": ...}}'
        )
    return items


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """JSON ``text`` (line ``line`` of ``path``, or the whole file) parsed; a syntax error or a key
    given twice in one object is a :class:`DataError` naming the file and line."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{line or err.lineno}: not valid JSON ({err.msg}); each line must be one JSON object "
            "(or a .json file one array of objects)"
        ) from None
    except KeyError as err:
        where = f"{path}:{line}" if line else str(path)
        raise DataError(f"{where}: the key {err.args[0]!r} is given twice in one record") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice (JSON keeps the last) raises KeyError."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise KeyError(key)
        out[key] = value
    return out


def uses_chat_template(task: TaskConfig, tokenizer) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if task.chat_template == "on" and not has_template:
        raise DataError(
            "task.chat_template: 'on' but the base model's tokenizer has no chat template; use 'auto' or 'off'"
        )
    return has_template and task.chat_template != "off"


def render_prompt(prompt: str, tokenizer, chat: bool) -> str:
    """The text that precedes the completion (chat-wrapped when ``chat``)."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def completion_delimiter(prompt: str, completion: str) -> str:
    """What joins a plain-text prompt and its completion: one space, unless either side already
    has whitespace there (``"Q:"`` + ``"A"`` -> ``"Q: A"``; ``"Q: "`` + ``"A"`` and
    ``"Q:"`` + ``" A"`` stay as they are). New-task evals on a base without a chat template join
    lm-eval's context and target the same way (:mod:`forgetscope.evaluate`)."""
    return "" if not prompt or prompt[-1].isspace() or completion[:1].isspace() else " "


def split_pair(prompt: str, completion: str, chat: bool) -> tuple[str, str]:
    """(context, continuation) of a prompt/completion pair, as lm-eval scores it. In plain text
    they are joined by :func:`completion_delimiter` (after a chat turn they are taken as they
    are); then the context's trailing whitespace moves into the continuation, as lm-eval's
    ``HFLM`` moves it (the newline a chat template puts after ``assistant`` too), so that the
    tokens trained on are the tokens scored."""
    if not chat:
        completion = completion_delimiter(prompt, completion) + completion
    context = prompt.rstrip()
    return context, prompt[len(context) :] + completion


def conversation(record: dict[str, Any], task: TaskConfig) -> tuple[Any, int] | None:
    """A record's conversation and the index of its first trained message: ``messages`` (every
    assistant turn trained), or a prompt and completion that are lists of messages (TRL's
    conversational prompt-completion: the completion's turns trained). None for text or a
    prompt/completion of strings."""
    if task.messages_field in record:
        return record[task.messages_field], 0
    prompt, completion = record.get(task.prompt_field), record.get(task.completion_field)
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion], len(prompt)
    return None


def prompt_of(record: dict[str, Any], task: TaskConfig) -> str | None:
    """The prompt a record's answer follows, to sample from (replay of earlier stages, the KL
    probe): the prompt, or in a conversation the last user message before its first trained
    turn (the system message and earlier turns are left out); None for plain text or a
    conversation that :func:`tokenize` refuses."""
    found = conversation(record, task)
    if found is None:
        prompt = record.get(task.prompt_field)
        return str(prompt) if prompt is not None else None
    if _conversation_problem(found):
        return None
    messages, first = found
    trained = next(i for i, m in enumerate(messages) if i >= first and m["role"] == "assistant")
    return next((m["content"] for m in reversed(messages[:trained]) if m["role"] == "user"), "")


def _conversation_problem(found: tuple[Any, int]) -> str | None:
    """What is wrong with a conversation, if anything."""
    messages, first = found
    if not isinstance(messages, list) or not messages:
        return 'must be a list of messages like {"role": "user", "content": "..."}'
    for j, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f'message {j} must be {{"role": ..., "content": "..."}} with text content, got {str(m)[:80]}'
    trained = [m for m in messages[first:] if m["role"] == "assistant"]
    if not trained:
        return "has no assistant message to train on"
    if any(not m["content"].strip() for m in trained):
        return "has an empty assistant message; fill it or remove the record"
    return None


def _encode_conversation(messages: list[dict[str, str]], first: int, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation rendered with the chat template: each assistant
    message from index ``first`` on is trained as the template renders it after its generation
    prompt (its end-of-turn tokens included); the rest is context. The pieces are tokenized apart,
    as a model answering the context would continue it."""

    def render(part: list[dict[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)

    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if i < first or message["role"] != "assistant":
            continue
        before, upto = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (before.startswith(done) and upto.startswith(before)):
            raise DataError(
                "the chat template renders earlier turns differently once an answer follows them, so the "
                "answers cannot be cut out of the conversation; give prompt/completion records instead"
            )
        context = tokenizer(before[len(done) :], add_special_tokens=False).input_ids
        answer = tokenizer(upto[len(before) :], add_special_tokens=False).input_ids
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = upto
    return ids, labels


def _encode_conversations(
    records: list[dict[str, Any]], tokenizer, task: TaskConfig, chat: bool, where: str
) -> list[tuple[list[int], list[int]]]:
    """Every record as a conversation (:func:`_encode_conversation`), each checked first."""
    if not chat:
        why = "task.chat_template is off" if getattr(tokenizer, "chat_template", None) else "the base has none"
        raise DataError(
            f"{where}: the records are conversations (lists of messages), which are rendered with the base "
            f"model's chat template, and {why}; give prompt/completion or text records"
        )
    from jinja2 import TemplateError

    field = (
        f"`{task.messages_field}`"
        if task.messages_field in records[0]
        else f"`{task.prompt_field}` + `{task.completion_field}`"
    )
    encoded = []
    for i, record in enumerate(records):
        item = conversation(record, task)
        problem = "is not a conversation like record 1's" if item is None else _conversation_problem(item)
        if problem:
            raise DataError(f"{where}: record {i + 1}: {field} {problem}")
        try:
            encoded.append(_encode_conversation(*item, tokenizer))
        except TemplateError as err:  # the template's own raise_exception ("System role not supported")
            raise DataError(
                f"{where}: record {i + 1}: the base's chat template refuses the conversation: {err}"
            ) from None
        except DataError as err:
            raise DataError(f"{where}: record {i + 1}: {err}") from None
    return encoded


def _encode_records(
    records: list[dict[str, Any]], tokenizer, task: TaskConfig, chat: bool, where: str
) -> list[tuple[list[int], list[int]]]:
    """Prompt/completion records (the prompt masked) or text records (every token trained), each checked first."""
    has_prompt = task.prompt_field in records[0]
    if not has_prompt and task.text_field not in records[0]:
        raise DataError(
            f"{where}: record 1 has no `{task.prompt_field}` (task.prompt_field, with `{task.completion_field}`) "
            f"and no `{task.text_field}` (task.text_field); its columns: {_columns(records[0])}; "
            "set task.prompt_field/completion_field/text_field/messages_field to your column names"
        )
    field = task.completion_field if has_prompt else task.text_field
    fields = [task.prompt_field, field] if has_prompt else [field]
    missing = [i for i, r in enumerate(records) if any(f not in r for f in fields)]
    if missing:
        need = f"`{task.prompt_field}` and `{task.completion_field}`" if has_prompt else f"`{task.text_field}`"
        lacks = ", ".join(f"`{f}`" for f in fields if f not in records[missing[0]])
        raise DataError(
            f"{where}: record {missing[0] + 1} lacks {lacks} ({len(missing)} of {len(records)} records lack {need}); "
            f"its columns: {_columns(records[missing[0]])}; "
            "set task.prompt_field/completion_field/text_field/messages_field to your column names"
        )
    not_text = [(i, f) for i, r in enumerate(records) for f in fields if not isinstance(r[f], str)]
    if not_text:
        i, f = not_text[0]
        raise DataError(
            f"{where}: record {i + 1} (of {len(not_text)} bad): `{f}` must be a string, got {records[i][f]!r}"
        )
    empty = [i for i, r in enumerate(records) if not r[field].strip()]
    if empty:  # it would train the end-of-sequence token alone: to answer nothing
        raise DataError(
            f"{where}: record {empty[0] + 1} (of {len(empty)} such) has an empty `{field}`; fill it or remove the record"
        )
    end = tokenizer.eos_token or ""
    encoded = []
    for record in records:
        if has_prompt:
            prefix, answer = split_pair(
                render_prompt(record[task.prompt_field], tokenizer, chat), record[task.completion_field], chat
            )
            prompt_ids = tokenizer(prefix, add_special_tokens=not chat).input_ids
            answer_ids = tokenizer(answer + end, add_special_tokens=False).input_ids
            encoded.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
        else:
            full = tokenizer(record[field] + end).input_ids
            encoded.append((full, full))
    return encoded


def _columns(record: dict[str, Any], most: int = 12) -> str:
    """A record's column names for a message: `a`, `b` (the first ``most`` of many)."""
    names = [f"`{name}`" for name in record]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return (", ".join(names[:most]) or "none") + more


def tokenize(records: list[dict[str, Any]], tokenizer, task: TaskConfig, seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenize records into ``input_ids``/``labels`` (what is not trained on masked with
    ``IGNORE_INDEX``), truncated to ``seq_len``."""
    chat = uses_chat_template(task, tokenizer)
    where = f"task: {task.path}" if task.path else "task"  # the record numbers count in the user's file
    encode = _encode_conversations if conversation(records[0], task) is not None else _encode_records
    examples, too_long, no_answer = [], 0, 0
    for full, full_labels in encode(records, tokenizer, task, chat, where):
        input_ids, labels = full[:seq_len], full_labels[:seq_len]
        too_long += len(full) > seq_len
        if all(label == IGNORE_INDEX for label in labels):  # the prompt fills seq_len: nothing left to learn
            no_answer += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
    if not examples:
        raise DataError(
            f"task: no example keeps a completion token within train.seq_len={seq_len} (the prompts fill it); "
            "raise train.seq_len or shorten the prompts"
        )
    if too_long:
        message = (
            f"{too_long} of {len(records)} examples are longer than train.seq_len={seq_len} and are truncated; "
            "raise train.seq_len, shorten them, or set task.too_long"
        )
        if task.too_long == "error":
            raise DataError(f"task: {message}")
        print(f"forgetscope: warning: {message}", file=sys.stderr)
    if no_answer:
        print(
            f"forgetscope: warning: {no_answer} of {len(records)} examples keep no completion token within "
            f"train.seq_len={seq_len} and are left out; raise train.seq_len or shorten their prompts",
            file=sys.stderr,
        )
    return examples


def pack(examples: list[dict[str, list[int]]], capacity: int, pad_id: int) -> dict[str, Any]:
    """A training batch without padding between examples: examples are laid end to end in rows of at
    most ``capacity`` tokens (first fit, longest first), position ids restart at each example, and
    only row ends are padded. Without an attention mask, transformers reads the example boundaries
    from the restarting position ids and keeps attention within each example, so every example
    trains exactly as it would alone. The first label of each example is masked (no prediction
    crosses a boundary); the padding, a run of position ids of its own, carries no labels. The batch
    also turns the KV cache off (``use_cache``): transformers reads packed boundaries only without one."""
    rows: list[list[dict[str, list[int]]]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        size = len(example["input_ids"])
        fit = next((r for r, free in enumerate(room) if free >= size), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(example)
        room[fit] -= size
    width = max(capacity - free for free in room)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids = [t for e in row for t in e["input_ids"]]
        labels = [label for e in row for label in [IGNORE_INDEX, *e["labels"][1:]]]
        positions = [p for e in row for p in range(len(e["input_ids"]))]
        tail = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * tail)
        batch["labels"].append(labels + [IGNORE_INDEX] * tail)
        batch["position_ids"].append(positions + list(range(tail)))
    return {**{k: torch.tensor(v) for k, v in batch.items()}, "use_cache": False}
