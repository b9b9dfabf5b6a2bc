"""``forgetscope audit``: score checkpoints trained elsewhere against their base.

A checkpoint is a folder holding a full model (``config.json`` + weights, sharded or not) or a
peft adapter (``adapter_config.json``, also with ``modules_to_save`` or resized embeddings), or
a Hugging Face id of either. A folder of them (the ``output_dir`` of HF Trainer, TRL or axolotl,
with ``checkpoint-*`` inside) is expanded; the final model such a trainer saves beside its
checkpoints is scored too when it is not one of them. A checkpoint without tokenizer files is
scored with its base's tokenizer. The base is step 0 and is loaded once; adapters are swapped
into it one after another, full checkpoints are loaded one at a time. The run folder is written
through a :class:`forgetscope.session.RunSession`, with the same layout as ``forgetscope run``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from forgetscope import data, evaluate, io, models, registry, validate
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
    state = path / "trainer_state.json"
    return json.loads(state.read_text()) if state.is_file() else {}


def _step_of(path: Path) -> int | None:
    state = _trainer_state(path)
    if "global_step" in state:
        return int(state["global_step"])
    match = re.search(r"(\d+)$", path.name)
    return int(match[1]) if match else None


def _final_step(folder: Path, inside: list[Path]) -> int | None:
    """The step of the final model a trainer saved in its output folder beside ``checkpoint-*``:
    from its own trainer_state.json, else the run's ``max_steps`` recorded by its checkpoints."""
    own = _trainer_state(folder).get("global_step")
    if own is not None:
        return int(own)
    steps = [_trainer_state(p).get("max_steps") for p in inside]
    return int(max(s for s in steps if s)) if any(steps) else None


def find_checkpoints(refs: list[str], allow_pickle: bool = False) -> list[Checkpoint]:
    """Every checkpoint that ``refs`` name, sorted by step.

    The step comes from ``trainer_state.json``, else from the trailing number of the folder name
    (``checkpoint-500``, ``step-000050``); when some have none (a Hugging Face id, a folder
    named ``final``) or two share one, the checkpoints are numbered 1, 2, ... in the order given.
    """
    found: list[tuple[Path, str, int | None]] = []
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
        inside = sorted(
            (p for p in folder.iterdir() if p.is_dir() and _is_checkpoint(p)), key=lambda p: (_step_of(p) or 0, p.name)
        )
        if not inside and not _is_checkpoint(folder):
            raise AuditError(
                f"--checkpoints: {ref!r} holds no checkpoint (a folder with config.json or "
                "adapter_config.json, or subfolders such as checkpoint-100/ that have one)"
            )
        found.extend((p, str(p), _step_of(p)) for p in inside)
        if _is_checkpoint(folder) and not inside:
            found.append((folder, ref, _step_of(folder)))
        elif _is_checkpoint(folder):  # the final model, saved beside the checkpoints
            final = _final_step(folder, inside)
            if final is None:
                print(
                    f"forgetscope: {ref} also holds a model, left out: its step is unknown (no trainer_state.json); "
                    "give it alone to score it"
                )
            elif final not in {_step_of(p) for p in inside}:
                found.append((folder, ref, final))
    folders = [folder.resolve() for folder, _, _ in found]
    twice = next((source for i, (_, source, _) in enumerate(found) if folders[i] in folders[:i]), None)
    if twice is not None:
        raise AuditError(f"--checkpoints: {twice} is given twice (itself, or inside a folder given too); give it once")
    steps = [step for _, _, step in found]
    if None in steps or len(set(steps)) != len(steps) or 0 in steps:
        steps = list(range(1, len(found) + 1))  # no usable step numbers: order as given
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
    settings = {
        "base": base,
        "checkpoints": [str(c.folder.resolve()) if Path(c.source).is_dir() else c.source for c in found],
        "evals": asdict(evals),
        "chat_template": chat_template,
    }
    session = RunSession(
        Path(runs_dir) / name, {"audit": settings}, "a different run; choose another --name or remove that folder"
    )
    with session.locked():
        if session.finished():
            return session.root
        base_path = models.resolve(base)
        model, tokenizer = models.load(base_path, trust_remote_code, allow_pickle)
        chat = data.uses_chat_template(TaskConfig(chat_template=chat_template), tokenizer)
        _check_vocabularies(found, tokenizer, trust_remote_code)
        _check_adapter_shapes(found, model)
        _check_architectures(found, model, trust_remote_code)
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
        )
        with session.failing():
            session.score(model, 0, meta={"source": base}, label=f" ({base})")
            _score_checkpoints(session, model, tokenizer, found, trust_remote_code, allow_pickle)
            session.finish(name, "audit", method, title=f"{name}: audit of {len(found)} checkpoints against {base}")
    return session.root


def _score_checkpoints(
    session: RunSession, model, tokenizer, found: list[Checkpoint], trust_remote_code: bool, allow_pickle: bool
) -> None:
    """Score every checkpoint: adapters in the base loaded once (its embeddings resized first when
    the adapters saved resized ones), full models one at a time."""
    from peft import PeftModel

    adapters, active = None, None  # the base wrapped by peft once the first adapter arrives; its adapter
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
        _fit_vocabulary(session, model, folder, adapters is not None)
        if adapters is None:
            active = f"step{step}"
            try:
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


def _check_vocabularies(found: list[Checkpoint], tokenizer, trust_remote_code: bool) -> None:
    """Before anything is written: every full checkpoint without tokenizer files must have an
    embedding for every token of the base's tokenizer, which it is scored with."""
    from transformers import AutoConfig

    problems = []
    for checkpoint in found:
        if checkpoint.adapter or models.has_tokenizer(checkpoint.folder):
            continue
        config = AutoConfig.from_pretrained(
            str(checkpoint.folder), trust_remote_code=trust_remote_code
        ).get_text_config()
        if getattr(config, "vocab_size", None) and config.vocab_size < len(tokenizer):
            problems.append(
                f"--checkpoints: {checkpoint.source}: has no tokenizer files, and its vocabulary ({config.vocab_size} "
                f"tokens) is smaller than its base's tokenizer ({len(tokenizer)}); save the tokenizer it was trained "
                "with into the folder (tokenizer.save_pretrained, or pass processing_class to the Trainer) or give "
                "the --base it was trained from"
            )
    if problems:
        raise AuditError("\n".join(problems))


SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""Config fields a fine-tune keeps: a full checkpoint that differs in one was not made from the base."""


def _check_architectures(found: list[Checkpoint], model, trust_remote_code: bool) -> None:
    """Before anything is written: every full checkpoint has the base's architecture
    (:data:`SHAPE_FIELDS`; the vocabulary may have grown), else the audit would report the
    difference between two unrelated models as forgetting."""
    from transformers import AutoConfig

    base = model.config.get_text_config()
    for checkpoint in (c for c in found if not c.adapter):
        config = AutoConfig.from_pretrained(str(checkpoint.folder), trust_remote_code=trust_remote_code)
        config = config.get_text_config()
        differ = [f for f in SHAPE_FIELDS if getattr(config, f, None) != getattr(base, f, None)]
        if differ:
            theirs = ", ".join(f"{f} {getattr(config, f, None)}" for f in differ)
            ours = ", ".join(f"{f} {getattr(base, f, None)}" for f in differ)
            raise AuditError(
                f"--checkpoints: {checkpoint.source}: not a fine-tune of the --base ({theirs}; the base has {ours}); "
                "give the base it was trained from"
            )


def _check_adapter_shapes(found: list[Checkpoint], model) -> None:
    """Before anything is written: every LoRA matrix of every adapter must fit the base's linear
    layer it targets (A: r x the layer's inputs, B: the layer's outputs x r), as it does on the
    base it was trained from. The output embeddings are left to peft (a resized vocabulary)."""
    import torch

    head = model.get_output_embeddings()
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
                raise AuditError(
                    f"--checkpoints: {checkpoint.source}: its adapter does not fit the --base (size mismatch for "
                    f"{key}: {tuple(shape)}, where the base's layer maps {layer.in_features} to {layer.out_features}); "
                    "give the base it was trained from"
                )


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors an adapter saved, read from the safetensors header (nothing is
    loaded: peft loads the weights once, when the adapter is applied); pickled adapters are loaded."""
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        from peft.utils import load_peft_weights

        return {k: tuple(t.shape) for k, t in load_peft_weights(str(folder)).items()}
    from safetensors import safe_open

    with safe_open(str(file), "pt") as weights:
        return {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118 (not iterable)


def _fit_vocabulary(session: RunSession, model, folder: Path, wrapped: bool) -> None:
    """Resize the base's embeddings to those an adapter saved (peft saves them when training
    resized the vocabulary), before the first adapter is loaded. Such adapters overwrite base
    weights, so from then on snapshots are fingerprinted whole, not as base + adapter."""
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    rows = {
        shape[0]
        for k, shape in _adapter_shapes(folder).items()
        if f"{embedding}." in k and "lora_" not in k and len(shape) == 2
    }
    if not rows:
        return
    session.suite.base_fingerprint = None  # the adapter replaces base weights (embeddings): hash whole models
    current = model.get_input_embeddings().weight.shape[0]
    if rows == {current}:
        return
    if wrapped or len(rows) > 1:
        raise AuditError(
            f"--checkpoints: {folder} has embeddings of {sorted(rows)} tokens, unlike the adapters before it "
            f"({current}); audit adapters of different vocabularies separately"
        )
    model.resize_token_embeddings(rows.pop())


def _same_shape(config, folder: Path) -> bool:
    """Whether the adapter in ``folder`` has the same configuration (rank, targets, scaling) as ``config``."""
    from peft import PeftConfig

    ignore = {"base_model_name_or_path", "revision", "inference_mode", "task_type"}
    theirs = PeftConfig.from_pretrained(str(folder)).to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ignore} == {
        k: v for k, v in theirs.items() if k not in ignore
    }
