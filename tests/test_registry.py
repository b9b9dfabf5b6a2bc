"""Which eval names a folder of task YAMLs declares, read as lm-eval reads them."""

import pytest

from forgetscope import cli, registry
from forgetscope.load import RecipeError, recipe_from_dict

TASK = "dataset_path: json\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"


def test_a_folder_lists_groups_tags_and_quoted_names_as_lm_eval_registers_them(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("# task a\ntask: task_a\ntag: [my_tag]\n" + TASK)
    (tmp_path / "b.yaml").write_text('# task b\ntask: "task_b"   # quoted, with a comment\ntag: my_tag\n' + TASK)
    (tmp_path / "g.yaml").write_text("# both tasks, averaged\ngroup: my_group\ntask:\n  - task_a\n  - task_b\n")
    (tmp_path / "f.yaml").write_text("# a hook\ntask: task_f\nprocess_docs: !function utils.nowhere\n" + TASK)
    (tmp_path / "h.yaml").write_text("group: bare_group\ntask: [task_a, task_f]\n")
    listed = registry.folder_evals(tmp_path)
    assert listed == {
        "task_a": "task a",
        "task_b": "task b",
        "my_tag": "tag of task_a, task_b",
        "my_group": "group: both tasks, averaged",
        "task_f": "a hook",
        "bare_group": "group of task_a, task_f",
    }
    assert set(listed) <= set(registry.task_manager((str(tmp_path),), defaults=False).all_tasks)
    assert cli.main(["tasks", "--include", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  my_group         group: both tasks, averaged" in out and "[task_a" not in out and '"task_b"' not in out


def test_a_broken_yaml_still_shows_its_name(tmp_path):
    (tmp_path / "x.yaml").write_text('# mine\ntask: "mine"  # note\ndataset_kwargs: {data_files: x.jsonl\n')
    assert registry.folder_evals(tmp_path) == {"mine": "mine"}
    assert list(registry.unusable(tmp_path)) == ["mine"]


def test_two_include_folders_declaring_one_name_are_refused(tmp_path, tiny_recipe_data):
    for folder, prompt in (("a", "Q: "), ("b", "Question: ")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "dupe.yaml").write_text(f"task: dupe\n{TASK.replace('{{q}}', prompt + '{{q}}')}")
    paths = [str(registry.evals_dir()), str(tmp_path / "a"), str(tmp_path / "b")]
    [line] = registry.check_eval_names(["dupe"], paths)
    assert f"'dupe' is declared by {tmp_path / 'a' / 'dupe.yaml'} and by {tmp_path / 'b' / 'dupe.yaml'}" in line
    with pytest.raises(RecipeError, match=r"'dupe' is declared by .*a/dupe\.yaml and by .*b/dupe\.yaml; rename"):
        recipe_from_dict(
            {**tiny_recipe_data, "evals": {"general": ["dupe"], "include": [str(tmp_path / "a"), str(tmp_path / "b")]}}
        )
    assert registry.check_eval_names(["dupe"], [str(registry.evals_dir()), str(tmp_path / "a")]) == []
    (tmp_path / "a" / "dupe2.yaml").write_text((tmp_path / "a" / "dupe.yaml").read_text())  # in one folder too
    [line] = registry.declared_twice([str(tmp_path / "a")])
    assert f"by {tmp_path / 'a' / 'dupe.yaml'} and by {tmp_path / 'a' / 'dupe2.yaml'}" in line


def test_task_yamls_in_subfolders_count_as_lm_eval_indexes_them(tmp_path):
    """lm-eval indexes every YAML below an include folder (its own `task/name.yaml` layout)."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.yaml").write_text("task: same\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.yaml").write_text("task: hidden\n")
    assert set(registry.folder_evals(tmp_path)) == {"same"}
    [line] = registry.declared_twice([str(tmp_path)])
    assert str(tmp_path / "a" / "t.yaml") in line and str(tmp_path / "b" / "t.yaml") in line
