"""Datasets for the embedded eval tasks, generated in code (lm-eval `custom_dataset` hooks).

Each hook returns ``{"test": datasets.Dataset}``; every item carries a stable ``id``.
Usable directly with ``lm_eval --include_path evals/ --tasks numerals`` once forgetscope is installed.
"""

import json

import datasets

from forgetscope import tasks


def _test(rows: list[dict]) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(rows)}


def numerals(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.numerals("test"))


def sym_reverse(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.symbolic("sym_reverse", "test"))


def sym_sort(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.symbolic("sym_sort", "test"))


def sym_shift(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.symbolic("sym_shift", "test"))


def sym_rotate(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.symbolic("sym_rotate", "test"))


def digits_reverse(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.digits("digits_reverse", "test"))


def digits_inc(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.digits("digits_inc", "test"))


def digits_rotate(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.digits("digits_rotate", "test"))


def digits_sort(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.digits("digits_sort", "test"))


def prose(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.prose_passages())


def prose_lines(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.prose_lines("test"))


def world_capitals(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.world_capitals())


def mmlu_shipped(**_: object) -> dict[str, datasets.Dataset]:
    return _test(tasks.mmlu_shipped())


def base_samples(samples: str | None = None, **_: object) -> dict[str, datasets.Dataset]:
    """The base model's own samples, from the JSONL file given as metadata ``samples``."""
    if not samples:
        raise ValueError('base_samples_ppl needs the base model\'s samples: --metadata \'{"samples": "file.jsonl"}\'')
    with open(samples) as fh:
        return _test([json.loads(line) for line in fh if line.strip()])


def answer_scores(doc: dict, results: list) -> dict[str, float]:
    """Per item: ``acc`` = the answer is the greedy continuation; ``logprob`` = its log-likelihood."""
    loglikelihood, is_greedy = results[0]
    return {"acc": int(is_greedy), "logprob": float(loglikelihood)}
