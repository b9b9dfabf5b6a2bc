"""lm-eval's standard tasks, with their own configs (doc_to_text, process_docs, filters, metrics,
group aggregation), scored by forgetscope on small local fixtures of their datasets
(``datasets.load_dataset`` stubbed in process) and checked against lm-eval's own evaluation of the
same model and fixtures; the offline check for data that is not cached."""

import json
import os
import subprocess
import sys

import datasets
import pandas as pd
import pytest

from forgetscope import cli, evaluate, models, registry
from forgetscope.recipe import EvalConfig

LIMIT = 4
MMLU_SUBJECTS = 57


def _arc(n: int) -> list[dict]:
    return [
        {
            "id": f"Mercury_{i}",
            "question": f"Which tool measures the length of object {i}?",
            "choices": {"text": ["a ruler", "a scale", "a thermometer", "a clock"], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(n)
    ]


def _hellaswag(n: int) -> list[dict]:
    return [
        {
            "ind": i,
            "activity_label": "Making tea",
            "ctx_a": f"A person boils water in kettle {i}.",
            "ctx_b": "then they",
            "ctx": f"A person boils water in kettle {i}. then they",
            "source_id": f"wiki_{i}",
            "split": "val",
            "split_type": "indomain",
            "label": str(i % 4),
            "endings": [
                "pour it over the leaves [title] Steep.",
                "put the kettle in the fridge.",
                "paint the wall blue.",
                "read a newspaper.",
            ],
        }
        for i in range(n)
    ]


def _mmlu(subject: str, n: int) -> list[dict]:
    return [
        {
            "question": f"In {subject.replace('_', ' ')}, which statement {i} holds?",
            "subject": subject,
            "choices": ["the first", "the second", "the third", "the fourth"],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def _gsm8k(n: int) -> list[dict]:
    # Half the answers are "[invalid]", what lm-eval's filters return when a response holds no number:
    # a tiny random model then scores on some items, so the comparison checks more than zeros.
    return [
        {
            "question": f"Tom has {i} apples and buys 2 more. How many?",
            "answer": f"{i} + 2 = {i + 2}\n#### {i + 2 if i % 2 else '[invalid]'}",
        }
        for i in range(n)
    ]


def fake_load_dataset(path, name=None, **kwargs):
    """A few rows in the real datasets' schemas, for the splits lm-eval's task configs read."""
    if path == "allenai/ai2_arc":
        splits = {"train": _arc(3), "validation": _arc(3), "test": _arc(6)}
    elif path == "Rowan/hellaswag":
        splits = {"train": _hellaswag(3), "validation": _hellaswag(6), "test": _hellaswag(3)}
    elif path == "cais/mmlu":
        splits = {"test": _mmlu(name, 2), "validation": _mmlu(name, 1), "dev": _mmlu(name, 1)}
    elif path == "openai/gsm8k":
        splits = {"train": _gsm8k(6), "test": _gsm8k(3)}
    else:
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (test fixture)")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})


@pytest.fixture
def fixtures(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_standard_tasks_score_as_lm_eval_scores_them(fixtures, tmp_path):
    """arc_easy and hellaswag (multiple choice, hellaswag with its process_docs), mmlu (a group of
    groups over 57 subjects, aggregated by size) and gsm8k (generate_until, 5-shot, two filters)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = models.load(models.resolve("tiny-random"))
    model.eval()
    suite = evaluate.prepare_suite(
        EvalConfig(new=[], general=["arc_easy", "hellaswag", "mmlu", "gsm8k"], limit=LIMIT, batch_size=4),
        tmp_path,
        chat=False,
    )
    assert len(suite.members["mmlu"]) == MMLU_SUBJECTS
    ours = evaluate.evaluate_model(model, tokenizer, suite)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=evaluate.max_length(model))
    theirs = simple_evaluate(
        model=lm,
        tasks=["arc_easy", "hellaswag", "mmlu", "gsm8k"],
        limit=LIMIT,
        task_manager=registry.task_manager((str(registry.evals_dir()),)),
        bootstrap_iters=0,  # and lm-eval's default seeds, as `lm_eval run` uses them
    )
    compared = 0
    for task, result in ours["results"].items():
        for metric, entry in result["metrics"].items():
            key = metric if "," in metric else f"{metric},none"
            assert entry["value"] == pytest.approx(theirs["results"][task][key], abs=1e-9), (task, metric)
            compared += 1
    assert compared == 7  # acc, acc_norm x 2; mmlu acc; gsm8k exact_match x 2 filters
    assert ours["results"]["mmlu"]["n"] == MMLU_SUBJECTS * 2 and ours["results"]["arc_easy"]["n"] == LIMIT
    strict = ours["results"]["gsm8k"]["metrics"]["exact_match,strict-match"]["value"]
    assert 0 < strict < 1  # the fixture makes this a real comparison

    # per item: one row per gsm8k question carrying both filters' scores and answers, as lm-eval logged them
    rows = {r["item_id"]: r for r in ours["samples"]["gsm8k"]}
    for sample in theirs["samples"]["gsm8k"]:
        row = rows[sample["doc_id"]]
        assert row[f"exact_match,{sample['filter']}"] == sample["exact_match"]
        assert row["filtered_resps"][sample["filter"]] == sample["filtered_resps"]
        assert row["resps"] == sample["resps"]
    ids = [r["item_id"] for r in ours["samples"]["mmlu"]]
    assert len(ids) == len(set(ids)) == MMLU_SUBJECTS * 2 and "mmlu_anatomy/0" in ids
    assert [r["item_id"] for r in ours["samples"]["arc_easy"]] == [f"Mercury_{i}" for i in range(LIMIT)]


def test_standard_tasks_through_audit_stats_report_and_gate(fixtures, tmp_path, capsys):
    import torch

    for i, scale in enumerate((1.5, 3.0), start=1):
        model, _tokenizer = models.load(models.resolve("tiny-random"))
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)
        model.save_pretrained(tmp_path / "out" / f"checkpoint-{i * 10}")
    runs = tmp_path / "runs"
    (tmp_path / "mmlu3.yaml").write_text(  # a few MMLU subjects as a group of one's own, aggregated as mmlu is
        "group: mmlu3\ntask: [mmlu_anatomy, mmlu_astronomy, mmlu_virology]\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata: {version: 1}\n"
    )
    assert (
        cli.main(
            [
                "audit",
                "--base",
                "tiny-random",
                "--checkpoints",
                str(tmp_path / "out"),
                "--general",
                "arc_easy",
                "mmlu3",
                "gsm8k",
                "--include",
                str(tmp_path),
                "--limit",
                "2",
                "--runs-dir",
                str(runs),
            ]
        )
        == 0
    ), capsys.readouterr().err
    root = runs / "audit"
    table = pd.read_csv(root / "curves.csv")
    assert set(table["step"]) == {0, 10, 20}
    assert set(table[table.task == "gsm8k"]["metric"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    manifest = json.loads((root / "manifest.json").read_text())
    assert {row["task"]: row["metric"] for row in manifest["final_vs_base"]} == {
        "arc_easy": "acc",
        "mmlu3": "acc",
        "gsm8k": "exact_match,strict-match",  # lm-eval's first filter, as it lists them
    }
    assert cli.main(["report", str(root), "-o", str(tmp_path / "report")]) == 0
    assert "mmlu3" in (tmp_path / "report" / "report.md").read_text()
    items = [json.loads(line) for line in (root / "evals" / "step-000010" / "samples_mmlu3.jsonl").open()]
    assert len(items) == 6 and items[0]["item_id"] == "mmlu_anatomy/0"
    group = json.loads((root / "evals" / "step-000010" / "results.json").read_text())["tasks"]["mmlu3"]
    assert "mmlu_anatomy" in group["subtasks"] and len(group["subtasks"]) >= 2  # the bootstrap's strata
    assert group["weight_by_size"] == {"acc": True}  # one pool of items for the score test
    policy = tmp_path / "policy.yaml"
    policy.write_text("general:\n  mmlu3: {max_drop: 1.0}\n  default: {max_drop: 1.0}\n")
    assert cli.main(["gate", str(root), "--policy", str(policy)]) == 0


def test_a_group_and_its_subtask_together_are_refused(fixtures, tmp_path):
    with pytest.raises(
        evaluate.EvalError, match="'mmlu_anatomy' is listed twice \\(in 'mmlu' and in 'mmlu_anatomy'\\)"
    ):
        evaluate.prepare_suite(EvalConfig(new=[], general=["mmlu", "mmlu_anatomy"], limit=2), tmp_path, chat=False)


def test_a_tag_gives_one_eval_per_task(fixtures, tmp_path):
    suite = evaluate.prepare_suite(EvalConfig(new=[], general=["ai2_arc"], limit=2), tmp_path, chat=False)
    assert suite.roles == {"arc_challenge": "general", "arc_easy": "general"}
    assert suite.sources == {"arc_challenge": "ai2_arc", "arc_easy": "ai2_arc"}


def test_offline_and_not_cached_is_one_line_per_task_before_anything_is_written(tmp_path, tiny_recipe_data):
    """Real datasets, offline, an empty Hugging Face cache: validation passes (the names exist),
    then the run stops before training, one line per task, naming how to get the data."""
    import yaml

    data = {
        **tiny_recipe_data,
        "evals": {"new": ["numerals"], "general": ["arc_easy", "prose_ppl", "hellaswag"]},
        "runs_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "forgetscope", "run", str(tmp_path / "r.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("forgetscope: error:")]
    assert len(lines) == 2 and "Traceback" not in proc.stderr
    assert (
        "'arc_easy': its data (Hugging Face dataset 'allenai/ai2_arc') is not in the Hugging Face datasets cache"
        in lines[0]
    )
    assert "'hellaswag'" in lines[1] and "HF_DATASETS_OFFLINE is set" in lines[1]
    assert "TaskManager().load('hellaswag')" in lines[1] and "HF_DATASETS_CACHE" in lines[1]
    assert not (tmp_path / "runs").exists()
