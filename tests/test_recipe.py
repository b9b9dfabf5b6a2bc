"""Recipes are data: every shipped YAML validates, and bad ones fail with one clear line each."""

import subprocess
import sys

import pytest
import yaml
from conftest import RECIPES

from forgetscope import cli
from forgetscope.load import RecipeError, load_recipe, parse_overrides, recipe_from_dict
from forgetscope.recipe import field_reference


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert path.read_text().startswith(f"# forgetscope run recipes/{path.name}")
    assert recipe.name


def test_overrides_are_applied_and_typed(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["train.lr=3e-3", "method=full", "lora=null", "snapshots.every=2"])
    assert recipe.train.lr == pytest.approx(3e-3)
    assert recipe.method == "full" and recipe.lora is None
    assert recipe.snapshots.every == 2


def test_defaults_fill_in_and_round_trip(tmp_path):
    recipe = recipe_from_dict({"base": "tiny-random"})
    assert recipe.method == "lora" and recipe.lora.r == 16
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


def test_field_reference_documents_every_field():
    text = field_reference()
    for key in (
        "train.lr",
        "snapshots.schedule",
        "lora.target_modules",
        "evals.general",
        "task.chat_template",
        "evals.precision",
        "stages[i].steps",
        "stages[i].task.path",
    ):
        assert f"  {key} (" in text
    # every field sits under the heading of its own section (runs_dir followed stages[i]'s fields)
    heading = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            heading = line.split(" ", 1)[0].rstrip(":")
        elif line.startswith("  ") and not line.startswith("      "):
            key = line.split()[0]
            assert key.rpartition(".")[0] == heading.rstrip(":") if "." in key else heading == "", (heading, key)


# (recipe change, expected fragment of the single error line)
MALFORMED = [
    ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
    ({"train": {"learning_rate": 1e-3}}, "train.learning_rate: unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr: expected number, got 'fast'"),
    ({"train": {"steps": 2.5}}, "train.steps: expected integer, got 2.5"),
    ({"train": {"steps": 0}}, "train.steps: must be positive"),
    ({"method": "qlora"}, "method: expected 'full' | 'lora', got 'qlora'"),
    ({"method": "full", "lora": {"r": 8}}, "lora: LoRA settings on a full fine-tuning run"),
    ({"base": "smollm-135m"}, "did you mean 'smollm2-135m'?"),
    ({"base": "./no/such/model.gguf"}, "base: no such GGUF file"),
    ({"base": "someorg/not-cached-model"}, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ({"task": {"name": "numeral"}}, "task.name: unknown embedded task 'numeral'; did you mean 'numerals'?"),
    ({"task": {"name": None, "path": "missing.jsonl"}}, "task.path: no such file"),
    ({"task": {"name": "numerals", "hf_dataset": "org/data"}}, "task: give exactly one of"),
    ({"snapshots": {"schedule": "every", "at": None}}, "snapshots.every: set a positive interval"),
    ({"snapshots": {"schedule": "at", "at": [0, 99]}}, "snapshots.at: steps [99] fall outside 0..train.steps=3"),
    ({"snapshots": {"count": "six"}}, "snapshots.count: expected integer"),
    ({"evals": {"new": ["numeral"]}}, "evals: unknown eval task 'numeral'; did you mean 'numerals'?"),
    ({"evals": {"general": "prose_ppl"}}, "evals.general: expected list of string"),
    ({"train": {"batch_size": 6, "grad_accum": 4}}, "train.batch_size: 6 is not divisible by train.grad_accum=4"),
    ({"name": "../escape"}, "name: '../escape' must be ASCII letters"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout: must be in [0, 1)"),
    ({"replay": {"ratio": 1.5}}, "replay.ratio: must lie strictly between 0 and 1"),
    ({"replay": {"ratio": 1.0}}, "replay.ratio: must lie strictly between 0 and 1"),
    ({"cascade": {"cheap": [], "kl_tokens": 0}}, "cascade.kl_tokens: must be positive, got 0"),
    ({"replay": {"source": "data"}}, "replay.path: give the file"),
    ({"replay": {"lose": "kl"}}, "replay.lose: unknown key; did you mean 'loss'?"),
    ({"replay": {"refresh_every": 0}}, "replay.refresh_every: a positive number of steps, with source: self"),
    ({"replay": {"refresh_every": 3}}, "replay.refresh_every: 3 is not shorter than the run (3 steps), so the buffer"),
    (
        {"cascade": {"every": 5, "cheap": ["prose_ppl"]}},
        "cascade.every: every 5 steps of 3 falls on no step between the snapshots (0, 1, 3)",
    ),
    (
        {"evals": {"general": ["prose_ppl", "world_capitals"]}, "cascade": {"cheap": ["world_capitals"]}},
        "cascade.cheap: 'world_capitals' is scored against answers (output_type multiple_choice)",
    ),
    ({"base": "scratch:seed=-1"}, "base: scratch seed=-1 must be a whole number, 0 or more"),
    ({"base": "scratch:layers=-2"}, "base: scratch layers=-2 must be a whole number, positive"),
]


def _merge(base, extra):
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("change,expected", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_recipe_gives_one_clear_line(tmp_path, capsys, tiny_recipe_data, change, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_merge(tiny_recipe_data, change)))
    code = cli.main(["run", str(path), "--set", f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"forgetscope: error: {path}: ")
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_all_problems_reported_at_once(tiny_recipe_data):
    data = _merge(tiny_recipe_data, {"trian": {}, "train": {"lr": "x"}, "method": "bogus"})
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert len(err.value.problems) == 3


def test_bad_yaml_and_bad_override(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {lr: 1e-3\n")
    assert cli.main(["show", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys; a second `train:` would silently drop the first's settings."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: t\nbase: tiny-random\ntrain: {lr: 1e-3}\nmethod: full\ntrain: {steps: 3}\n")
    assert cli.main(["show", str(path)]) == 2
    assert "line 5: not valid YAML (the key 'train' is given twice in one mapping)" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="given twice"):
        parse_overrides(["train={lr: 1, lr: 2}"])


def test_overrides_enter_lists_by_index():
    recipe = load_recipe(RECIPES / "sequence_paper.yaml", ["stages.1.steps=7", "stages.3.task.name=sym_sort"])
    assert [s.steps for s in recipe.stages] == [2000, 7, 2000, 2000] and recipe.stages[3].task.name == "sym_sort"
    assert recipe.stages[3].task.max_examples is None  # the rest of the stage stays
    with pytest.raises(RecipeError, match=r"--set stages.4: there is no item 4 \(items 0..3, or -4..-1 from the end\)"):
        load_recipe(RECIPES / "sequence_paper.yaml", ["stages.4.steps=7"])
    recipe = load_recipe(RECIPES / "sequence_paper.yaml", ["stages.-1.steps=9", "stages.-4.lr=1e-4"])
    assert [s.steps for s in recipe.stages] == [2000, 2000, 2000, 9] and recipe.stages[0].lr == 1e-4
    with pytest.raises(RecipeError, match=r"--set stages.-5: there is no item -5"):
        load_recipe(RECIPES / "sequence_paper.yaml", ["stages.-5.steps=7"])
    with pytest.raises(RecipeError) as err:  # blamed on the --set, counted from the start as validation counts
        load_recipe(RECIPES / "sequence_paper.yaml", ["stages.-1.steps=0"])
    assert err.value.problems == ["--set stages.-1.steps=0: stages[3]: steps and lr must be positive"]


def test_self_generation_settings_with_replay_of_data_are_refused(tmp_path, capsys, tiny_recipe_data):
    """`source: data` rehearses the file as it is: a temperature or prompts there would be ignored."""
    (tmp_path / "old.jsonl").write_text('{"text": "an old example"}\n')
    replay = {"source": "data", "path": "old.jsonl", "temperature": 0.7, "top_p": 0.9}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_merge(tiny_recipe_data, {"replay": replay})))
    assert cli.main(["show", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"forgetscope: error: {path}: replay.temperature: only used with source: self (source: data rehearses the "
        "file's records as they are); remove replay.temperature, replay.top_p"
    )
    del replay["temperature"], replay["top_p"]
    path.write_text(yaml.safe_dump(_merge(tiny_recipe_data, {"replay": replay})))
    assert cli.main(["show", str(path)]) == 0


def test_refresh_every_is_checked_against_the_stages_that_replay():
    recipe = load_recipe(RECIPES / "sequence_replay.yaml", ["replay.refresh_every=299"])
    assert recipe.replay.refresh_every == 299
    with pytest.raises(RecipeError, match=r"300 is not shorter than the longest stage with replay \(300 steps\)"):
        load_recipe(RECIPES / "sequence_replay.yaml", ["replay.refresh_every=300"])
    recipe = load_recipe(RECIPES / "sequence_replay.yaml", ["stages.0.steps=900", "stages.2.steps=500"])
    assert recipe.stages[0].steps == 900  # stage 1 never replays: its length does not count
    with pytest.raises(RecipeError, match=r"900 is not shorter than the longest stage with replay \(500 steps\)"):
        load_recipe(
            RECIPES / "sequence_replay.yaml", ["stages.0.steps=900", "stages.2.steps=500", "replay.refresh_every=900"]
        )


def test_a_bad_value_from_set_is_blamed_on_the_set_not_the_file(capsys):
    argv = ["show", str(RECIPES / "sequence.yaml"), "--set", "train.lr=-1", "--set", "stages.1.steps=0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "forgetscope: error: --set train.lr=-1: train.lr: must be positive, got -1.0",
        "forgetscope: error: --set stages.1.steps=0: stages[1]: steps and lr must be positive",
    ]
    assert cli.main(["show", str(RECIPES / "tiny.yaml"), "--set", "train.lr=0", "--set", "train.steps=bad"]) == 2
    assert "forgetscope: error: --set train.steps=bad: train.steps: expected" in capsys.readouterr().err
    argv = ["show", str(RECIPES / "tiny.yaml"), "--set", "train.grad_accum=3", "--set", "lora.r=8", "--set", "lora.r=0"]
    assert cli.main(argv) == 2  # keys named in a sentence; the last --set of a key is the one that holds
    err = capsys.readouterr().err
    assert "--set train.grad_accum=3: train.batch_size: 4 is not divisible by train.grad_accum=3" in err
    assert "--set lora.r=0: lora.r and lora.alpha: must be positive" in err
    assert cli.main(["show", str(RECIPES / "tiny.yaml"), "--set", "stages.9.steps=1"]) == 2
    assert capsys.readouterr().err.startswith("forgetscope: error: --set stages.9")


def test_cli_error_is_exit_2_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny-random\ntrian: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "forgetscope", "run", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "did you mean 'train'?" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_show_prints_resolved_recipe(capsys):
    assert cli.main(["show", str(RECIPES / "tiny.yaml"), "--set", "train.steps=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 4 and shown["train"]["scheduler"] == "linear"


def test_a_task_that_gives_data_needs_no_name_null(tmp_path, tiny_recipe_data):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "rev 123 =", "completion": " 321"}\n')
    data = {**tiny_recipe_data, "task": {"path": "mine.jsonl"}}
    recipe = recipe_from_dict(data, str(tmp_path / "r.yaml"))
    assert recipe.task.name is None and recipe.task.path == "mine.jsonl"
    staged = {k: v for k, v in tiny_recipe_data.items() if k not in ("task", "train", "evals")}
    staged["stages"] = [
        {"task": {"name": "numerals"}, "steps": 3},  # at: [1, 3] counts into each stage
        {"task": {"path": "mine.jsonl"}, "steps": 3, "evals": ["digits_reverse"]},
    ]
    recipe = recipe_from_dict(staged, str(tmp_path / "r.yaml"))
    assert [s.task.name for s in recipe.stages] == ["numerals", None]
    with pytest.raises(RecipeError, match="give exactly one of"):  # a name given with the data is still refused
        recipe_from_dict({**data, "task": {"name": "numerals", "path": "mine.jsonl"}}, str(tmp_path / "r.yaml"))


def test_a_bad_command_line_is_one_line_and_exit_2(capsys):
    for argv, message in [
        (["report"], "forgetscope report: error: the following arguments are required: RUN, -o/--out"),
        (["bogus"], "forgetscope: error: argument COMMAND: invalid choice: 'bogus'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1 and err[0].startswith(message) and "--help`" in err[0]
    assert cli.main([]) == 2 and "usage: forgetscope" in capsys.readouterr().err  # bare: the help


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_show_prints_a_recipe_that_loads_as_the_same_recipe(tmp_path, capsys, name):
    assert cli.main(["show", str(RECIPES / name)]) == 0
    (tmp_path / name).write_text(capsys.readouterr().out)
    shown = load_recipe(tmp_path / name)
    assert shown.to_dict() == load_recipe(RECIPES / name).to_dict()  # nothing lost, nothing unused left in


def test_paths_of_the_wrong_kind_are_named_so(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path)]) == 2
    assert f"{tmp_path}: a folder, not a recipe file" in capsys.readouterr().err
    (tmp_path / "t.yaml").write_text("task: x\n")
    assert cli.main(["tasks", "--include", str(tmp_path / "t.yaml")]) == 2
    assert f"--include {tmp_path / 't.yaml'}: a file, not a folder" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert cli.main(["show", str(RECIPES / "tiny.yaml"), "--set", f"base={tmp_path / 'adapter'}"]) == 2
    assert "holds a peft adapter, not a model; give the model it was trained from" in capsys.readouterr().err


def test_replay_and_cascade_checks_say_what_holds_for_stages(capsys):
    recipe = recipe_from_dict(None)  # every default
    assert recipe.name and recipe.replay is None
    off = ["stages.1.replay=false", "stages.2.replay=false"]
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "sequence_replay.yaml", [*off, "replay.refresh_every=100000"])
    assert err.value.problems == [  # blamed on the --set that turned the last stage's replay off
        "--set stages.2.replay=false: stages: every stage after the first has replay: false, so the `replay` "
        "section is never used; remove it or let a stage replay"
    ]
    with pytest.raises(RecipeError) as err:  # a cascade with stages: one line, not a second about train.steps
        load_recipe(RECIPES / "sequence.yaml", ["cascade={every: 1000}"])
    assert err.value.problems == [
        "--set cascade={every: 1000}: cascade: not available with stages yet; remove the cascade section"
    ]


def test_the_last_set_of_a_stage_holds_however_its_index_is_written():
    argv = ["stages.0.steps=1", "stages.-3.steps=2", "stages.0.steps=3"]
    assert load_recipe(RECIPES / "sequence.yaml", argv).stages[0].steps == 3
    with pytest.raises(RecipeError, match=r"--set evals.general.0: there is no item 0 \(the list is empty\)"):
        load_recipe(RECIPES / "sequence.yaml", ["evals.general.0=prose_ppl"])


def test_the_new_task_eval_follows_the_task(tmp_path):
    """Unset, evals.new is the embedded task's own eval, and none for a task from a file (it was
    `numerals` whatever the task: a run on your data scored a task it never trained)."""
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a =", "completion": " b"}\n')
    for task, new in (({"path": "mine.jsonl"}, []), ({"name": "digits_inc"}, ["digits_inc"]), (None, ["numerals"])):
        data = {"base": "tiny-random", **({"task": task} if task else {})}
        recipe = recipe_from_dict(data, str(tmp_path / "r.yaml"))
        assert recipe.scored_evals.new == new and recipe.to_dict()["evals"]["new"] == new
    named = recipe_from_dict({"task": {"path": "mine.jsonl"}, "evals": {"new": ["numerals"]}}, str(tmp_path / "r.yaml"))
    assert named.scored_evals.new == ["numerals"]


def test_output_piped_into_head_ends_quietly():
    """`forgetscope tasks --all | head -1` (more than a pipe holds): the reader leaves early; no
    BrokenPipeError traceback."""
    out = subprocess.run(
        f"{sys.executable} -m forgetscope tasks --all | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert len(out.stdout.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr[-500:]


def test_a_replay_share_that_cannot_be_drawn_is_refused_before_stage_1_trains(monkeypatch, tmp_path, capsys):
    """Replay starts at stage 2: a buffer smaller than a micro-batch's replay share (drawn without
    repeats) or a share that does not split over the micro-batches stopped the run there, after
    stage 1 had trained (a numpy traceback, or an error). Both are validation now, as in replay.split_batch."""
    with pytest.raises(RecipeError) as err:  # 64 x 0.5 = 32 replay examples a step, from a buffer of 8
        load_recipe(RECIPES / "sequence_replay.yaml", ["replay.samples=8"])
    assert err.value.problems == [
        "--set replay.samples=8: replay.samples: the buffer's 8 samples are fewer than the replay examples drawn "
        "from it without repeats (train.batch_size=64 x replay.ratio=0.5: 32 a step); give replay.samples: 32 or "
        "more, or a smaller replay.ratio or train.batch_size"
    ]
    assert load_recipe(
        RECIPES / "sequence_replay.yaml", ["replay.samples=16", "train.grad_accum=2"]
    )  # 16 a micro-batch
    with pytest.raises(RecipeError) as err:  # 15 + 15 over 2 micro-batches
        load_recipe(RECIPES / "sequence_replay.yaml", ["train.batch_size=30", "train.grad_accum=2"])
    assert err.value.problems == [
        "--set train.grad_accum=2: replay.ratio: 0.5 of train.batch_size=30 gives 15 new-task and 15 replay examples "
        "a step, which must each split evenly over the 2 micro-batches of a step (train.grad_accum=2); change "
        "train.batch_size, train.grad_accum or replay.ratio"
    ]
    monkeypatch.setenv("WORLD_SIZE", "3")  # under a launcher the processes split the batch too
    with pytest.raises(RecipeError, match=r"over the 6 micro-batches of a step \(train.grad_accum=2 x 3 processes\)"):
        load_recipe(RECIPES / "sequence_replay.yaml", ["train.grad_accum=2"])
    monkeypatch.delenv("WORLD_SIZE")
    # a single task with replay is checked alike, and `forgetscope run` writes nothing
    argv = ["run", str(RECIPES / "tiny.yaml"), "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "train.batch_size=8"]
    assert cli.main([*argv, "--set", "replay={source: self, ratio: 0.5, samples: 2}"]) == 2
    assert "replay.samples: the buffer's 2 samples are fewer" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_snapshot_steps_at_are_checked_against_each_stage():
    """Each stage snapshots on the schedule applied to its own steps (sequence.schedule): an `at`
    step beyond a stage's length was accepted and listed in the manifest, never reached."""
    at = "snapshots={schedule: at, at: [15, 300], every: null}"
    assert sorted(load_recipe(RECIPES / "sequence.yaml", [at]).snapshots.at) == [15, 300]
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "sequence.yaml", ["snapshots={schedule: at, at: [15, 301], every: null}"])
    assert err.value.problems == [
        "--set snapshots={schedule: at, at: [15, 301], every: null}: snapshots.at: steps [301] fall outside "
        "0..stages[0].steps=300 "
        "(with stages, `at` counts the steps into each stage, and this is the shortest); list steps 0 to 300"
    ]
    with pytest.raises(RecipeError) as err:  # the shortest stage bounds it, blamed on the --set that shortened it
        load_recipe(RECIPES / "sequence.yaml", [at, "stages.1.steps=20"])
    assert err.value.problems[0].startswith(
        "--set stages.1.steps=20: snapshots.at: steps [300] fall outside 0..stages[1].steps=20"
    )


def test_stages_share_one_chat_template_setting():
    """The run scores every stage's evals with stage 1's setting, and replay renders the earlier
    stages' prompts with the current stage's: a stage's own setting was silently ignored."""
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "sequence.yaml", ["stages.0.task.chat_template='off'"])
    assert err.value.problems == [
        "--set stages.0.task.chat_template='off': stages[1].task.chat_template: 'auto', but 'off' in stages[0]; all "
        "stages must share one chat_template setting (every snapshot scores every stage's evals in one prompt "
        "format, and replay renders earlier stages' prompts as the current stage does); set 'off' in every stage"
    ]
    same = [f"stages.{i}.task.chat_template='off'" for i in range(3)]
    assert [s.task.chat_template for s in load_recipe(RECIPES / "sequence.yaml", same).stages] == ["off"] * 3
    unquoted = [f"stages.{i}.task.chat_template=off" for i in range(3)]  # YAML 1.1's false: read as the word
    assert [s.task.chat_template for s in load_recipe(RECIPES / "sequence.yaml", unquoted).stages] == ["off"] * 3


def test_a_misspelt_value_gets_a_hint_that_fits_it():
    """Every misspelt word was told "YAML read it as a number or a boolean: quote it"."""
    hints = {
        "method=qlora": "method: expected 'full' | 'lora', got 'qlora'; did you mean 'lora'?",
        "snapshots.schedule=logg": "got 'logg'; did you mean 'log'?",
        "name=yes": "name: expected string, got True; YAML read it as a number or a boolean: quote it",
        "train.lr=": "train.lr: expected number, got None; the value is empty",
    }
    for override, hint in hints.items():
        with pytest.raises(RecipeError) as err:
            load_recipe(RECIPES / "tiny.yaml", [override])
        [problem] = err.value.problems
        assert problem.startswith(f"--set {override}: ") and problem.endswith(hint), problem
        assert "quote it" not in problem or override == "name=yes"


def test_a_set_inside_replay_does_not_turn_replay_on():
    """`--set replay.ratio=0.5` on a recipe without replay ran replay with every other default (KL,
    coeff 10, 256 samples from BOS); the whole section turns it on, and `--set replay=null` (make
    sequence-paper) still turns it off."""
    for recipe, argv, state in (
        ("sequence.yaml", ["replay.ratio=0.5"], "no `replay:` section"),
        ("sequence_paper.yaml", ["replay=null", "replay.ratio=0.5"], "replay: null"),
    ):
        with pytest.raises(RecipeError) as err:
            load_recipe(RECIPES / recipe, argv)
        assert err.value.problems == [
            f"--set replay.ratio=0.5: the recipe has no replay ({state}), so this would turn replay on with every "
            "other replay setting at its default; to turn it on, give the whole section (--set 'replay={source: "
            "self, ratio: 0.5, loss: kl}'; every field: forgetscope fields) or add a `replay:` section to the recipe"
        ]
    whole = "replay={source: self, prompts: tasks, loss: ntp, ratio: 0.5}"
    recipe = load_recipe(RECIPES / "sequence.yaml", [whole, "replay.samples=64"])
    assert (recipe.replay.loss, recipe.replay.ratio, recipe.replay.samples) == ("ntp", 0.5, 64)
    assert load_recipe(RECIPES / "sequence_paper.yaml", ["replay=null"]).replay is None
    assert load_recipe(RECIPES / "sequence_replay.yaml", ["replay.ratio=0.25"]).replay.ratio == 0.25
    assert load_recipe(RECIPES / "full_ft.yaml", ["cascade.every=4"]).cascade.every == 4  # README's calibration


def test_sweep_blames_a_misspelt_or_replay_key_on_key_not_values(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert (
        cli.main(["sweep", str(RECIPES / "sequence.yaml"), "--key", "stages.1.lrr", "--values", "1e-3", "-o", out]) == 2
    )
    assert capsys.readouterr().err.strip() == (
        "forgetscope: error: --key stages.1.lrr: unknown key; did you mean 'lr'? (allowed: task, steps, lr, evals, replay)"
    )
    argv = ["sweep", str(RECIPES / "sequence.yaml"), "--key", "replay.ratio", "--values", "0.5", "-o", out]
    assert cli.main([*argv, "--set", f"runs_dir={tmp_path / 'runs'}"]) == 2  # (unfixed, it ran)
    assert capsys.readouterr().err.strip() == (
        f"forgetscope: error: --key replay.ratio: {RECIPES / 'sequence.yaml'} has no replay, so the sweep would turn "
        "replay on with every other replay setting at its default; add a `replay:` section to the recipe"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_eval_lists_are_checked_whole_before_anything_runs():
    """An eval listed twice passed validation and stopped the run at the suite's preparation; an
    unknown name went unreported while another evals problem was there."""
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "tiny.yaml", ["evals.general=[prose_ppl, prose_ppl, hellaswagg]", "evals.limit=0"])
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        "evals.limit: must be positive, or null for every item (audit's --limit 0), got 0",
        "evals.general: 'prose_ppl' is listed twice; list it once",
        "evals: unknown eval task 'hellaswagg'; did you mean 'hellaswag'? (see `forgetscope tasks`)",
    ]
    with pytest.raises(RecipeError, match="'numerals' is listed under new and under general"):
        load_recipe(RECIPES / "tiny.yaml", ["evals.general=[numerals]"])


@pytest.mark.parametrize(
    "recipe,override,problem",
    [
        ("tiny.yaml", "stages.1.lr=1e-4", "--set stages.1: the recipe has no stages list to index"),
        ("tiny.yaml", "snapshots.at.0=3", "--set snapshots.at.0: the recipe has no snapshots.at list to index"),
        ("sequence.yaml", "stages.x.steps=500", "--set stages.x: stages is a list; index its items by number"),
    ],
)
def test_a_set_into_a_list_that_is_not_there_says_so(recipe, override, problem):
    """These read "stages: expected list of mapping, got {'1': {'lr': '1e-4'}}"."""
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / recipe, [override])
    assert err.value.problems[0].startswith(problem)
