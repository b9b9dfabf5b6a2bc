"""Sequences of new tasks: the accuracy-matrix metrics on hand-computed fixtures, recipe checks,
models from scratch, and a 3-stage run on a tiny model."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import RECIPES

from forgetscope import cli, continual, models, replay, schema, validate
from forgetscope.load import RecipeError, recipe_from_dict
from forgetscope.recipe import Recipe, StageConfig

R = np.array(
    [
        [0.0, 0.0, 0.0],  # the base
        [0.9, 0.1, 0.0],  # after stage 1
        [0.5, 0.8, 0.2],  # after stage 2
        [0.3, 0.4, 0.9],  # after stage 3
    ]
)


def test_matrix_metrics_by_hand():
    m = continual.sequence_metrics(R)
    assert m["average_accuracy"] == pytest.approx((0.3 + 0.4 + 0.9) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.4 - 0.8)) / 2)  # -0.5
    assert m["forward_transfer"] == pytest.approx(((0.1 - 0.0) + (0.2 - 0.0)) / 2)  # 0.15
    assert m["forgetting"] == pytest.approx([0.9 - 0.3, 0.8 - 0.4])  # max over earlier stages minus final
    assert m["mean_forgetting"] == pytest.approx(0.5)
    assert m["learning_accuracy"] == pytest.approx((0.9 + 0.8 + 0.9) / 3)
    losses = continual.sequence_metrics(-R, higher_is_better=False)  # a loss-like score reads the same way
    assert losses["backward_transfer"] == pytest.approx(m["backward_transfer"])
    mixed = continual.sequence_metrics(R * [-1, 1, 1], higher_is_better=[False, True, True])  # per column
    assert all(mixed[k] == pytest.approx(v) for k, v in m.items())
    with pytest.raises(ValueError):
        continual.sequence_metrics(R[:3])


def test_accuracy_matrix_is_read_at_the_stage_ends():
    rows = [
        {"task": t, "metric": "acc", "step": s, "value": v, "higher_is_better": True}
        for s, values in zip([0, 10, 20, 30], R)
        for t, v in zip(["a", "b", "c"], values)
    ]
    rows += [{"task": "a", "metric": "acc", "step": 5, "value": 0.42, "higher_is_better": True}]  # mid-stage: ignored
    stages = [{"task": t, "evals": [t], "start": s - 10, "end": s} for t, s in (("a", 10), ("b", 20), ("c", 30))]
    matrix = continual.accuracy_matrix(pd.DataFrame(rows), stages)
    assert list(matrix.index) == ["base", "after a", "after b", "after c"]
    assert np.allclose(matrix.to_numpy(), R)
    # an eval whose metrics list perplexity (lower is better) before acc: read by acc, in acc's direction
    noisy = rows + [{**r, "metric": "perplexity", "value": 5.0, "higher_is_better": False} for r in rows]
    noisy.sort(key=lambda r: r["metric"] != "perplexity")
    matrix, result = continual.summary(pd.DataFrame(noisy), stages)
    assert np.allclose(matrix.to_numpy(), R) and result == continual.sequence_metrics(R)
    # two stages of one task (or file): each keeps its own row
    twice = [*stages[:2], {**stages[2], "task": "a"}]
    assert list(continual.accuracy_matrix(pd.DataFrame(rows), twice).index) == [
        "base",
        "after a",
        "after b",
        "after a (stage 3)",
    ]


def _stages_recipe(**changes) -> dict:
    data = {
        "name": "seq",
        "base": "tiny-random",
        "method": "full",
        "stages": [
            {"task": {"name": op, "max_examples": 64}, "steps": 3} for op in ("sym_reverse", "sym_sort", "sym_shift")
        ],
        "replay": {
            "source": "self",
            "prompts": "tasks",
            "samples": 8,
            "max_new_tokens": 6,
            "temperature": 0.5,
            "ratio": 0.25,
            "loss": "ntp",
        },
        "train": {"lr": 1e-2, "batch_size": 4, "seq_len": 32, "warmup_steps": 0, "precision": "fp32"},
        "snapshots": {"schedule": "at", "at": [3]},
        "evals": {"general": [], "limit": 4},
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"evals": {"new": ["numerals"], "general": []}}, "evals.new: with stages, each stage lists its own evals"),
        ({"stages": [{"task": {"name": "sym_reverse"}, "steps": 3}]}, "a sequence needs at least 2 stages"),
        (
            {"stages": [{"task": {"name": "sym_revers"}}, {"task": {"name": "sym_sort"}}]},
            "stages[0].task.name: unknown embedded task 'sym_revers'; did you mean 'sym_reverse'?",
        ),
        (
            {"stages": [{"task": {"name": "sym_sort"}, "steps": 0}, {"task": {"name": "sym_shift"}, "stps": 3}]},
            "stages[1].stps: unknown key; did you mean 'steps'?",
        ),
        (
            {"stages": [], "replay": {"prompts": "tasks"}},
            "replay.prompts: `tasks` prompts with the earlier stages' tasks",
        ),
    ],
)
def test_stage_recipes_are_checked(changes, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_stages_recipe(**changes))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_stage_recipes_resolve_evals_steps_and_replay():
    recipe = recipe_from_dict(_stages_recipe())
    assert recipe.scored_evals.new == ["sym_reverse", "sym_sort", "sym_shift"]
    assert recipe.stage_recipe(1).evals.new == ["sym_reverse", "sym_sort", "sym_shift"]
    assert yaml.safe_load(recipe.to_yaml())["evals"]["new"] == ["sym_reverse", "sym_sort", "sym_shift"]
    assert recipe.stage_recipe(0).replay is None and recipe.stage_recipe(1).replay is not None
    assert recipe.stage_recipe(2).task.name == "sym_shift" and recipe.stage_recipe(2).train.steps == 3


def test_stages_are_typed_and_validation_leaves_the_recipe_as_built():
    data = _stages_recipe()
    data["stages"][1]["lr"] = "3e-3"  # YAML 1.1 reads it as a string; the schema makes it a number
    problems = []
    built = schema.build(Recipe, data, "", problems)
    assert problems == [] and all(isinstance(stage, StageConfig) for stage in built.stages)
    assert built.stages[1].lr == 3e-3 and built.stages[0].task.max_examples == 64 and built.stages[0].replay is True
    before = copy.deepcopy(built)
    assert validate.check(built, data) == []
    assert built == before


def test_models_from_scratch_are_built_once_with_the_asked_sizes():
    assert "did you mean 'layers'" in models.check_reference("scratch:layer=2", None)[0]
    path = models.resolve("scratch:layers=1,hidden=16,heads=2,seed=3")
    assert path == models.resolve("scratch:layers=1,hidden=16,heads=2,seed=3")  # cached
    model, tokenizer = models.load(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (1, 16, 64)
    assert tokenizer("R abcd =").input_ids[-1] == tokenizer("=").input_ids[-1]  # character level


def test_three_stage_run_writes_the_matrix_and_replays_earlier_tasks(tmp_path, capsys, monkeypatch):
    seen_prompts = []
    original = replay.build_buffer

    def spying(model, tokenizer, recipe, fingerprint, task_prompts=None):
        seen_prompts.append(task_prompts)
        return original(model, tokenizer, recipe, fingerprint, task_prompts)

    monkeypatch.setattr(replay, "build_buffer", spying)
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump(_stages_recipe(runs_dir=str(tmp_path / "runs"))))
    assert cli.main(["run", str(path)]) == 0
    root = tmp_path / "runs" / "seq"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["snapshot_steps"] == [0, 3, 6, 9]
    assert [(s["start"], s["end"], s["replay"]) for s in manifest["stages"]] == [
        (0, 3, False),
        (3, 6, True),
        (6, 9, True),
    ]
    # before stage 2 the prompts are stage 1's; before stage 3, stages 1 and 2 in turn
    assert {p.split()[0] for p in seen_prompts[0]} == {"R"}
    assert [p.split()[0] for p in seen_prompts[1][:4]] == ["R", "S", "R", "S"]
    curves = pd.read_csv(root / "curves.csv")
    assert set(curves[curves.metric == "acc"].groupby("step")["task"].nunique()) == {3}  # every task at every snapshot
    matrix = pd.read_csv(root / "matrix.csv", index_col=0)
    assert matrix.shape == (4, 3) and list(matrix.index) == [
        "base",
        "after sym_reverse",
        "after sym_sort",
        "after sym_shift",
    ]
    assert set(manifest["sequence"]) >= {"average_accuracy", "backward_transfer", "forward_transfer", "mean_forgetting"}
    assert (root / "sequence.png").stat().st_size > 10_000
    assert "accuracy matrix R[i][j]" in capsys.readouterr().out
    assert cli.main(["report", str(root), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Sequences of new tasks" in md and "![seq](sequence-seq.png)" in md
    assert "| sym_shift acc: " in md  # the summary's new task is the last stage's, not the first by name
    assert (tmp_path / "rep" / "sequence-seq.png").is_file()


def test_a_stage_can_train_on_the_users_file(tmp_path):
    rows = [{"prompt": f"X {w} =", "completion": w.upper()} for w in ("abcd", "bcda", "cdab")]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = _stages_recipe()
    data["stages"][2] = {"task": {"name": None, "path": "mine.jsonl"}, "steps": 3}
    with pytest.raises(RecipeError, match=r"stages\[2\].evals: list the evals"):
        recipe_from_dict(data, str(tmp_path / "r.yaml"))
    data["stages"][2]["evals"] = ["sym_rotate"]  # any eval task: evals/, evals.include or lm-eval's
    recipe = recipe_from_dict(data, str(tmp_path / "r.yaml"))
    assert recipe.stage_recipe(2).task.path == "mine.jsonl" and recipe.scored_evals.new[-1] == "sym_rotate"


def test_a_sequence_stopped_inside_a_stage_resumes_there_to_the_same_curves(tmp_path, monkeypatch):
    """Stage 1 is skipped (its end weights reloaded), stage 2 continues from its last snapshot's
    checkpoint, replay buffer and all; the curves equal those of an uninterrupted run."""
    from forgetscope.runner import run
    from forgetscope.session import RunSession

    data = _stages_recipe(
        stages=[{"task": {"name": op, "max_examples": 64}, "steps": 4} for op in ("sym_reverse", "sym_sort")],
        snapshots={"schedule": "every", "every": 2},
        runs_dir=str(tmp_path / "runs"),
    )
    straight = run(recipe_from_dict({**data, "name": "straight"}))

    original = RunSession.score

    def stop_at_8(self, model, step, *args, **kwargs):
        if step == 8:
            raise KeyboardInterrupt  # as if killed after the checkpoint of step 6 was saved
        return original(self, model, step, *args, **kwargs)

    monkeypatch.setattr(RunSession, "score", stop_at_8)
    recipe = recipe_from_dict({**data, "name": "stopped"})
    with pytest.raises(KeyboardInterrupt):
        run(recipe)
    root = tmp_path / "runs" / "stopped"
    assert json.loads((root / "manifest.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (root / "trainer").iterdir()) == ["stage-1", "stage-2", "stages.json"]

    monkeypatch.setattr(RunSession, "score", original)
    run(recipe)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_from"] == "stage-2/checkpoint-2"
    pd.testing.assert_frame_equal(
        pd.read_csv(root / "curves.csv").drop(columns=["run", "recipe"]),
        pd.read_csv(straight / "curves.csv").drop(columns=["run", "recipe"]),
    )
    assert [e["step"] for e in manifest["train_log"] if "loss" in e] == list(range(1, 9))
    assert not (root / "trainer").exists()
    draws = [
        [e["step"] for e in json.loads((r / "manifest.json").read_text())["train_log"] if "replay_refresh" in e]
        for r in (root, straight)
    ]
    assert draws[0] == draws[1] == [4]  # stage 2's buffer, drawn once: the resumed run's redraw is not a draw


@pytest.mark.slow
def test_replay_keeps_an_earlier_task_that_plain_training_loses_on_space_led_data(tmp_path):
    """Two digit tasks in lm-eval's convention (` 321`: completions start with a space), scored by
    evals written like evals/sym_*.yaml, on a small model from scratch: plain fine-tuning on the
    second task erases the first; self-generated replay, rehearsed token for token, keeps it."""
    short = [
        "base=scratch:layers=2,hidden=64,heads=4,seed=0",
        f"runs_dir={tmp_path}",
        "evals.limit=50",
        "train.lr=3e-3",
        "train.batch_size=32",
        "snapshots.every=200",
        "replay.refresh_every=50",
        "stages=[{task: {name: digits_rotate, max_examples: null}, steps: 200},"
        " {task: {name: digits_inc, max_examples: null}, steps: 200}]",
    ]
    for recipe in ("sequence", "sequence_replay"):
        overrides = [s for s in short if recipe == "sequence_replay" or not s.startswith("replay.")]
        assert (
            cli.main(["run", str(RECIPES / f"{recipe}.yaml"), *[arg for s in overrides for arg in ("--set", s)]]) == 0
        )
    plain = pd.read_csv(tmp_path / "sequence" / "matrix.csv", index_col=0)
    kept = pd.read_csv(tmp_path / "sequence_replay" / "matrix.csv", index_col=0)
    assert (
        plain.loc["after digits_rotate", "digits_rotate"] >= 0.9
        and kept.loc["after digits_rotate", "digits_rotate"] >= 0.9
    )
    assert plain.loc["after digits_inc", "digits_rotate"] <= 0.2  # forgotten without replay
    assert kept.loc["after digits_inc", "digits_rotate"] >= 0.9 and kept.loc["after digits_inc", "digits_inc"] >= 0.9


def test_a_stage_after_bf16_training_samples_its_replay_buffer(tmp_path):
    """Training under bf16 autocast leaves accelerate's autocast wrapper on the model's forward; the
    next stage's replay samples (and refreshes) must still decode into the sampler's fp32 cache."""
    data = _stages_recipe(runs_dir=str(tmp_path), stages=_stages_recipe()["stages"][:2])
    data["train"] = {**data["train"], "precision": "bf16"}
    data["replay"] = {**data["replay"], "refresh_every": 2}
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(path)]) == 0
    log = json.loads((tmp_path / "seq" / "manifest.json").read_text())["train_log"]
    assert [e["step"] for e in log if "replay_refresh" in e] == [3, 5]  # stage 2 starts at step 3; a refresh 2 steps in


def test_two_stages_scored_by_one_eval_are_refused_before_training(tmp_path, capsys):
    """The accuracy matrix needs an eval of its own per stage; a shared one used to crash at the end."""
    argv = [
        "run",
        str(RECIPES / "sequence.yaml"),
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "stages.1.task.name=digits_reverse",
    ]
    assert cli.main(argv) == 2
    assert "stages[1].evals: 'digits_reverse' already scores an earlier stage" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
