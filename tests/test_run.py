"""End-to-end runs on the tiny random model: snapshots, evaluations, curves, reloading, what trains."""

import itertools
import json
import shutil

import pandas as pd
import pytest
import torch
import yaml

from forgetscope import models, snapshots, train
from forgetscope.load import load_recipe, recipe_from_dict
from forgetscope.recipe import SnapshotConfig
from forgetscope.runner import run
from forgetscope.session import RunError


def _run(tmp_path, data, **changes):
    data = {**data, **changes, "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path), run(load_recipe(path))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_three_step_run_writes_layout_and_curves(tmp_path, tiny_recipe_data, method):
    changes = {"method": method, "name": f"t-{method}"}
    if method == "full":
        changes["lora"] = None
    _recipe, root = _run(tmp_path, tiny_recipe_data, **changes)
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == ["step-000000", "step-000001", "step-000003"]
    assert sorted(p.name for p in (root / "evals").iterdir()) == ["step-000000", "step-000001", "step-000003"]
    assert list((root / "snapshots" / "step-000000").iterdir()) == [root / "snapshots" / "step-000000" / "meta.json"]
    weights = {p.name for p in (root / "snapshots" / "step-000003").iterdir()}
    if method == "lora":
        assert {"adapter_model.safetensors", "adapter_config.json"} <= weights
    else:
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= weights

    table = pd.read_csv(root / "curves.csv")
    assert list(table.columns) == [
        "run",
        "recipe",
        "method",
        "step",
        "tokens",
        "task",
        "role",
        "metric",
        "value",
        "stderr",
        "n",
        "higher_is_better",
    ]
    assert set(table["step"]) == {0, 1, 3}
    assert set(table["task"]) == {"numerals", "prose_ppl"}
    acc = table[(table.task == "numerals") & (table.metric == "acc")]
    assert len(acc) == 3 and acc["role"].eq("new").all() and acc["n"].eq(4).all()
    ppl = table[(table.task == "prose_ppl") & (table.metric == "word_perplexity")].sort_values("step")
    assert ppl["role"].eq("general").all() and not ppl["higher_is_better"].any()
    assert ppl["value"].nunique() == 3  # the model moved between snapshots
    assert table.groupby("step")["tokens"].first().is_monotonic_increasing
    assert (root / "curves.png").stat().st_size > 10_000
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["snapshot_steps"] == [0, 1, 3]
    assert yaml.safe_load((root / "recipe.yaml").read_text())["train"]["steps"] == 3

    samples = [json.loads(line) for line in (root / "evals" / "step-000003" / "samples_numerals.jsonl").open()]
    assert [s["item_id"] for s in samples] == [s["doc"]["id"] for s in samples]


def test_lora_snapshot_reloads_with_peft_to_same_logits(tmp_path, tiny_recipe_data):
    from peft import PeftModel

    recipe = recipe_from_dict({**tiny_recipe_data, "runs_dir": str(tmp_path)})
    model, tokenizer = models.load(models.resolve("tiny-random"))
    model = train.prepare_model(model, recipe)
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    batch = tokenizer(["Write 1234 in Zorbic numerals."], return_tensors="pt").to(model.device)
    expected = model(**batch).logits
    layout = snapshots.RunLayout(tmp_path / "run")
    folder = snapshots.save_snapshot(layout, 5, model, tokenizer, {"step": 5}, weights=True)

    base, _ = models.load(models.resolve("tiny-random"))
    plain = base.eval()(**batch).logits
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected)
    assert not torch.allclose(plain, expected)  # the adapter matters, so the match is not trivial


@pytest.mark.parametrize("method", ["lora", "full"])
def test_trainable_parameters_change_and_frozen_ones_do_not(tmp_path, tiny_recipe_data, method):
    data = {**tiny_recipe_data, "method": method, "runs_dir": str(tmp_path)}
    if method == "full":
        data["lora"] = None
    recipe = recipe_from_dict(data)
    model, tokenizer = models.load(models.resolve("tiny-random"))
    model = train.prepare_model(model, recipe)
    if method == "lora":  # lora_B starts at zero, so nudge it or lora_A would get no gradient
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    from forgetscope import data as fdata

    examples = fdata.tokenize(fdata.load_records(recipe.task, tmp_path), tokenizer, recipe.task, 48)
    train.make_trainer(model, tokenizer, examples, recipe, str(tmp_path / "trainer"), []).train()
    after = dict(model.named_parameters())
    if method == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert trainable == set(before)
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        assert changed == (name in trainable), name


def test_schedules():
    assert snapshots.schedule(SnapshotConfig(schedule="every", every=10), 35) == [0, 10, 20, 30, 35]
    assert snapshots.schedule(SnapshotConfig(schedule="at", at=[20, 5, 5]), 60) == [
        0,
        5,
        20,
        60,
    ]  # the model trained, too
    log = snapshots.schedule(SnapshotConfig(schedule="log", count=6), 60)
    assert log[0] == 0 and log[-1] == 60 and len(log) == 6
    gaps = [b - a for a, b in itertools.pairwise(log[1:])]
    assert gaps == sorted(gaps)  # dense early


def test_rerun_of_finished_run_keeps_results_and_other_recipe_is_refused(tmp_path, tiny_recipe_data):
    recipe, root = _run(tmp_path, tiny_recipe_data, name="again")
    before = (root / "curves.csv").read_text()
    assert run(recipe) == root
    assert (root / "curves.csv").read_text() == before
    changed = recipe_from_dict(
        {
            **tiny_recipe_data,
            "name": "again",
            "runs_dir": str(tmp_path / "runs"),
            "train": {**tiny_recipe_data["train"], "lr": 0.5},
        }
    )
    with pytest.raises(RunError, match="different recipe"):
        run(changed)


def test_paired_deltas_agree_with_the_curves(tmp_path, tiny_recipe_data):
    from forgetscope import stats

    _recipe, root = _run(tmp_path, tiny_recipe_data, name="paired")
    table = pd.read_csv(root / "curves.csv")
    layout = snapshots.RunLayout(root)
    for task, metric in [("prose_ppl", "bits_per_byte"), ("prose_ppl", "word_perplexity"), ("numerals", "logprob")]:
        line = table[(table.task == task) & (table.metric == metric)].set_index("step")["value"]
        ci = stats.paired_delta(layout, task, metric, 3)
        assert ci["delta"] == pytest.approx(line[3] - line[0], rel=1e-9)
        assert ci["low"] <= ci["delta"] <= ci["high"] and ci["n"] == 4
    rows = stats.final_vs_base(layout, table)
    assert rows[0]["role"] == "new" and {r["task"] for r in rows} == {"numerals", "prose_ppl"}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["final_vs_base"][0]["task"] == "numerals"


def test_report_to_tensorboard_gets_every_snapshots_scores_and_the_loss(tmp_path, tiny_recipe_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _recipe, root = _run(
        tmp_path, tiny_recipe_data, name="tb", train={**tiny_recipe_data["train"], "report_to": ["tensorboard"]}
    )
    [events] = {p.parent for p in (root / "tensorboard").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("eval/forgetscope/prose_ppl/bits_per_byte")}
    table = pd.read_csv(root / "curves.csv")
    bits = table[(table.task == "prose_ppl") & (table.metric == "bits_per_byte")].set_index("step")["value"]
    assert logged == pytest.approx(bits.to_dict(), rel=1e-6)
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3]  # no step's loss lost to a snapshot
    assert not (root / "trainer").exists()


def test_report_to_names_are_checked(tiny_recipe_data):
    from forgetscope.load import RecipeError

    with pytest.raises(
        RecipeError, match=r"train\.report_to: unknown integration 'tensorbord'; did you mean 'tensorboard'"
    ):
        recipe_from_dict({**tiny_recipe_data, "train": {**tiny_recipe_data["train"], "report_to": ["tensorbord"]}})


@pytest.mark.parametrize("targets", [["nonexistent"], []])
def test_lora_targets_that_name_no_layer_are_refused_before_anything_is_written(tmp_path, tiny_recipe_data, targets):
    data = {**tiny_recipe_data, "lora": {"r": 4, "alpha": 8, "target_modules": targets}, "runs_dir": str(tmp_path)}
    with pytest.raises(train.UserError, match=r"names no layer of the base model; its linear layers are .*q_proj"):
        run(recipe_from_dict(data))
    assert not any(tmp_path.iterdir())


def test_compare_checks_every_recipe_and_run_folder_before_training_any(
    tmp_path, tiny_recipe_data, monkeypatch, capsys
):
    from forgetscope import cli, runner

    ran = []
    monkeypatch.setattr(runner, "run", lambda recipe: ran.append(recipe.name))
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump({**tiny_recipe_data, "name": name, "runs_dir": str(tmp_path / "runs")}))
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "manifest.json").write_text(json.dumps({"recipe_hash": "another", "status": "finished"}))
    assert cli.main(["compare", *map(str, paths), "-o", str(tmp_path / "cmp")]) == 2
    assert f"{tmp_path / 'runs' / 'b'} holds a run of a different recipe" in capsys.readouterr().err and ran == []
    assert cli.main(["compare", *map(str, paths), "--set", "name=x", "-o", str(tmp_path / "cmp")]) == 2
    assert (
        "recipes share a run name (x, x); give each its own `name:` in its file (a --set name=..."
        in capsys.readouterr().err
    )
    assert cli.main(["compare", *map(str, paths), "--target", "90", "-o", str(tmp_path / "cmp")]) == 2
    assert (  # the new task's metric is known from its task config, before any training
        "--target 90: outside the range of acc (0 to 1) of numerals, a new task of a; scores are fractions"
        in capsys.readouterr().err
    )
    assert ran == [] and not (tmp_path / "cmp").exists()
    # -o at the folder of a run this compare makes: its report files went into that run
    assert cli.main(["compare", str(paths[0]), "-o", str(tmp_path / "runs" / "a")]) == 2
    assert "-o " + str(tmp_path / "runs" / "a") + ": is the folder of the run 'a' that this compare writes" in (
        capsys.readouterr().err
    )
    assert ran == [] and not (tmp_path / "runs" / "a").exists()


def test_a_run_on_conversations_from_a_parquet_file(tmp_path, tiny_recipe_data):
    """Chat data as users keep it (the OpenAI / TRL `messages` format, in Parquet) on a base with a chat template."""
    model, tokenizer = models.load(models.resolve("tiny-random"))
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model.save_pretrained(tmp_path / "chat-base")
    tokenizer.save_pretrained(tmp_path / "chat-base")
    talks = [
        {"messages": [{"role": "user", "content": f"Double {n}?"}, {"role": "assistant", "content": str(2 * n)}]}
        for n in range(16)
    ]
    pd.DataFrame(talks).to_parquet(tmp_path / "talks.parquet")
    recipe = {
        **tiny_recipe_data,
        "base": str(tmp_path / "chat-base"),
        "method": "full",
        "task": {"path": "talks.parquet"},
        "evals": {"general": ["prose_ppl"], "limit": 4},
        "runs_dir": str(tmp_path / "runs"),
    }
    del recipe["lora"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    root = run(load_recipe(path))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and (root / "curves.csv").is_file()


def test_the_own_task_example_runs_as_the_readme_shows(tmp_path, monkeypatch):
    """examples/own_task: a user's data file and an lm-eval YAML over their held-out file (read by
    lm-eval's `json` loader, relative to the folder forgetscope runs in: the repository root)."""
    from pathlib import Path

    root_dir = Path(__file__).parent.parent
    example = root_dir / "examples" / "own_task"
    readme = (root_dir / "README.md").read_text()
    for name in ("recipe.yaml", "evals/tickets.yaml"):
        assert (example / name).read_text() in readme, f"README's copy of examples/own_task/{name} is stale"
    monkeypatch.chdir(root_dir)
    overrides = ["base=tiny-random", "train.steps=2", "evals.limit=8", "evals.general=[prose_ppl]"]
    root = run(load_recipe(example / "recipe.yaml", [*overrides, f"runs_dir={tmp_path}"]))
    table = pd.read_csv(root / "curves.csv")
    scored = table[(table["task"] == "tickets") & (table["metric"] == "acc")]
    assert sorted(scored["step"]) == [0, 1, 2] and scored["n"].eq(8).all()


def test_a_run_is_its_data_and_its_recipe_yaml_reads_the_same_files_from_anywhere(tmp_path, capsys):
    """One recipe file beside other data, or data edited after an interrupted run, is another run;
    the run folder's recipe.yaml (and ``show``'s output) names its files absolutely."""
    from forgetscope import cli
    from forgetscope.runner import recipe_hash

    for folder, answer in (("a", " 1"), ("b", " 2")):
        (tmp_path / folder / "evals").mkdir(parents=True)
        (tmp_path / folder / "my.jsonl").write_text(json.dumps({"prompt": "x =", "completion": answer}) + "\n")
        (tmp_path / folder / "r.yaml").write_text(
            "base: tiny-random\ntask: {path: my.jsonl}\nevals: {new: [], general: [prose_ppl], include: [evals]}\n"
        )
    a, b = (load_recipe(tmp_path / folder / "r.yaml") for folder in "ab")
    assert a.to_dict() == b.to_dict() and recipe_hash(a) != recipe_hash(b)
    before = recipe_hash(a)
    (tmp_path / "a" / "my.jsonl").write_text(json.dumps({"prompt": "x =", "completion": " 3"}) + "\n")
    assert recipe_hash(a) != before

    (tmp_path / "elsewhere").mkdir()
    assert cli.main(["show", str(tmp_path / "a" / "r.yaml")]) == 0
    (tmp_path / "elsewhere" / "recipe.yaml").write_text(capsys.readouterr().out)
    moved = load_recipe(tmp_path / "elsewhere" / "recipe.yaml")
    assert moved.task.path == str(tmp_path / "a" / "my.jsonl")
    assert moved.evals.include == [str(tmp_path / "a" / "evals")]
    assert recipe_hash(moved) == recipe_hash(a)  # the same run, wherever its recipe is read from
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # a moved project: the same files, elsewhere
    assert recipe_hash(load_recipe(tmp_path / "copy" / "r.yaml")) == recipe_hash(a)
    (tmp_path / "copy" / "evals" / "t.yaml").write_text("task: t\n")  # an eval folder that changed
    assert recipe_hash(load_recipe(tmp_path / "copy" / "r.yaml")) != recipe_hash(a)
    assert a.absolute().to_yaml() == moved.to_yaml()  # what the run folder keeps


def test_training_does_not_depend_on_whether_scores_came_from_the_cache(tmp_path, tiny_recipe_data, monkeypatch):
    """Scoring seeds the random generators as lm-eval does; a cached score does not. With dropout,
    training after a snapshot drew other masks on a warm cache, so a re-run gave other curves."""
    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path / "cache"))  # cold for the first run
    lora = {**tiny_recipe_data["lora"], "dropout": 0.3}
    _, cold = _run(tmp_path, tiny_recipe_data, name="cold", lora=lora)
    _, warm = _run(tmp_path, tiny_recipe_data, name="warm", lora=lora)
    columns = ["step", "task", "metric", "value"]
    pd.testing.assert_frame_equal(pd.read_csv(cold / "curves.csv")[columns], pd.read_csv(warm / "curves.csv")[columns])


def test_a_run_whose_eval_items_changed_before_it_resumed_is_refused(tmp_path, tiny_recipe_data, monkeypatch):
    # the eval's data file lives outside the recipe's folders (so the recipe's hash cannot see it): edited
    # between a killed attempt and its resumption, the curve would mix two test sets
    from forgetscope.session import RunSession

    rows = [{"prompt": f"rev {i:03d} =", "completion": f" {str(i)[::-1]}"} for i in range(100, 108)]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "rev.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "rev",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(held_out)}},
                "test_split": "test",
                "output_type": "loglikelihood",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{completion}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    evals = {"new": ["rev"], "general": [], "include": [str(tmp_path / "evals")], "limit": 8}
    original = RunSession.score

    def stop_at_3(self, model, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, model, step, *args, **kwargs)

    monkeypatch.setattr(RunSession, "score", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_recipe_data, name="edited", evals=evals)
    monkeypatch.setattr(RunSession, "score", original)
    held_out.write_text("".join(json.dumps({**r, "completion": " xyz"}) + "\n" for r in rows))
    with pytest.raises(RunError, match=r"the items or config of rev changed since steps \[0, 1\] were scored"):
        _run(tmp_path, tiny_recipe_data, name="edited", evals=evals)
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))  # restored: it resumes
    _, root = _run(tmp_path, tiny_recipe_data, name="edited", evals=evals)
    assert json.loads((root / "manifest.json").read_text())["status"] == "finished"
