"""``forgetscope audit``: score checkpoints trained elsewhere against their base.

A checkpoint is a folder holding either a full model (``config.json`` + weights) or a peft
adapter (``adapter_config.json``); a folder of them (e.g. a Trainer output folder with
``checkpoint-*`` inside) is expanded. The base is step 0. The base is loaded once; adapters are
swapped into it one after another, full checkpoints are loaded one at a time. The run folder has
the same layout as ``forgetscope run`` writes, so curves, reports and gates read it alike.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from forgetscope import curves, data, evaluate, figures, io, models, snapshots, stats
from forgetscope.errors import UserError
from forgetscope.recipe import EvalConfig, TaskConfig


class AuditError(UserError):
    """The checkpoints or settings of an audit cannot be used."""


def _is_checkpoint(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / "config.json").is_file()


def _step_of(path: Path) -> int | None:
    state = path / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    match = re.search(r"(\d+)$", path.name)
    return int(match[1]) if match else None


def find_checkpoints(folders: list[str]) -> list[tuple[int, Path]]:
    """(step, folder) for every checkpoint in ``folders``, sorted by step.

    The step comes from ``trainer_state.json``, else from the trailing number of the folder name
    (``checkpoint-500``, ``step-000050``), else from the order given.
    """
    found: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise AuditError(f"--checkpoints: no such folder {str(folder)!r}")
        if _is_checkpoint(folder):
            found.append(folder)
            continue
        inside = sorted((p for p in folder.iterdir() if p.is_dir() and _is_checkpoint(p)), key=lambda p: (_step_of(p) or 0, p.name))
        if not inside:
            raise AuditError(
                f"--checkpoints: {str(folder)!r} holds no checkpoint (a folder with config.json or "
                "adapter_config.json, or subfolders such as checkpoint-100/ that have one)"
            )
        found.extend(inside)
    steps = [_step_of(p) for p in found]
    if None in steps or len(set(steps)) != len(steps) or 0 in steps:
        steps = list(range(1, len(found) + 1))  # no usable step numbers: order as given
    return sorted(zip(steps, found))


def audit(base: str, checkpoints: list[str], evals: EvalConfig, name: str = "audit", runs_dir: str = "runs",
          chat_template: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """Score ``base`` (step 0) and every checkpoint; write ``<runs_dir>/<name>`` like a run."""
    problems = models.check_reference(base, Path.cwd())
    problems += evaluate.check_eval_names([*evals.new, *evals.general], evaluate.include_paths(evals, Path.cwd()))
    if problems:
        raise AuditError("\n".join(problems))
    found = find_checkpoints(checkpoints)
    layout = snapshots.RunLayout(Path(runs_dir) / name)
    settings = {"base": base, "checkpoints": [str(p.resolve()) for _, p in found], "evals": asdict(evals),
                "chat_template": chat_template}
    if layout.manifest.is_file() and layout.read_manifest().get("audit") != settings:
        raise AuditError(f"{layout.root} holds a different run; choose another --name or remove that folder")

    started = time.time()
    base_path = models.resolve(base)
    model, tokenizer = models.load(base_path, trust_remote_code, allow_pickle)
    chat = data.uses_chat_template(TaskConfig(chat_template=chat_template), tokenizer)
    suite = evaluate.prepare_suite(evals, Path.cwd(), chat, model, tokenizer)
    kinds = {"lora" if (p / "adapter_config.json").is_file() else "full" for _, p in found}
    method = kinds.pop() if len(kinds) == 1 else "mixed"
    layout.root.mkdir(parents=True, exist_ok=True)
    io.write_text(layout.root / "audit.yaml", yaml.safe_dump(settings, sort_keys=False))
    layout.update_manifest(status="running", kind="audit", audit=settings, base_path=base_path, method=method,
                           snapshot_steps=[0, *(s for s, _ in found)], chat_template=chat,
                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    eval_s: dict[str, float] = {}

    def score(current, step: int, source: str) -> None:
        snapshots.save_snapshot(layout, step, current, tokenizer, {"step": step, "source": source}, weights=False)
        if step in layout.eval_steps():
            return
        tick = time.time()
        evaluation = evaluate.evaluate_model(current, tokenizer, suite, base_only=step == 0)
        eval_s[snapshots.step_name(step)] = round(time.time() - tick, 2)
        snapshots.save_eval(layout, step, _tokens(source), evaluation)
        print(f"forgetscope: step {step} ({source}): " + curves.headline(evaluation["results"]))

    score(model, 0, base)
    adapters, active = None, None  # the base wrapped by peft once the first adapter arrives; its adapter
    for step, folder in found:
        if (folder / "adapter_config.json").is_file():
            from peft import PeftModel

            if adapters is None:
                active = f"step{step}"
                adapters = PeftModel.from_pretrained(model, str(folder), adapter_name=active)
            elif _same_shape(adapters.peft_config[active], folder):  # overwrite the adapter's weights in place
                from peft.utils import load_peft_weights, set_peft_model_state_dict

                set_peft_model_state_dict(adapters, load_peft_weights(str(folder)), adapter_name=active)
            else:  # swap: load the next adapter into the same base, drop the previous one
                adapters.load_adapter(str(folder), adapter_name=f"step{step}")
                adapters.set_adapter(f"step{step}")
                adapters.delete_adapter(active)
                active = f"step{step}"
            score(adapters, step, str(folder))
        else:
            full, _ = models.load(str(folder), trust_remote_code, allow_pickle)
            score(full, step, str(folder))
            del full

    table = curves.write_curves(layout, run=name, recipe="audit", method=method)
    figures.save(figures.plot_curves(table, title=f"{name}: audit of {len(found)} checkpoints against {base}"), layout.figure)
    summary = stats.final_vs_base(layout, table)
    print(f"\nforgetscope: step {summary[0]['step']} vs the base (step 0), paired over items:\n" + stats.format_summary(summary))
    layout.update_manifest(status="finished", final_vs_base=summary,
                           timings={"total_s": round(time.time() - started, 2), "eval_s": eval_s})
    return layout.root


def _same_shape(config, folder: Path) -> bool:
    """Whether the adapter in ``folder`` has the same configuration (rank, targets, scaling) as ``config``."""
    from peft import PeftConfig

    ignore = {"base_model_name_or_path", "revision", "inference_mode", "task_type"}
    theirs = PeftConfig.from_pretrained(str(folder)).to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ignore} == {k: v for k, v in theirs.items() if k not in ignore}


def _tokens(source: str) -> int:
    """Tokens seen, when the checkpoint's trainer_state.json recorded them (else 0)."""
    state = Path(source) / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text()).get("num_input_tokens_seen", 0) or 0)
    return 0
