"""Datasets for the embedded eval tasks, generated in code (lm-eval `custom_dataset` hooks).

Each hook returns ``{"test": datasets.Dataset}``; every item carries a stable ``id``.
Usable directly with ``lm_eval --include_path evals/ --tasks numerals`` once forgetscope is installed.
"""

import datasets

from forgetscope import tasks


def numerals(**_: object) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(tasks.numerals("test"))}


def prose(**_: object) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(tasks.prose_passages())}


def answer_scores(doc: dict, results: list) -> dict[str, float]:
    """Per item: ``acc`` = the answer is the greedy continuation; ``logprob`` = its log-likelihood."""
    loglikelihood, is_greedy = results[0]
    return {"acc": int(is_greedy), "logprob": float(loglikelihood)}
