"""``forgetscope run``: fine-tune a base model by a recipe, snapshot it on a schedule and score
every snapshot, then write the forgetting curves.

Step 0 is always the untouched base. A recipe with one new task is a sequence of one stage
(:mod:`forgetscope.sequence`); the run folder is written through a
:class:`forgetscope.session.RunSession`, as audits and the Trainer callback write theirs.
Evaluations that already finished in the run folder (an interrupted earlier attempt of the same
recipe) are kept and not recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

from forgetscope import cascade, data, distributed, evaluate, models, registry, replay, sequence, snapshots, train
from forgetscope.recipe import Recipe
from forgetscope.session import RunSession


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the resolved recipe, minus fields that do not change results (name, runs_dir), with
    each file it reads as its contents: the same recipe file beside other data, or data edited
    after an interrupted run, is another run; the same files read from another folder (the run
    folder's ``recipe.yaml``, a moved project) are the same run."""
    data = recipe.absolute().to_dict()
    data.pop("name")
    data.pop("runs_dir")
    for task in [data["task"], *(stage["task"] for stage in data["stages"])]:
        task["path"] = _contents(task["path"], every_file=True)
    if data["replay"]:
        data["replay"]["path"] = _contents(data["replay"]["path"], every_file=True)
    data["evals"]["include"] = [_contents(folder) for folder in data["evals"]["include"]]
    return hashlib.sha256(repr(data).encode()).hexdigest()[:16]


def _contents(path: str | None, every_file: bool = False) -> str | None:
    """A hash of a file's bytes, or of a folder's files, names and bytes: with ``every_file`` all of
    them (a dataset ``save_to_disk`` wrote), else its task YAMLs and the Python modules beside them
    (their ``!function`` hooks)."""
    if path is None:
        return None
    root = Path(path)
    yamls = registry.task_yamls(root) if root.is_dir() and not every_file else []
    files = sorted({*yamls, *(py for folder in {y.parent for y in yamls} for py in folder.glob("*.py"))})
    if every_file and root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    files = files if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        name = str(file.relative_to(root)) if root.is_dir() else ""
        digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def run(recipe: Recipe) -> Path:
    """Run a recipe end to end and return the run folder (``runs/<name>``).

    Everything that can fail on bad input (the model, the data, the evals' data) is checked before
    the run folder is written; a folder that a different recipe wrote is never touched, and one
    that another process is using is refused. A run that fails (a diverging loss, an error) is
    marked ``failed`` in its manifest; its finished snapshots and evaluations stay.
    """
    distributed.init()
    session = _session(recipe, main_process=distributed.is_main())
    with session.locked():
        if session.finished():
            return session.root
        return _run(recipe, session, session.identity["recipe_hash"])


def check_folder(recipe: Recipe) -> None:
    """Refuse, before any run starts, a recipe whose run folder holds a run of another recipe (for
    commands that run several: each is checked before the first trains)."""
    _session(recipe).check_identity()


def _session(recipe: Recipe, main_process: bool = True) -> RunSession:
    return RunSession(
        Path(recipe.runs_dir) / recipe.name,
        {"recipe_hash": recipe_hash(recipe)},
        "a run of a different recipe (or of this one before its data or eval files changed: the run hashes "
        "their contents); choose another name (--set name=...) or remove that folder",
        main_process=main_process,
    )


def _run(recipe: Recipe, session: RunSession, run_hash: str) -> Path:
    with distributed.main_first():  # rank 0 converts the model (once, cached), the others load it
        model_path = models.resolve(recipe.base, recipe.base_dir)
    model, tokenizer = models.load(model_path, recipe.trust_remote_code, recipe.allow_pickle)
    train.check_lora_targets(model, recipe)
    stages = sequence.stage_recipes(recipe)
    chat = data.uses_chat_template(stages[0].task, tokenizer)
    stage_data = sequence.stage_data(recipe, tokenizer)  # every stage's data is checked before anything is written
    replay.check_file(recipe, tokenizer)
    steps = sequence.schedule(recipe)
    base_fp = evaluate.fingerprint(model)  # hashed once: keys the drift probe's samples and the replay buffer
    with distributed.main_first():  # rank 0 samples the drift probe's text (cached), the others read it
        suite = evaluate.prepare_suite(recipe.scored_evals, recipe.base_dir, chat, model, tokenizer, base_fp)
    session.start(
        suite,
        tokenizer,
        {"recipe.yaml": recipe.absolute().to_yaml()},
        base=recipe.base,
        base_path=model_path,
        method=recipe.method,
        seed=recipe.train.seed,
        snapshot_steps=steps,
        chat_template=chat,
        bf16=train.use_bf16(recipe.train.precision),
        processes=distributed.launched(),
        trust_remote_code=recipe.trust_remote_code,
        allow_pickle=recipe.allow_pickle,
        stages=sequence.manifest_entry(recipe) if recipe.stages else None,
    )
    probes = snapshots.probe_steps(recipe.cascade.every, steps, recipe.train.steps) if recipe.cascade else []
    if recipe.cascade:  # cheap probes at every probe step, the full battery where the cascade decides
        with distributed.main_first():  # it needs the untouched base: before prepare_model
            session.cascade = cascade.start(recipe, suite, steps, session.layout, model, tokenizer, chat, base_fp)
    model = train.prepare_model(model, recipe)

    def take(current, step: int, tokens: int) -> dict[str, float]:
        train.check_finite(current, step)
        meta = {"method": recipe.method, "recipe_hash": run_hash, "base": model_path}
        weights = recipe.snapshots.keep_weights and step > 0 and step in steps  # probe steps keep no weights
        return session.scalars(session.score(current, step, tokens, meta, weights=weights))

    def on_resume(checkpoint: str) -> None:
        print(f"forgetscope: resuming {session.root} from {checkpoint}")
        session.update(resumed_from=checkpoint)

    tick = time.time()
    with session.failing():
        log_history = sequence.train_stages(
            recipe, model, tokenizer, stage_data, steps, take, session.root / "trainer", base_fp, on_resume, probes
        )
        train_seconds = time.time() - tick - sum(session.eval_s.values())
        method = (
            f"{recipe.method} + {recipe.replay.source} replay ({recipe.replay.loss})"
            if recipe.replay
            else recipe.method
        )
        session.write_train_log(log_history, title=f"{recipe.name}: training losses")
        session.finish(
            recipe.name,
            Path(recipe.source).stem if recipe.source else recipe.name,
            recipe.method,
            title=f"{recipe.name}: {method} on {recipe.base}",
            timings={"train_s": round(train_seconds, 1)},
            train_log=log_history,
            replay={**dataclasses.asdict(recipe.replay), "coeff": replay.coeff(recipe.replay)}
            if recipe.replay
            else None,
        )
    return session.root
