"""The evaluation harness: result cache, faithfulness to the lm_eval CLI, audit of outside checkpoints."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT

from forgetscope import cli, evaluate, models, registry, scoring
from forgetscope.load import RecipeError, recipe_from_dict
from forgetscope.recipe import EvalConfig

TASKS = ["numerals", "world_capitals", "mmlu_shipped", "prose_ppl"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.load(models.resolve("tiny-random"))
    return model.eval(), tokenizer


def _suite(config: EvalConfig):
    return evaluate.prepare_suite(config, ROOT, chat=False)


def test_cache_hits_only_for_same_weights_task_and_limit(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path))  # its own result cache, whatever ran before
    model, tokenizer = tiny
    calls = []
    original = evaluate._lm_eval

    def counting(lm, specs, *args):
        calls.append([t if isinstance(t, str) else t["task"] for t in specs])
        return original(lm, specs, *args)

    monkeypatch.setattr(evaluate, "_lm_eval", counting)
    suite = _suite(EvalConfig(new=["numerals"], general=["world_capitals"], limit=3))
    first = evaluate.evaluate_model(model, tokenizer, suite)
    assert calls == [["numerals", "world_capitals"]] and first["cached"] == []

    again = evaluate.evaluate_model(model, tokenizer, suite)  # same weights, tasks, limit: hit
    assert len(calls) == 1 and sorted(again["cached"]) == ["numerals", "world_capitals"]
    assert again["results"] == first["results"]

    other_limit = _suite(EvalConfig(new=["numerals"], general=["world_capitals"], limit=4))
    evaluate.evaluate_model(model, tokenizer, other_limit)  # the limit changed: miss
    assert calls[-1] == ["numerals", "world_capitals"]

    other_task = _suite(EvalConfig(new=["numerals"], general=["mmlu_shipped"], limit=3))
    result = evaluate.evaluate_model(model, tokenizer, other_task)  # a new task: only it is scored
    assert calls[-1] == ["mmlu_shipped"] and result["cached"] == ["numerals"]

    changed = models.load(models.resolve("tiny-random"))[0].eval()
    with torch.no_grad():
        changed.model.norm.weight.mul_(1.5)
    evaluate.evaluate_model(changed, tokenizer, suite)  # the weights changed: miss
    assert calls[-1] == ["numerals", "world_capitals"]

    monkeypatch.setattr(scoring, "SCORER_VERSION", scoring.SCORER_VERSION + 1)
    evaluate.evaluate_model(model, tokenizer, suite)  # a scorer fix: old scores are not returned
    assert len(calls) == 5 and calls[-1] == ["numerals", "world_capitals"]

    templated = models.load(models.resolve("tiny-random"))[1]
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    evaluate.evaluate_model(model, templated, suite)  # the same weights, another tokenizer: miss
    assert len(calls) == 6


def test_an_adapter_handed_over_is_not_the_base_in_the_cache(monkeypatch, tmp_path):
    # a LoRA adapter loaded to train on further (its lora_B not zero) changes the scores: its step 0 must be
    # scored as it is, and not filed under (or served from) the plain base's entry; a fresh adapter may be
    from peft import LoraConfig, get_peft_model

    from forgetscope.session import RunSession

    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path))
    suite = _suite(EvalConfig(new=[], general=["prose_ppl"], limit=3))
    base, tokenizer = models.load(models.resolve("tiny-random"))
    fresh, _ = models.load(models.resolve("tiny-random"))
    fresh = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    trained, _ = models.load(models.resolve("tiny-random"))
    trained = get_peft_model(trained, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    session = RunSession(tmp_path / "run", {}, "another run")
    with session.locked():
        session.start(suite, tokenizer)
        first = session.score(trained, 0)  # step 0 of a callback's run that continues the adapter
    plain = evaluate.evaluate_model(base.eval(), tokenizer, suite)
    assert first["cached"] == [] and plain["cached"] == []  # not served the adapter's scores
    value = lambda out: out["results"]["prose_ppl"]["metrics"]["bits_per_byte"]["value"]  # noqa: E731
    assert value(first) != value(plain)
    assert evaluate.evaluate_model(fresh, tokenizer, suite)["cached"] == ["prose_ppl"]  # B = 0: the base


def test_cache_key_holds_the_device_kind(monkeypatch, tmp_path):
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path))
    suite = _suite(EvalConfig(new=["numerals"], general=[], limit=3))
    paths = {device: evaluate._cache_path(suite, "numerals", "weights", device) for device in ("cpu", "cuda")}
    assert paths["cpu"] != paths["cuda"]  # CUDA and CPU kernels round differently
    assert paths["cpu"] == evaluate._cache_path(suite, "numerals", "weights", "cpu")


def test_task_hash_changes_with_the_task_config(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        (ROOT / "evals" / "world_capitals.yaml")
        .read_text()
        .replace("task: world_capitals", "task: mine")
        .replace("!function builders.", "!function forgetscope.evals.builders.")
    )
    a = evaluate.prepare_suite(EvalConfig(new=[], general=["mine"], include=[str(tmp_path)]), tmp_path, False)
    (tmp_path / "mine.yaml").write_text((tmp_path / "mine.yaml").read_text().replace("Answer:", "A:"))
    registry.task_manager.cache_clear()
    b = evaluate.prepare_suite(EvalConfig(new=[], general=["mine"], include=[str(tmp_path)]), tmp_path, False)
    assert a.hashes["mine"] != b.hashes["mine"]


def test_scores_equal_the_lm_eval_cli(tiny, tmp_path):
    """forgetscope's in-memory scores are what `lm-eval run` gives for the same model, tasks and limit
    (each in its own format: general probes; new-task evals on a plain base join context and target
    as training did, see test_new_task_evals_on_a_plain_base_score_what_training_joined)."""
    model, tokenizer = tiny
    suite = _suite(EvalConfig(new=[], general=TASKS, limit=6, batch_size=4))
    ours = evaluate.evaluate_model(model, tokenizer, suite)["results"]
    out = tmp_path / "lm_eval_out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={models.resolve('tiny-random')},dtype=float32",
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(ROOT / "evals"),
        "--limit",
        "6",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [results_file] = out.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    compared = 0
    for task in TASKS:
        for metric, entry in ours[task]["metrics"].items():
            assert entry["value"] == pytest.approx(theirs[task][f"{metric},none"], rel=1e-6, abs=1e-9), (task, metric)
            compared += 1
    assert compared >= 9


def _make_checkpoints(root, kind: str):
    """Three checkpoints of tiny-random in a Trainer-style folder (checkpoint-N + trainer_state.json)."""
    from peft import LoraConfig, get_peft_model

    for i, step in enumerate((10, 20, 30)):
        model, tokenizer = models.load(models.resolve("tiny-random"))
        torch.manual_seed(i)
        if kind == "lora":
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if kind == "full" or "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05 * (i + 1))
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder)
        if kind == "full":
            tokenizer.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_audit_of_three_checkpoints_from_the_cli(tmp_path, kind, capsys):
    _make_checkpoints(tmp_path / "out", kind)
    code = cli.main(
        [
            "audit",
            "--base",
            "tiny-random",
            "--checkpoints",
            str(tmp_path / "out"),
            "--new",
            "numerals",
            "--general",
            "prose_ppl",
            "world_capitals",
            "--limit",
            "4",
            "--name",
            f"a-{kind}",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    root = tmp_path / "runs" / f"a-{kind}"
    table = pd.read_csv(root / "curves.csv")
    assert set(table["step"]) == {0, 10, 20, 30} and set(table["method"]) == {kind}
    ppl = table[(table.task == "prose_ppl") & (table.metric == "bits_per_byte")].sort_values("step")["value"]
    assert ppl.nunique() == 4  # every checkpoint was really scored, not the base again
    assert (root / "curves.png").is_file()
    meta = json.loads((root / "snapshots" / "step-000020" / "meta.json").read_text())
    assert meta["source"].endswith("checkpoint-20")


def test_audit_scores_match_direct_evaluation_of_the_adapter(tmp_path):
    """Swapping adapters into one base gives the same scores as loading each adapter fresh."""
    from peft import PeftModel

    _make_checkpoints(tmp_path / "out", "lora")
    cli.main(
        [
            "audit",
            "--base",
            "tiny-random",
            "--checkpoints",
            str(tmp_path / "out"),
            "--new",
            "--general",
            "prose_ppl",
            "--limit",
            "3",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    table = pd.read_csv(tmp_path / "runs" / "audit" / "curves.csv")
    base, tokenizer = models.load(models.resolve("tiny-random"))
    fresh = PeftModel.from_pretrained(base, str(tmp_path / "out" / "checkpoint-20")).eval()
    suite = _suite(EvalConfig(new=[], general=["prose_ppl"], limit=3))
    direct = evaluate.evaluate_model(fresh, tokenizer, suite)["results"]["prose_ppl"]["metrics"]["bits_per_byte"][
        "value"
    ]
    audited = table[(table.step == 20) & (table.metric == "bits_per_byte")]["value"].item()
    assert audited == pytest.approx(direct, rel=1e-9)


def test_audit_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["audit", "--base", "tiny-random", "--checkpoints", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert cli.main(["audit", "--base", "tiny-random", "--checkpoints", str(tmp_path), "--general", "mmlu_shiped"]) == 2
    assert "did you mean 'mmlu_shipped'?" in capsys.readouterr().err
    runs = tmp_path / "runs"
    args = ["audit", "--base", "tiny-random", "--checkpoints", str(tmp_path), "--runs-dir", str(runs / "inner")]
    assert cli.main([*args, "--name", "../outside"]) == 2  # a name must not leave --runs-dir
    assert "--name: '../outside' must be ASCII letters" in capsys.readouterr().err and not runs.exists()


def test_unknown_eval_fails_before_training(tmp_path, tiny_recipe_data, capsys):
    import yaml

    data = {
        **tiny_recipe_data,
        "evals": {"new": ["numerals"], "general": ["hellaswagg"]},
        "runs_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "unknown eval task 'hellaswagg'; did you mean 'hellaswag'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_group_of_tasks_is_scored_cached_and_kept_per_item(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "knowledge.yaml").write_text(
        "group: knowledge\ntask: [world_capitals, mmlu_shipped]\n"
        "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: false\nmetadata: {version: 1}\n"
    )
    config = EvalConfig(new=[], general=["knowledge"], limit=3, include=[str(tmp_path)])
    suite = evaluate.prepare_suite(config, tmp_path, chat=False)
    assert suite.members["knowledge"] == ["mmlu_shipped", "world_capitals"]
    first = evaluate.evaluate_model(model, tokenizer, suite)
    assert "acc" in first["results"]["knowledge"]["metrics"]
    assert first["results"]["knowledge"]["weight_by_size"] == {"acc": False}  # how the group's tests weigh them
    ids = [s["item_id"] for s in first["samples"]["knowledge"]]
    assert len(ids) == 6 and ids[0].startswith("mmlu_shipped/") and len(set(ids)) == 6
    assert evaluate.evaluate_model(model, tokenizer, suite)["cached"] == ["knowledge"]


def test_groups_over_the_same_tasks_weighed_differently_are_scored_apart(tiny, tmp_path):
    """Two groups of the same tasks, one weighing them equally and one by size, give different
    scores: neither may be the other's cache hit (the cache once returned the first for both)."""
    model, tokenizer = tiny
    for name, by_size in (("knowledge_eq", "false"), ("knowledge_sz", "true")):
        (tmp_path / f"{name}.yaml").write_text(
            f"group: {name}\ntask: [world_capitals, mmlu_shipped]\n"
            f"aggregate_metric_list:\n  - metric: acc\n    weight_by_size: {by_size}\nmetadata: {{version: 1}}\n"
        )
    suites = {
        name: evaluate.prepare_suite(
            EvalConfig(new=[], general=[name], limit=3, include=[str(tmp_path)]), tmp_path, chat=False
        )
        for name in ("knowledge_eq", "knowledge_sz")
    }
    assert suites["knowledge_eq"].hashes["knowledge_eq"] != suites["knowledge_sz"].hashes["knowledge_sz"]
    assert evaluate.evaluate_model(model, tokenizer, suites["knowledge_eq"])["cached"] == []
    assert evaluate.evaluate_model(model, tokenizer, suites["knowledge_sz"])["cached"] == []


def test_embedded_tasks_skip_lm_evals_full_index_and_standard_names_use_it():
    paths = [str(registry.evals_dir())]
    assert registry.manager_for(["numerals", "prose_ppl"], paths) is registry.task_manager(tuple(paths), defaults=False)
    full = registry.manager_for(["numerals", "arc_easy"], paths)
    assert full is registry.task_manager(tuple(paths)) and "arc_easy" in full.all_subtasks
    assert registry.check_eval_names(["numerals", "arc_easy"], paths) == []


def test_a_task_yaml_whose_data_file_is_missing_is_one_line(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: "
        + str(tmp_path / "gone.jsonl")
        + "}\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{completion}}'\nmetric_list:\n  - metric: acc\n"
    )
    config = EvalConfig(new=[], general=["mine"], include=[str(tmp_path)])
    with pytest.raises(evaluate.EvalError, match=r"'mine': its data is missing .*gone\.jsonl"):
        evaluate.prepare_suite(config, tmp_path, chat=False)


def test_a_task_yaml_lm_eval_cannot_read_is_named_with_what_is_wrong(tmp_path, tiny_recipe_data, capsys):
    """lm-eval skips such a file silently; `tasks --include` and a run that names its task say why."""
    import yaml

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "broken.yaml").write_text("# my eval\ntask: mine\ndataset_kwargs: {data_files: x.jsonl\ndoc_to_text: q\n")
    (mine / "utils_missing.yaml").write_text("task: mine_fn\ndoc_to_text: !function nowhere.fn\n")
    assert cli.main(["tasks", "--include", str(mine)]) == 0
    out = capsys.readouterr().out
    assert f"mine             NOT USABLE: {mine / 'broken.yaml'}, line 4: not valid YAML" in out
    assert f"mine_fn          NOT USABLE: {mine / 'utils_missing.yaml'}, which lm-eval cannot read" in out

    data = {**tiny_recipe_data, "evals": {"new": ["mine"], "include": [str(mine)]}, "runs_dir": str(tmp_path / "runs")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"eval task 'mine' is declared by {mine / 'broken.yaml'}, line 4: not valid YAML" in err[0]
    assert err[0].endswith("; fix that file") and not (tmp_path / "runs").exists()


def test_a_task_yaml_named_like_a_shipped_eval_is_refused(tmp_path, tiny_recipe_data, capsys):
    """Under one name its scores would mix with the shipped eval's in reports."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "caps.yaml").write_text("task: world_capitals\ndataset_path: json\noutput_type: loglikelihood\n")
    assert cli.main(["tasks", "--include", str(mine)]) == 0
    assert "world_capitals   NOT USABLE: forgetscope ships an eval of that name" in capsys.readouterr().out
    with pytest.raises(RecipeError, match=r"declares 'world_capitals', an eval forgetscope ships; rename your task"):
        recipe_from_dict({**tiny_recipe_data, "evals": {"general": ["world_capitals"], "include": [str(mine)]}})


COLOURS = ["red", "green", "blue", "gold", "grey", "pink", "teal", "plum"]


def _few_shot_folder(root, sampler: str | None = None, output_type: str = "loglikelihood"):
    """A task YAML ``colours`` (2-shot from a dev split of 8 items; lm-eval's random sampler
    unless ``sampler`` names another) over 4 test items, in ``root``."""
    root.mkdir(exist_ok=True)
    for split, n in (("test", 4), ("dev", 8)):
        rows = [{"question": f"Item {split}{i} is", "choices": COLOURS[:4], "label": i % 4} for i in range(n)]
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps({**r, "answer": COLOURS[r["label"]]}) + "\n" for r in rows)
        )
    (root / "colours.yaml").write_text(
        "task: colours\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {root / 'test.jsonl'}, dev: {root / 'dev.jsonl'}}}}}\n"
        "test_split: test\nfewshot_split: dev\nnum_fewshot: 2\n"
        + (f"fewshot_config: {{sampler: {sampler}}}\n" if sampler else "")
        + f"output_type: {output_type}\ndoc_to_text: '{{{{question}}}}'\n"
        + (
            "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
            if output_type == "multiple_choice"
            else "doc_to_target: ' {{answer}}'\n"
        )
    )


def _arguments(samples: list[dict]) -> dict:
    """doc_id -> the requests lm-eval built for it (JSON-normalised: tuples as lists)."""
    return {s["doc_id"]: json.loads(json.dumps(s["arguments"], default=str)) for s in samples}


def test_few_shot_examples_are_the_ones_simple_evaluate_draws_with_its_default_seeds(tiny, tmp_path):
    """lm-eval's default seeds (0 for python's random, 1234 for numpy, torch and the few-shot
    sampler) pick the random sampler's examples; forgetscope uses the same ones."""
    import inspect

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    defaults = inspect.signature(simple_evaluate).parameters
    assert [
        defaults[f"{name}_seed"].default for name in ("random", "numpy_random", "torch_random", "fewshot_random")
    ] == [evaluate.SEEDS[name] for name in ("random", "numpy", "torch", "fewshot")]
    model, tokenizer = tiny
    _few_shot_folder(tmp_path / "mine")
    suite = evaluate.prepare_suite(EvalConfig(new=[], general=["colours"], include=["mine"]), tmp_path, chat=False)
    ours = evaluate.evaluate_model(model, tokenizer, suite)["samples"]["colours"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=evaluate.max_length(model))
    theirs = simple_evaluate(
        model=lm, tasks=["colours"], task_manager=registry.task_manager(tuple(suite.paths)), bootstrap_iters=0
    )["samples"]["colours"]
    assert _arguments(ours) == _arguments(theirs)


def _chat_tokenizer(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def test_few_shot_on_a_chat_base_renders_as_lm_eval_with_the_chat_template(tmp_path):
    """`lm_eval run --apply_chat_template` (and simple_evaluate) give the few-shot examples as
    turns of the conversation (fewshot_as_multiturn), and so does forgetscope."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = models.load(models.resolve("tiny-random"))
    model.eval()
    tokenizer = _chat_tokenizer(tokenizer)
    _few_shot_folder(tmp_path / "mine", sampler="first_n", output_type="multiple_choice")
    suite = evaluate.prepare_suite(EvalConfig(new=["colours"], general=[], include=["mine"]), tmp_path, chat=True)
    ours = evaluate.evaluate_model(model, tokenizer, suite)["samples"]["colours"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=evaluate.max_length(model))
    theirs = simple_evaluate(
        model=lm,
        tasks=["colours"],
        task_manager=registry.task_manager(tuple(suite.paths)),
        bootstrap_iters=0,
        apply_chat_template=True,
    )["samples"]["colours"]
    assert _arguments(ours) == _arguments(theirs)
    assert _arguments(ours)[0][0][0].count("<|im_start|>user") == 3  # two examples and the question, a turn each


def test_task_hash_changes_with_the_few_shot_docs_and_the_functions_module(tmp_path):
    """The cache must miss when the few-shot split's file changes, or a helper in the module a
    `!function` loads (not only the function named)."""
    _few_shot_folder(tmp_path / "mine")
    yaml_file = tmp_path / "mine" / "colours.yaml"
    yaml_file.write_text(yaml_file.read_text() + "process_results: !function utils.process_results\n")
    (tmp_path / "mine" / "utils.py").write_text(
        "def _scale(x):\n    return 100.0 * x\n\n\n"
        "def process_results(doc, results):\n    return {'acc': _scale(results[0][0])}\n"
    )
    config = EvalConfig(new=[], general=["colours"], include=["mine"])

    def task_hash() -> str:
        registry.task_manager.cache_clear()
        return evaluate.prepare_suite(config, tmp_path, chat=False).hashes["colours"]

    first = task_hash()
    assert task_hash() == first  # stable: nothing in it varies from one load to the next
    dev = tmp_path / "mine" / "dev.jsonl"
    dev.write_text(dev.read_text().replace("Item dev3", "Item dev3 (edited)"))
    second = task_hash()
    assert second != first
    utils = tmp_path / "mine" / "utils.py"
    utils.write_text(utils.read_text().replace("100.0 * x", "10.0 * x"))
    assert task_hash() != second


BROKEN = {  # a line of a task YAML -> what the one-line error says about it
    "process_docs: !function nosuchmod.fn": "Cannot import module 'nosuchmod'",
    "process_docs: !function utils.nope": "has no function 'nope'",
    "test_split: validation": "no split 'validation'",
    "output_type: multiple_choise": "invalid output_type 'multiple_choise'",
    "doc_to_text: '{{questionz}}'": "'questionz' is undefined",
    "process_docs: !function utils.boom": "RuntimeError: boom",  # a hook that raises
    "metric_list: [{metric: accuracy}]": "metric 'accuracy' is neither one lm-eval registers (acc, ",
    "metric_list: [{metric: accuracy, aggregation: mean}]": "metric 'accuracy' is neither one lm-eval registers",
    "metric_list: [{metric: acc, aggregation: meann}]": "the aggregation of 'acc' is not one lm-eval knows",
    "output_type: generate_until\ngeneration_kwargs: {until: 5}": "generation_kwargs.until is 5, not text",
}


@pytest.mark.parametrize("line", list(BROKEN))
def test_a_broken_task_yaml_is_one_line_naming_the_eval_and_its_file(tmp_path, line):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "test.jsonl").write_text(json.dumps({"question": "Sky?", "choices": ["blue", "red"], "label": 0}) + "\n")
    (mine / "utils.py").write_text(
        "def process_docs(dataset):\n    return dataset\n\n\ndef boom(dataset):\n    raise RuntimeError('boom')\n"
    )
    fields = {
        "task": "mine",
        "dataset_path": "json",
        "dataset_kwargs": f"{{data_files: {{test: {mine / 'test.jsonl'}}}}}",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "'{{question}}'",
        "doc_to_choice": "'{{choices}}'",
        "doc_to_target": "label",
    }
    key, value = line.split(": ", 1)
    fields[key] = value
    (mine / "mine.yaml").write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    with pytest.raises(evaluate.EvalError) as err:
        evaluate.prepare_suite(EvalConfig(new=[], general=["mine"], include=["mine"]), tmp_path, chat=False)
    message = str(err.value)
    assert "\n" not in message and BROKEN[line] in message, message
    assert message.startswith(f"evals: 'mine' ({mine / 'mine.yaml'}): ") and message.endswith("; fix that file")


def test_a_group_naming_an_unknown_task_says_which(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "knowledge.yaml").write_text(
        "group: knowledge\ntask: [world_capitals, world_capital]\n"
        "aggregate_metric_list:\n  - metric: acc\nmetadata: {version: 1}\n"
    )
    with pytest.raises(evaluate.EvalError) as err:
        evaluate.prepare_suite(EvalConfig(new=[], general=["knowledge"], include=["mine"]), tmp_path, chat=False)
    assert str(err.value) == (
        f"evals: 'knowledge' ({mine / 'knowledge.yaml'}): lm-eval cannot build it (its task list names "
        "'world_capital', which lm-eval does not know; did you mean 'world_capitals'?); fix that file"
    )


def test_a_broken_task_yaml_stops_a_run_before_anything_is_written(tmp_path, tiny_recipe_data, capsys):
    import yaml

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {test: "
        + str(mine / "test.jsonl")
        + "}}\ntest_split: test\noutput_type: loglikelihood\nprocess_docs: !function nosuchmod.fn\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    (mine / "test.jsonl").write_text(json.dumps({"q": "Sky?", "a": " blue"}) + "\n")
    data = {**tiny_recipe_data, "evals": {"new": ["mine"], "include": [str(mine)]}, "runs_dir": str(tmp_path / "runs")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("forgetscope: error:")]
    assert len(lines) == 1 and "evals: 'mine' (" in lines[0] and "nosuchmod" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_shipped_eval_lm_eval_cannot_build_is_a_bug_shown_with_its_traceback(monkeypatch):
    """The one-line "fix that file" is for your task YAMLs; forgetscope's own evals failing is ours to fix."""
    from pathlib import Path

    real = evaluate.manager_for  # cached: its managers are shared, so wrapped here, not changed

    class Broken:
        def __init__(self, manager):
            self.task_index = manager.task_index

        def load(self, name):
            raise KeyError("missing")  # as from inside lm-eval

    monkeypatch.setattr(evaluate, "manager_for", lambda *args, **kwargs: Broken(real(*args, **kwargs)))
    with pytest.raises(KeyError):
        evaluate.prepare_suite(EvalConfig(new=[], general=["prose_ppl"]), Path.cwd(), False)
