"""Bases without a chat template: training joins prompt and completion with a space where neither
has one; new-task evals join lm-eval's context and target the same way, so a task YAML written
like ``doc_to_text: "{{prompt}}"`` / ``doc_to_target: "{{completion}}"`` scores what training taught."""

import json

import pandas as pd
import pytest
import yaml

from forgetscope import data, evaluate, models, registry
from forgetscope.load import load_recipe
from forgetscope.recipe import EvalConfig, TaskConfig
from forgetscope.runner import run

CODES = [
    ("apple", "AP7"),
    ("pear", "PR2"),
    ("plum", "PL9"),
    ("fig", "FG4"),
    ("kiwi", "KW1"),
    ("lime", "LM5"),
    ("date", "DT3"),
    ("yuzu", "YZ8"),
]


def test_the_seam_between_prompt_and_completion():
    assert data.split_pair("Code for fig:", "FG4", chat=False) == ("Code for fig:", " FG4")
    assert data.split_pair("Code for fig:", " FG4", chat=False) == ("Code for fig:", " FG4")  # completions with a space
    assert data.split_pair("Code for fig: ", "FG4", chat=False) == ("Code for fig:", " FG4")  # as lm-eval moves it
    assert data.split_pair("Q:\n", "A", chat=False) == ("Q:", "\nA")
    assert data.split_pair("<|user|>Q<|assistant|>\n", "A", chat=True) == ("<|user|>Q<|assistant|>", "\nA")
    assert data.split_pair("<|user|>Q<|assistant|>", " A", chat=True) == ("<|user|>Q<|assistant|>", " A")
    tokenizer = models.byte_tokenizer()
    [spaced] = data.tokenize([{"prompt": "Code for fig:", "completion": " FG4"}], tokenizer, TaskConfig(name=None), 64)
    [plain] = data.tokenize([{"prompt": "Code for fig:", "completion": "FG4"}], tokenizer, TaskConfig(name=None), 64)
    assert spaced == plain and tokenizer.decode(plain["input_ids"]) == "Code for fig: FG4</s>"


def test_a_user_task_on_a_plain_base_scores_what_training_taught(tmp_path):
    (tmp_path / "codes.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Code for {w}:", "completion": c}) + "\n" for w, c in CODES)
    )
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "codes.yaml").write_text(  # written as the embedded numerals eval is: nothing at the seam
        "task: codes\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'codes.jsonl'}}}}}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{completion}}"\nmetric_list:\n  - metric: acc\n'
    )
    (tmp_path / "evals" / "codes_said.yaml").write_text(  # the model writes its answer, compared with the target
        "include: codes.yaml\ntask: codes_said\noutput_type: generate_until\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 8, do_sample: false}\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    codes = [c for _, c in CODES]
    (tmp_path / "evals" / "codes_chosen.yaml").write_text(  # the target an index into choices led by a space
        f"include: codes_said.yaml\ntask: codes_chosen\ndoc_to_choice: {[' ' + c for c in codes]}\n"
        f'doc_to_target: "{{{{{codes}.index(completion)}}}}"\n'
    )
    recipe = {
        "name": "plain",
        "base": "scratch:layers=1,hidden=64,heads=2,seed=0",
        "method": "full",
        "task": {"name": None, "path": "codes.jsonl"},
        "train": {"lr": 1e-2, "steps": 60, "batch_size": 8, "seq_len": 32, "warmup_steps": 0, "precision": "fp32"},
        "snapshots": {"schedule": "at", "at": [60]},
        "evals": {"new": ["codes", "codes_said", "codes_chosen"], "general": [], "include": ["evals"]},
        "runs_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    root = run(load_recipe(tmp_path / "r.yaml"))
    curves = pd.read_csv(root / "curves.csv").set_index(["task", "step"])["value"]
    assert curves["codes", 0] == 0.0 and curves["codes", 60] == 1.0  # every code learned, and the eval sees it
    # generated: " FG4" after "Code for fig:", the space training put there dropped before comparing with "FG4"
    assert curves["codes_said", 0] == 0.0 and curves["codes_said", 60] == 1.0
    said = [json.loads(line) for line in (root / "evals" / "step-000060" / "samples_codes_said.jsonl").open()]
    assert {row["filtered_resps"][0] for row in said} == {c for _, c in CODES}
    assert {str(row["resps"]).count(" " + c) for row, c in zip(said, codes)} == {1}  # what the model said, kept
    assert curves["codes_chosen", 60] == 1.0  # the space dropped by the chosen answer's text, not its index

    # The same task in its own format (as the lm_eval CLI renders it) reads 0: the greedy
    # continuation of "Code for fig:" is the space training put there, not "F".
    model, tokenizer = models.load(str(root / "snapshots" / "step-000060"))
    own = evaluate.prepare_suite(
        EvalConfig(new=[], general=["codes", "codes_said"], include=["evals"], limit=None), tmp_path, chat=False
    )
    results = evaluate.evaluate_model(model, tokenizer, own)["results"]
    assert results["codes"]["metrics"]["acc"]["value"] == 0.0
    assert results["codes_said"]["metrics"]["exact_match"]["value"] == 0.0  # " FG4" is not "FG4"


def test_the_embedded_numerals_eval_joins_as_training_does_on_a_plain_base(tmp_path):
    """The requests scored for numerals on a plain base are the training texts, split where
    training splits them (the answer's tokens are the ones trained on)."""
    from lm_eval.api.instance import Instance

    suite = evaluate.prepare_suite(EvalConfig(new=["numerals"], general=[], limit=3), tmp_path, chat=False)
    task = registry.manager_for(["numerals"], suite.paths).load(["numerals"])["tasks"]["numerals"]
    evaluate._join_like_training(task)
    doc = next(iter(task.eval_docs))
    request = task.construct_requests(doc, task.doc_to_text(doc), metadata=("numerals", 0, 1))
    assert isinstance(request, Instance)
    assert request.arguments == data.split_pair(doc["prompt"], doc["completion"], chat=False)


def test_on_a_chat_base_the_tokens_trained_are_the_tokens_lm_eval_scores():
    """lm-eval moves a context's trailing whitespace into the continuation, the newline after a
    ChatML `assistant` too: a model never trained on that newline (it was masked as prompt) can
    lose it and read 0 on a task it answers perfectly. Training takes the same split."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = models.load(models.resolve("tiny-random"))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    for completion in ("billing", " billing"):
        [ex] = data.tokenize(
            [{"prompt": "Ticket: refund?", "completion": completion}], tokenizer, TaskConfig(name=None), 256
        )
        context = data.render_prompt(
            "Ticket: refund?", tokenizer, chat=True
        )  # as lm-eval renders it, ending "assistant\n"
        _, scored = lm._encode_pair(context, completion)
        trained = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
        assert trained == [*scored, tokenizer.eos_token_id] and tokenizer.decode(scored) == "\n" + completion


@pytest.mark.parametrize("delimiter", [None, ""])
def test_a_multiple_choice_eval_joins_each_choice_as_training_does(tmp_path, delimiter):
    """lm-eval puts `target_delimiter` (a space) before each choice: choices led by a space (its
    convention for completions) scored two spaces, text training never showed, and a task learned
    to 1.0 read 0.01. Each choice is now joined as training joins a completion, with or without
    its own space, whatever the delimiter."""
    rows = [
        {"prompt": "rev 056 =", "choices": [" 650", "560"], "label": 0},
        {"prompt": "rev 306 =", "choices": ["603", " 063"], "label": 0},
    ]
    (tmp_path / "evals").mkdir()
    (tmp_path / "rev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_yaml = {
        "task": "rev_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "rev.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        **({} if delimiter is None else {"target_delimiter": delimiter}),
    }
    (tmp_path / "evals" / "rev_mc.yaml").write_text(yaml.safe_dump(task_yaml))
    config = EvalConfig(new=["rev_mc"], general=[], include=[str(tmp_path / "evals")], limit=None)
    suite = evaluate.prepare_suite(config, tmp_path, chat=False)
    task = registry.manager_for(["rev_mc"], suite.paths).load(["rev_mc"])["tasks"]["rev_mc"]
    evaluate._join_like_training(task)
    for doc, row in zip(task.eval_docs, rows):
        requests = task.construct_requests(doc, task.doc_to_text(doc), metadata=("rev_mc", 0, 1))
        assert [r.arguments for r in requests] == [
            data.split_pair(row["prompt"], choice, chat=False) for choice in row["choices"]
        ]
