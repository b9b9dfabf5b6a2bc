"""``forgetscope audit``: score checkpoints trained elsewhere against their base.

A checkpoint is a folder holding a full model (``config.json`` + weights, sharded or not) or a
peft adapter (``adapter_config.json``, also with ``modules_to_save`` or resized embeddings), or
a Hugging Face id of either. A folder of them (the ``output_dir`` of HF Trainer, TRL or axolotl,
with ``checkpoint-*`` inside) is expanded; the final model such a trainer saves beside its
checkpoints is scored too, at the step where training ended, when that is not a checkpoint's. A
checkpoint without tokenizer files is scored with its base's tokenizer. The base is step 0 and
is loaded once; adapters are swapped into it one after another (a fresh base after one that
changed base weights), full checkpoints are loaded one at a time. The run folder is written
through a :class:`forgetscope.session.RunSession`, with the same layout as ``forgetscope run``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from forgetscope import data, evaluate, io, models, registry, seams, validate
from forgetscope.errors import UserError
from forgetscope.recipe import EvalConfig, TaskConfig
from forgetscope.session import RunSession


class AuditError(UserError):
    """The checkpoints or settings of an audit cannot be used."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to score: its step, its local folder, and what the user gave for it."""

    step: int
    folder: Path
    source: str

    @property
    def adapter(self) -> bool:
        return (self.folder / "adapter_config.json").is_file()


def _is_checkpoint(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / "config.json").is_file()


def _trainer_state(path: Path) -> dict:
    """The ``trainer_state.json`` a Trainer saved in ``path`` ({} when there is none)."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return {}
    try:
        parsed = json.loads(state.read_bytes())
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        if "global_step" in parsed and not isinstance(parsed["global_step"], int):
            raise ValueError(f"global_step {parsed['global_step']!r} is not a whole number")
    except ValueError as err:
        raise AuditError(
            f"--checkpoints: {state} is not a trainer state ({_first_line(err)}); restore it, or remove it to "
            "take the step from the folder's name"
        ) from None
    return parsed


STEP_NAME = re.compile(r"(?:.*[-_])?(?:global_step|step|iteration|iter)?(\d+)", re.IGNORECASE)
"""A folder name that carries a step: a number standing alone at its end after ``-`` or ``_``
(``checkpoint-500``, ``step_000050``, ``iter_0001000``, ``run-3``), one right after ``step``,
``global_step`` or ``iter`` (``step50``, ``global_step50``), or a name of only digits. Digits glued
to other letters are no step: ``final_bf16``, ``model-fp16``, ``lora_r16``, ``model-v2``."""


def _step_of(path: Path) -> int | None:
    """A checkpoint's step: from its ``trainer_state.json``, else from its name (:data:`STEP_NAME`)."""
    state = _trainer_state(path)
    if "global_step" in state:
        return int(state["global_step"])
    match = STEP_NAME.fullmatch(path.name)
    return int(match[1]) if match else None


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _final_step(folder: Path, inside: list[Path]) -> tuple[int | None, str]:
    """The step where training ended, for the final model a trainer saved in its output folder
    beside ``checkpoint-*``; None, and why, when no file records it.

    From the folder's own trainer_state.json (``trainer.save_state()``), else from its latest
    checkpoint: transformers' Trainer saves a checkpoint at the step where training stops when it
    saves by steps or epochs (at ``max_steps``, and where EarlyStoppingCallback stopped it if that
    is a save step; that checkpoint records ``should_training_stop``). A run that kept a best
    checkpoint (``best_model_checkpoint``: early stopping, ``load_best_model_at_end``) may have
    stopped between checkpoints, so without that record its end is unknown; any other ran its
    planned ``max_steps``, and its checkpoint there was removed."""
    own = _trainer_state(folder)
    if "global_step" in own:
        return int(own["global_step"]), ""
    states = [s for s in map(_trainer_state, inside) if "global_step" in s]
    if not states:
        return None, "no trainer_state.json records its step"
    latest = max(states, key=lambda s: s["global_step"])
    step, planned = int(latest["global_step"]), int(latest.get("max_steps") or 0)
    stopped = latest.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {}).get("should_training_stop")
    if step >= planned or stopped:
        return step, ""
    if latest.get("best_model_checkpoint"):
        return None, f"training kept a best checkpoint and may have stopped after step {step}, its latest checkpoint"
    return planned, ""


def _best_checkpoint(folder: Path, inside: list[Path]) -> str | None:
    """The best checkpoint a trainer recorded (``best_model_checkpoint`` in the output folder's
    trainer_state.json, else in its latest checkpoint's), whose weights the final model holds
    when the run set ``load_best_model_at_end``."""
    states = [_trainer_state(p) for p in [folder, *reversed(inside)]]
    return next((s["best_model_checkpoint"] for s in states if s.get("best_model_checkpoint")), None)


def _numbered_by_order(found: list[tuple[Path, str, int | None]]) -> str | None:
    """Why the checkpoints cannot be ordered by their own steps (None when they can)."""
    steps = [step for _, _, step in found]
    missing = next((source for _, source, step in found if step is None), None)
    if missing is not None:
        return f"{missing} has no step number (no trainer_state.json, no step in its name such as checkpoint-500)"
    twice = next((step for i, step in enumerate(steps) if step in steps[:i]), None)
    if twice is not None:
        return f"{' and '.join(source for _, source, step in found if step == twice)} are both step {twice}"
    zero = next((source for _, source, step in found if step == 0), None)
    return f"{zero} is step 0, the base's step" if zero is not None else None


def _final_models(
    folder: Path, ref: str, inside: list[Path], unnumbered: list[Path]
) -> list[tuple[Path, str, int | None]]:
    """The final models of a trainer's output folder beside its numbered checkpoints ``inside``:
    the model saved into the folder itself, then each checkpoint subfolder without a step in its
    name (``unnumbered``: axolotl's ``merged/``, a ``final/`` or ``*-bf16/`` copy), all at the step
    where training ended (:func:`_final_step`). One whose step is already scored (a checkpoint's,
    or an earlier final model's) or unknown is left out, in one line."""
    final, why = _final_step(folder, inside)
    best = _best_checkpoint(folder, inside)
    note = f"; best_model_checkpoint {best}: with load_best_model_at_end it holds those weights" if best else ""
    scored = {step: p.name for p in inside if (step := _step_of(p)) is not None}
    found: list[tuple[Path, str, int | None]] = []
    for model in ([folder] if _is_checkpoint(folder) else []) + unnumbered:
        source = ref if model == folder else str(model)
        what = f"{ref}: its final model" if model == folder else f"{source}: a final model (no step in its name)"
        if final is None:
            print(f"forgetscope: {what} is left out: {why}; give it alone to score it", file=sys.stderr)
        elif final in scored:
            same = "" if best and Path(best).name == scored[final] else note  # those weights are the ones scored
            print(
                f"forgetscope: {what} is left out: training ended at step {final}, scored from {scored[final]}{same}",
                file=sys.stderr,
            )
        else:
            found.append((model, source, final))
            scored[final] = source
            if note:
                print(f"forgetscope: {what} is step {final}{note}", file=sys.stderr)
    return found


def find_checkpoints(refs: list[str], allow_pickle: bool = False) -> list[Checkpoint]:
    """Every checkpoint that ``refs`` name, sorted by step.

    The step comes from ``trainer_state.json``, else from the folder name (:data:`STEP_NAME`:
    ``checkpoint-500``, ``step-000050``, not ``final_bf16``). In a trainer's output folder, the
    final model saved into the folder and the subfolders without a step (axolotl's ``merged/``)
    are the end of training (:func:`_final_models`). When a checkpoint given has no step (a Hugging
    Face id, a folder named ``final``), two share one or one is 0, all are numbered 1, 2, ... in
    the order given, those without a step last, with a warning naming it.
    Checkpoints of several trainer output folders make one curve by step, with a warning naming
    the folders.
    """
    found: list[tuple[Path, str, int | None]] = []
    runs: list[str] = []  # the folders whose checkpoints are merged: each output folder, each checkpoint's parent
    for ref in refs:
        folder = Path(ref)
        if not folder.is_dir():
            if not models.is_hub_id(ref):
                raise AuditError(
                    f"--checkpoints: no such folder {ref!r} (give a checkpoint folder, a folder of them "
                    "such as a Trainer output_dir, or a Hugging Face id org/name)"
                )
            try:
                found.append((models.hub_folder(ref, allow_pickle), ref, None))
            except models.ModelError as err:
                raise AuditError(f"--checkpoints: {err}") from None
            continue
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and _is_checkpoint(p))
        inside = sorted((p for p in subfolders if _step_of(p) is not None), key=lambda p: (_step_of(p), p.name))
        unnumbered = [p for p in subfolders if p not in inside]
        if not inside:  # a folder of models none of which has a step: numbered by name below
            inside, unnumbered = unnumbered, []
        if not inside and not _is_checkpoint(folder):
            raise AuditError(
                f"--checkpoints: {ref!r} holds no checkpoint (a folder with config.json or "
                "adapter_config.json, or subfolders such as checkpoint-100/ that have one)"
            )
        found.extend((p, str(p), _step_of(p)) for p in inside)
        if inside:
            runs.append(ref)
        elif _is_checkpoint(folder):  # a checkpoint given alone: its run is the folder it sits in
            runs.append(str(folder.parent))
        if _is_checkpoint(folder) and not inside:
            found.append((folder, ref, _step_of(folder)))
        elif _is_checkpoint(folder) or unnumbered:  # the final models, saved beside the checkpoints
            found.extend(_final_models(folder, ref, inside, unnumbered))
    folders = [folder.resolve() for folder, _, _ in found]
    twice = next((source for i, (_, source, _) in enumerate(found) if folders[i] in folders[:i]), None)
    if twice is not None:
        raise AuditError(f"--checkpoints: {twice} is given twice (itself, or inside a folder given too); give it once")
    why = _numbered_by_order(found)
    if why is not None:
        unnumbered_last = sorted(found, key=lambda entry: entry[2] is None)  # stable: else the order given
        order = "in the order given" if unnumbered_last == found else "in the order given, those without one last"
        found = unnumbered_last
        steps = list(range(1, len(found) + 1))
        if len(found) > 1:  # one checkpoint is step 1 whatever its name
            print(
                f"forgetscope: warning: {why}, so all {len(found)} checkpoints are numbered "
                f"{', '.join(map(str, steps[:3]))}{', ...' if len(steps) > 3 else ''} {order}",
                file=sys.stderr,
            )
    else:
        steps = [step for _, _, step in found]
        if len(set(runs)) > 1:
            print(
                f"forgetscope: warning: the checkpoints of {' and '.join(dict.fromkeys(runs))} are merged into one "
                "curve, ordered by their steps; audit each run under its own --name to compare them",
                file=sys.stderr,
            )
    return sorted(
        (Checkpoint(step, folder, source) for step, (folder, source, _) in zip(steps, found)), key=lambda c: c.step
    )


def audit(
    base: str,
    checkpoints: list[str],
    evals: EvalConfig,
    name: str = "audit",
    runs_dir: str = "runs",
    chat_template: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Score ``base`` (step 0) and every checkpoint; write ``<runs_dir>/<name>`` like a run."""
    problems = validate.check_name(name, "--name") + models.check_reference(base, Path.cwd())
    problems += io.out_dir_problems(Path(runs_dir), "--runs-dir")
    problems += registry.check_eval_names([*evals.new, *evals.general], registry.include_paths(evals, Path.cwd()))
    if problems:
        raise AuditError("\n".join(problems))
    found = find_checkpoints(checkpoints, allow_pickle)
    problems = _check_weights(found, allow_pickle) + _check_files(found)
    if problems:
        raise AuditError("\n".join(problems))
    keys = [str(c.folder.resolve()) if Path(c.source).is_dir() else c.source for c in found]
    settings = {"base": base, "checkpoints": keys, "evals": asdict(evals), "chat_template": chat_template}
    contents = {key: _contents(c.folder) for key, c in zip(keys, found)}
    session = RunSession(
        Path(runs_dir) / name,
        {"audit": settings},
        "a different run; choose another --name or remove that folder",
        fixes=AUDIT_FIXES,
    )
    with session.locked():
        _check_unchanged(session, found, contents)
        if session.finished():
            return session.root
        base_path = models.resolve(base)
        model, tokenizer = models.load(base_path, trust_remote_code, allow_pickle)
        if chat_template == "on" and not getattr(tokenizer, "chat_template", None):
            raise AuditError("--chat-template on: the base's tokenizer has no chat template; use auto or off")
        chat = data.uses_chat_template(TaskConfig(chat_template=chat_template), tokenizer)
        problems = _check_vocabularies(found, model, tokenizer, trust_remote_code, chat)
        problems += _check_adapter_shapes(found, model) + _check_architectures(found, model, trust_remote_code)
        if problems:
            raise AuditError("\n".join(problems))
        _warn_other_bases(found, base, base_path)
        suite = evaluate.prepare_suite(evals, Path.cwd(), chat, model, tokenizer)
        kinds = {"lora" if c.adapter else "full" for c in found}
        method = kinds.pop() if len(kinds) == 1 else "mixed"
        session.start(
            suite,
            tokenizer,
            {"audit.yaml": yaml.safe_dump(settings, sort_keys=False)},
            kind="audit",
            base=base,
            base_path=base_path,
            method=method,
            snapshot_steps=[0, *(c.step for c in found)],
            chat_template=chat,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            checkpoint_files=contents,
        )
        with session.failing():
            session.score(model, 0, meta={"source": base}, label=f" ({base})")
            held = _Base(model, base_path, trust_remote_code, allow_pickle)
            del model  # the adapters take it over, and drop it when one changes it
            _score_checkpoints(session, held, tokenizer, found, trust_remote_code, allow_pickle)
            session.finish(name, "audit", method, title=f"{name}: audit of {len(found)} checkpoints against {base}")
    return session.root


AUDIT_FIXES = {
    "memory": "free the GPU of other processes, or audit on a larger GPU",
    "disk": "or point --runs-dir (and FORGETSCOPE_CACHE, which holds the result cache) at a larger disk",
}
"""What to change when an audit runs out of memory or disk, with its own flags (a recipe's keys,
:data:`forgetscope.session.RECIPE_FIXES`, are not the audit's)."""


CONTENT_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt", ".tiktoken", ".jinja")
"""The files of a checkpoint that scoring it reads or that record its step: weights, configs,
tokenizer files, ``trainer_state.json`` (not ``training_args.bin``, nor the optimizer's state)."""


def _contents(folder: Path) -> str:
    """A cheap fingerprint of what a checkpoint folder holds: the name, size and ``mtime_ns`` of
    each of its :data:`CONTENT_SUFFIXES` files, not their bytes (hashing gigabytes of weights
    takes minutes). Saving into the folder again (retraining) changes it; reading does not."""
    entries = []
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name.endswith(CONTENT_SUFFIXES) and file.name != "training_args.bin":
            stat = file.stat()
            entries.append(f"{file.name} {stat.st_size} {stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _check_unchanged(session: RunSession, found: list[Checkpoint], contents: dict[str, str]) -> None:
    """Refuse an audit whose checkpoints were rewritten (retrained into the same folders) since it
    scored them (:func:`_contents`): finished, it would show the old ones' results; resumed, one
    curve would mix old and new steps. Nothing is written."""
    before = session.layout.read_manifest().get("checkpoint_files")
    if not isinstance(before, dict):  # a new audit, or one from a version that did not record them
        return
    changed = [c.source for c, (key, files) in zip(found, contents.items()) if before.get(key) != files]
    if changed:
        which = changed[0] if len(changed) == 1 else f"{changed[0]} and {len(changed) - 1} more"
        raise AuditError(
            f"--checkpoints: the checkpoints changed since the audit in {session.root} scored them ({which}: "
            f"weights, config or tokenizer files saved again); pass another --name to audit them afresh, or remove "
            f"{session.root}"
        )


@dataclass
class _Base:
    """The base model the adapters are loaded into, and where to load a fresh one from."""

    model: Any  # the one in memory (step 0's), until taken
    path: str
    trust_remote_code: bool
    allow_pickle: bool

    def take(self):
        """The base in memory the first time (it is then the caller's); a freshly loaded one after."""
        model, self.model = self.model, None
        return model if model is not None else models.load(self.path, self.trust_remote_code, self.allow_pickle)[0]


def _score_checkpoints(
    session: RunSession, base: _Base, tokenizer, found: list[Checkpoint], trust_remote_code: bool, allow_pickle: bool
) -> None:
    """Score every checkpoint: full models one at a time; adapters one after another in one base,
    each as ``PeftModel.from_pretrained`` on a fresh base scores it. An adapter that saves more
    than LoRA matrices (modules_to_save copies, embeddings, a resized vocabulary) overwrites base
    weights as it loads, so it gets a freshly loaded base (resized first when it saved resized
    embeddings), and so does the adapter after it."""
    from peft import PeftModel

    model, adapters, active = None, None, None  # the base and its peft wrapper; the adapter loaded in it
    changed = False  # whether the adapter loaded in it changed base weights
    base_fingerprint = session.suite.base_fingerprint
    for checkpoint in found:
        folder, step = checkpoint.folder, checkpoint.step
        has_own = models.has_tokenizer(folder)
        meta, label = {"source": checkpoint.source}, f" ({checkpoint.source})"
        tokens = int(_trainer_state(folder).get("num_input_tokens_seen", 0) or 0)
        if not checkpoint.adapter:
            full, own = models.load(str(folder), trust_remote_code, allow_pickle, None if has_own else tokenizer)
            session.score(full, step, tokens, meta, tokenizer=own, label=label)
            del full
            continue
        own = models.load_tokenizer(str(folder), trust_remote_code) if has_own else tokenizer
        lora_only = _lora_only(folder)
        if adapters is not None and (changed or not lora_only):
            model = adapters = None  # the previous adapter or this one changes the base: drop it before loading
        changed = not lora_only
        # an adapter that overwrites base weights is hashed whole, the others as the base's hash + theirs
        session.suite.base_fingerprint = base_fingerprint if lora_only else None
        if adapters is None:
            model = base.take()
            _fit_vocabulary(model, folder)
            active = f"step{step}"
            try:
                with seams.peft_deprecation_quiet():
                    adapters = PeftModel.from_pretrained(model, str(folder), adapter_name=active)
            except RuntimeError as err:  # torch's load_state_dict: "size mismatch for ..."
                mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), None)
                if mismatch is None:
                    raise
                raise AuditError(
                    f"--checkpoints: {checkpoint.source}: its adapter does not fit the --base ({mismatch}); "
                    "give the base it was trained from"
                ) from None
        elif _same_shape(adapters.peft_config[active], folder):  # overwrite the adapter's weights in place
            from peft.utils import load_peft_weights, set_peft_model_state_dict

            set_peft_model_state_dict(adapters, load_peft_weights(str(folder)), adapter_name=active)
        else:  # swap: load the next adapter into the same base, drop the previous one
            adapters.load_adapter(str(folder), adapter_name=f"step{step}")
            adapters.set_adapter(f"step{step}")
            adapters.delete_adapter(active)
            active = f"step{step}"
        models.check_vocabulary(adapters, own, str(folder), "its own" if has_own else "its base's")
        session.score(adapters, step, tokens, meta, tokenizer=own, label=label)
    session.suite.base_fingerprint = base_fingerprint


def _check_weights(found: list[Checkpoint], allow_pickle: bool) -> list[str]:
    """Before anything is written: every full checkpoint has safetensors weights (pickle-based
    ones only with ``allow_pickle``: loading them can run code). Adapters load as peft loads them
    (pickled ones as tensors only)."""
    problems = []
    for checkpoint in (c for c in found if not c.adapter and not allow_pickle):
        problem = models.weights_problem(checkpoint.folder)
        if problem is not None:
            trust = "; add --allow-pickle if you trust the source" if "pickle" in problem else ""
            problems.append(f"--checkpoints: {checkpoint.source}{problem}{trust}")
    return problems


JSON_FILES = (
    "config.json",
    "adapter_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
"""The JSON files of a checkpoint that loading it reads (``generation_config.json`` is skipped when
it does not load, so it is not checked)."""


def _check_files(found: list[Checkpoint]) -> list[str]:
    """Before anything is loaded or written, and cheaply (one line per checkpoint, naming the
    file): its JSON files parse as objects, every shard its index names is there, and its
    safetensors files are whole (their headers read and cover the files: a copy cut short fails
    here). Loading them stays wrapped too (:func:`forgetscope.models.unloadable`)."""
    problems = []
    for checkpoint in found:
        problem = _files_problem(checkpoint.folder, Path(checkpoint.source))
        if problem is not None:
            problems.append(f"--checkpoints: {problem}")
    return problems


def _files_problem(folder: Path, where: Path) -> str | None:
    """The first damaged file of :func:`_check_files` in ``folder`` (given as ``where``), as
    "<file> <what is wrong>; <the fix>", or None."""
    from safetensors import SafetensorError, safe_open

    again = "save the checkpoint again, or copy it again from where it was saved"
    parsed = {}
    for name in (n for n in JSON_FILES if (folder / n).is_file()):
        try:
            parsed[name] = json.loads((folder / name).read_bytes())
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            return f"{where / name} is not valid JSON ({_first_line(err)}); {again}"
        if not isinstance(parsed[name], dict):
            return f"{where / name} is not a JSON object; {again}"
    weights = [n for n in ("model.safetensors", "adapter_model.safetensors") if (folder / n).is_file()]
    index = "model.safetensors.index.json"
    if index in parsed:
        shards = parsed[index].get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(shard, str) for shard in shards.values()):
            return f"{where / index} has no weight_map of tensor names to shard files; {again}"
        missing = sorted(shard for shard in set(shards.values()) if not (folder / shard).is_file())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return f"{where / index} names {missing[0]}{more}, which is not in the folder; copy every shard of it"
        weights += sorted(set(shards.values()))
    for name in weights:
        try:
            with safe_open(str(folder / name), "pt") as opened:
                opened.keys()  # the header is read and checked against the file's size when it opens
        except (SafetensorError, OSError) as err:
            return f"{where / name} is damaged or cut short ({_first_line(err)}); {again}"
    return None


def _warn_other_bases(found: list[Checkpoint], base: str, base_path: str) -> None:
    """Warn, one line per other base, about adapters whose adapter_config.json names a base other
    than ``--base`` (by its name as given, its folder, or its last path part: the same model often
    sits under other paths, so this is no error)."""
    ours = {base.rstrip("/"), str(Path(base_path)), Path(base).name, Path(base_path).name}
    others: dict[str, list[str]] = {}
    for checkpoint in (c for c in found if c.adapter):
        config = json.loads((checkpoint.folder / "adapter_config.json").read_text())
        theirs = str(config.get("base_model_name_or_path") or "").rstrip("/")
        folder = Path(theirs).expanduser()
        same = folder.is_dir() and str(folder.resolve()) == str(Path(base_path).resolve())
        if theirs and not same and not {theirs, Path(theirs).name} & ours:
            others.setdefault(theirs, []).append(checkpoint.source)
    for theirs, sources in others.items():
        which = f"{sources[0]} was" if len(sources) == 1 else f"{len(sources)} adapters ({sources[0]}, ...) were"
        print(
            f"forgetscope: warning: {which} trained on {theirs!r} (its adapter_config.json), not --base "
            f"{base!r}; scored against another base, the change is not forgetting (ignore this if it is the same "
            "model in another folder)",
            file=sys.stderr,
        )


def _text_config(checkpoint: Checkpoint, trust_remote_code: bool):
    """A full checkpoint's (text) config, read from its config.json; one line when it does not load."""
    from transformers import AutoConfig

    with models.unloadable(checkpoint.source):
        return AutoConfig.from_pretrained(str(checkpoint.folder), trust_remote_code=trust_remote_code).get_text_config()


def _check_vocabularies(found: list[Checkpoint], model, tokenizer, trust_remote_code: bool, chat: bool) -> list[str]:
    """Problems found before anything is written: every token of the tokenizer a checkpoint is
    scored with (its own, which must load, else its base's) has an embedding in it: a full
    checkpoint's ``vocab_size``, the embeddings an adapter saved, else the base's (checked again
    as each one loads); and when the run scores in the chat format (``chat``), that tokenizer
    has a chat template (transformers 5 keeps it in ``chat_template.jinja``, easily left behind)."""
    base_rows = model.get_input_embeddings().weight.shape[0]
    problems = []
    for checkpoint in found:
        if checkpoint.adapter:
            rows = _saved_embedding_rows(model, checkpoint.folder) or base_rows
        else:
            rows = getattr(_text_config(checkpoint, trust_remote_code), "vocab_size", None)
        if not models.has_tokenizer(checkpoint.folder):
            if rows and rows < len(tokenizer):
                problems.append(
                    f"--checkpoints: {checkpoint.source}: has no tokenizer files, and its vocabulary ({rows} "
                    f"tokens) is smaller than its base's tokenizer ({len(tokenizer)}); save the tokenizer it was "
                    "trained with into the folder (tokenizer.save_pretrained, or pass processing_class to the "
                    "Trainer) or give the --base it was trained from"
                )
            continue
        try:
            own = models.load_tokenizer(str(checkpoint.folder), trust_remote_code)
        except Exception as err:  # the tokenizers library raises a bare Exception for a damaged file
            problems.append(
                f"--checkpoints: {checkpoint.source}: its tokenizer files do not load ({type(err).__name__}: "
                f"{_first_line(err)}); save the tokenizer it was trained with into the folder again "
                "(tokenizer.save_pretrained)"
            )
            continue
        problem = models.vocabulary_problem(len(own), rows, checkpoint.source, "its own") if rows else None
        if problem is not None:
            problems.append(f"--checkpoints: {problem}")
        if chat and not getattr(own, "chat_template", None):
            problems.append(
                f"--checkpoints: {checkpoint.source}: its tokenizer has no chat template, and its base's has one "
                "(new-task evals are scored in the chat format); copy chat_template.jinja from the base into the "
                "folder, or pass --chat-template off"
            )
    return problems


SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""Config fields a fine-tune keeps: a full checkpoint that differs in one was not made from the base."""


def _check_architectures(found: list[Checkpoint], model, trust_remote_code: bool) -> list[str]:
    """Problems found before anything is written: every full checkpoint has the base's architecture
    (:data:`SHAPE_FIELDS`; the vocabulary may have grown), else the audit would report the
    difference between two unrelated models as forgetting."""
    base = model.config.get_text_config()
    problems = []
    for checkpoint in (c for c in found if not c.adapter):
        config = _text_config(checkpoint, trust_remote_code)
        differ = [f for f in SHAPE_FIELDS if getattr(config, f, None) != getattr(base, f, None)]
        if differ:
            theirs = ", ".join(f"{f} {getattr(config, f, None)}" for f in differ)
            ours = ", ".join(f"{f} {getattr(base, f, None)}" for f in differ)
            problems.append(
                f"--checkpoints: {checkpoint.source}: not a fine-tune of the --base ({theirs}; the base has {ours}); "
                "give the base it was trained from"
            )
    return problems


def _check_adapter_shapes(found: list[Checkpoint], model) -> list[str]:
    """Problems found before anything is written (one per adapter): every LoRA matrix of every
    adapter must fit the base's linear layer it targets (A: r x the layer's inputs, B: the layer's
    outputs x r), as it does on the base it was trained from. The output embeddings are left to
    peft (a resized vocabulary)."""
    import torch

    head = model.get_output_embeddings()
    problems = []
    for checkpoint in (c for c in found if c.adapter):
        for key, shape in _adapter_shapes(checkpoint.folder).items():
            target, _, matrix = key.rpartition(".lora_")
            if matrix not in ("A.weight", "B.weight") or len(shape) != 2:
                continue
            try:
                layer = model.get_submodule(target.removeprefix("base_model.model."))
            except AttributeError:
                layer = None
            if not isinstance(layer, torch.nn.Linear) or layer is head:
                continue
            fits = shape[1] == layer.in_features if matrix == "A.weight" else shape[0] == layer.out_features
            if not fits:
                problems.append(
                    f"--checkpoints: {checkpoint.source}: its adapter does not fit the --base (size mismatch for "
                    f"{key}: {tuple(shape)}, where the base's layer maps {layer.in_features} to {layer.out_features}); "
                    "give the base it was trained from"
                )
                break
    return problems


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors an adapter saved, read from the safetensors header (nothing is
    loaded: peft loads the weights once, when the adapter is applied); pickled adapters are loaded."""
    from peft.utils import load_peft_weights
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    with models.unloadable(str(folder)):
        if not file.is_file():
            return {k: tuple(t.shape) for k, t in load_peft_weights(str(folder)).items()}
        with safe_open(str(file), "pt") as weights:
            return {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118 (not iterable)


def _lora_only(folder: Path) -> bool:
    """Whether an adapter saved LoRA matrices only (``lora_A``, ``lora_B``, DoRA's magnitudes),
    which peft keeps beside the base's weights; anything else (modules_to_save copies, embeddings,
    other peft methods' tensors) is loaded over or around base layers."""
    return all("lora_" in key for key in _adapter_shapes(folder))


def _saved_embedding_rows(model, folder: Path) -> int | None:
    """The rows of the input embeddings an adapter saved for ``model`` (peft saves them when
    training resized the vocabulary), or None when it saved none."""
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    rows = {
        shape[0]
        for k, shape in _adapter_shapes(folder).items()
        if f"{embedding}." in k and "lora_" not in k and len(shape) == 2
    }
    if len(rows) > 1:
        raise AuditError(
            f"--checkpoints: {folder} has embeddings of {sorted(rows)} tokens in one adapter; give the adapter as "
            "peft saved it"
        )
    return rows.pop() if rows else None


def _fit_vocabulary(model, folder: Path) -> None:
    """Resize a fresh base's embeddings to those an adapter saved, before the adapter is loaded."""
    rows = _saved_embedding_rows(model, folder)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)


def _same_shape(config, folder: Path) -> bool:
    """Whether the adapter in ``folder`` has the same configuration (rank, targets, scaling) as ``config``."""
    from peft import PeftConfig

    ignore = {"base_model_name_or_path", "revision", "inference_mode", "task_type"}
    theirs = PeftConfig.from_pretrained(str(folder)).to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ignore} == {
        k: v for k, v in theirs.items() if k not in ignore
    }
