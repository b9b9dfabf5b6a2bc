"""The recipe: one YAML file that says what to fine-tune, how, and what to measure.

The dataclasses below *are* the schema. Every field carries its documentation in
``metadata["help"]``; ``forgetscope fields`` prints it. Loading collects every problem
(unknown keys with a did-you-mean, wrong types, impossible combinations, missing files,
unknown model aliases) and raises one :class:`RecipeError` listing them all.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forgetscope.errors import UserError
from forgetscope.schema import build, did_you_mean, hints, option, reference, section_class


class RecipeError(UserError):
    """A recipe (or its overrides) is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass
class TaskConfig:
    """The new task the model is fine-tuned on."""

    name: str | None = option(
        "numerals",
        "Embedded new task generated in code (see `forgetscope tasks`), or null when `path` or "
        "`hf_dataset` gives the data.",
    )
    path: str | None = option(
        None,
        "Your own data: a .jsonl or .csv file with `prompt`/`completion` columns (loss on the "
        "completion only) or a `text` column (loss on every token). Relative to the recipe file.",
    )
    hf_dataset: str | None = option(
        None, "A Hugging Face dataset name, for online users (e.g. `tatsu-lab/alpaca`)."
    )
    hf_config: str | None = option(None, "The dataset's config name, if it has several.")
    split: str = option("train", "The dataset split to train on (`hf_dataset` only).")
    prompt_field: str = option("prompt", "Column holding the prompt.")
    completion_field: str = option("completion", "Column holding the completion.")
    text_field: str = option("text", "Column holding plain text (used when there is no prompt column).")
    chat_template: Literal["auto", "on", "off"] = option(
        "auto",
        "Wrap prompt/completion pairs in the base model's chat template: `auto` uses it when the "
        "tokenizer has one.",
    )
    max_examples: int | None = option(2000, "Use at most this many training examples (null: all).")
    too_long: Literal["warn", "error"] = option(
        "warn", "Examples longer than train.seq_len are truncated: `warn` counts them in a warning, `error` stops."
    )
    seed: int = option(0, "Seed for generating (embedded tasks) and shuffling the data.")


@dataclass
class LoraSettings:
    """Low-rank adapter settings (peft), for `method: lora` only."""

    r: int = option(16, "Rank of the adapters.")
    alpha: int = option(32, "Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = option(0.05, "Dropout on the adapter input.")
    target_modules: str | list[str] = option(
        "all-linear",
        "Modules that get adapters: `all-linear` (every linear layer but the output head) or a "
        "list of module names such as [q_proj, v_proj].",
    )


@dataclass
class ReplayConfig:
    """Replay during fine-tuning: self-generated (samples of the frozen base) or old data."""

    source: Literal["self", "data"] = option(
        "self",
        "`self`: sample sequences from the frozen base before training (needs no old data); "
        "`data`: rehearse examples from `path` (classic replay, for users who have old data).",
    )
    path: str | None = option(
        None,
        "`source: data`: the old data (.jsonl/.csv, `text` or `prompt`/`completion`). "
        "`source: self` with `prompts: file`: a .jsonl/.csv/.txt of prompts. Relative to the recipe.",
    )
    prompts: Literal["auto", "bos", "chat", "file", "tasks"] = option(
        "auto",
        "Where self-generated samples start: `bos` (unconditional, for base models), `chat` (generic "
        "user requests in the chat template, for instruct models), `file` (your prompts in `path`), "
        "`tasks` (sequences: prompts of the earlier stages' tasks, answered by the model as it was "
        "before the stage); `auto`: `chat` when the tokenizer has a chat template, else `bos`.",
    )
    samples: int = option(256, "Number of sequences in the replay buffer.")
    max_new_tokens: int = option(96, "Length of each self-generated sample, in tokens.")
    temperature: float = option(1.0, "Sampling temperature for self-generated samples.")
    top_p: float = option(0.95, "Nucleus sampling threshold for self-generated samples.")
    ratio: float = option(
        0.25, "Share of each training batch taken from the replay buffer (the rest is new-task data)."
    )
    loss: Literal["ntp", "kl"] = option(
        "kl",
        "`ntp`: next-token loss on the replay samples; `kl`: KL(base || current) on them "
        "(LoRA: the base is the adapter-disabled model; full: the base's top-k log-probs, kept with the buffer).",
    )
    coeff: float | None = option(None, "Weight of the replay loss (null: 10 for `kl`, as in Marek et al. 2026; 1 for `ntp`).")
    topk: int = option(64, "`loss: kl` with full fine-tuning: how many of the base's log-probs per token to keep.")
    refresh_every: int | None = option(
        None,
        "Draw the buffer anew from the reference (the base, or in a sequence the model before the stage) every N "
        "steps, from the next prompts, so samples are rehearsed rather than memorised (Marek et al. 2026: every 16 "
        "batches). LoRA samples from the adapter-disabled model; full fine-tuning keeps a frozen copy of the model "
        "(one more copy of the weights in memory). null: keep the buffer drawn before training.",
    )
    seed: int = option(0, "Seed for sampling the buffer and drawing replay batches.")


@dataclass
class TrainConfig:
    """Optimisation settings, passed to transformers' Trainer."""

    lr: float = option(2e-4, "Peak learning rate.")
    steps: int = option(60, "Number of optimizer steps.")
    batch_size: int = option(8, "Examples per optimizer step, over all processes together.")
    grad_accum: int = option(1, "Split each step's batch into this many micro-batches.")
    seq_len: int = option(128, "Truncate examples to this many tokens.")
    warmup_steps: int = option(5, "Linear warm-up steps.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", "Learning-rate schedule after warm-up."
    )
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto",
        "Training precision: `auto` uses bf16 autocast where the hardware supports it (CUDA "
        "with bf16, or a CPU with AVX512-BF16/AMX), else fp32.",
    )
    seed: int = option(0, "Seed for initialisation and data order.")
    packing: bool = option(
        False,
        "Padding-free batches: each micro-batch's examples are laid end to end in rows of up to `seq_len` tokens, "
        "attention kept within each example (position ids restart), so little compute goes to padding. Not with replay.",
    )
    compile: bool = option(
        False,
        "torch.compile the model's repeated blocks for training (regional compilation: one block compiles once for "
        "all of them, about 20 s on an H100). Pays off on long GPU runs; scoring and sampling run uncompiled.",
    )
    deterministic: bool = option(
        False,
        "Bit-reproducible training on CUDA (PyTorch's deterministic algorithms; slower). Without it, identical "
        "re-runs on a GPU differ in the last bits, so their snapshots are scored anew rather than taken from the cache.",
    )
    report_to: list[str] = option(
        [],
        "The Trainer's logging integrations (transformers' `report_to`: tensorboard, wandb, mlflow, ...): they get "
        "the training loss and every snapshot's scores, as `eval_forgetscope/<eval>/<metric>` (shown as eval/forgetscope/...). TensorBoard's files go to "
        "`<run>/tensorboard/`.",
    )


@dataclass
class SnapshotConfig:
    """When to snapshot the model. Step 0 (the untouched base) is always included."""

    schedule: Literal["log", "every", "at"] = option(
        "log",
        "`log`: `count` snapshots log-spaced (dense early, where most forgetting happens); "
        "`every`: every `every` steps; `at`: the steps listed in `at`.",
    )
    count: int = option(6, "Number of snapshots for `schedule: log`, step 0 and the last step included.")
    every: int | None = option(None, "Snapshot interval for `schedule: every`.")
    at: list[int] | None = option(None, "Explicit steps for `schedule: at`.")
    resumable: bool = option(
        True,
        "Keep the training state (optimizer, scheduler, RNG) of the latest snapshot, so that an interrupted "
        "run continues from there when the same command runs again. Costs one copy of that state on disk "
        "(full fine-tuning: about 3x the model size; LoRA: the adapters); removed when the run finishes.",
    )
    keep_weights: bool = option(
        True,
        "Save the weights of each snapshot (adapter files for LoRA, safetensors for full "
        "fine-tuning). `false` keeps only their evaluation results, to save disk.",
    )


@dataclass
class EvalConfig:
    """What every snapshot is scored on (lm-eval task names)."""

    new: list[str] = option(["numerals"], "Evals of the new task (learning).")
    general: list[str] = option(
        ["prose_ppl", "world_capitals", "mmlu_shipped", "base_samples_ppl"],
        "Held-out general-capability evals (forgetting): embedded probes, tasks in evals/ or "
        "your `include` folders, or lm-eval's standard tasks and groups (hellaswag, arc_easy, mmlu, gsm8k, ...), whose "
        "data comes from the Hub or, offline, the HF datasets cache.",
    )
    limit: int | None = option(200, "Score at most this many items per task (null: all).")
    batch_size: int | Literal["auto"] = option(
        "auto", "Evaluation batch size: about this many lines of 128 tokens per forward pass (a line packs several "
        "requests); `auto`: on CUDA as many as fit in a quarter of the free memory (found once per run), 16 on CPU."
    )
    include: list[str] = option([], "Extra folders of lm-eval task YAMLs (relative to the recipe).")
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "Scoring precision, whatever the training precision: `fp32` gives the `lm_eval` CLI's scores; `bf16` "
        "(autocast) is 2-3x faster on GPUs and CPUs with AMX/AVX512-BF16, scores differ in the last digits.",
    )


@dataclass
class CascadeConfig:
    """Cheap label-free probes at every probe step; the full battery at the snapshots and where a cheap probe moves."""

    every: int | None = option(
        None, "Probe every N training steps between the snapshots (cheap probes only, unless a threshold is crossed; "
        "no weights are kept there). null: probe at the snapshots only."
    )
    cheap: list[str] = option(["base_samples_ppl"], "Label-free probes (evals of evals.general) scored at every probe step.")
    cheap_threshold: float = option(
        0.05, "Score the full battery where a cheap probe's primary metric (base_samples_ppl: bits per byte) has moved "
        "this much since the last full battery. 0: the full battery at every probe step (to calibrate, see README)."
    )
    kl: bool = option(True, "Also measure new_task_kl, KL(base || current) on new-task prompts (Shenfeld et al. 2025), at every probe step.")
    kl_threshold: float = option(
        1.0, "Score the full battery where new_task_kl (nats per token) has moved this much since the last full battery "
        "(on SmolLM2-135M about 2-3 points of general forgetting)."
    )
    kl_prompts: int = option(32, "New-task prompts (from the training data; no labels used) the KL probe samples the base's answers to.")
    kl_tokens: int = option(32, "Length of each sampled answer, in tokens.")
    kl_topk: int = option(64, "Full fine-tuning: the base's log-probs kept per position (LoRA: the adapter-disabled model gives the exact KL).")


@dataclass
class StageConfig:
    """One stage of a sequence: a new task trained after the stages before it."""

    task: TaskConfig = option(None, "This stage's new task (the fields of `task`: an embedded `name` or your `path`).")
    steps: int = option(100, "Optimizer steps of this stage.")
    lr: float | None = option(None, "Peak learning rate of this stage (null: train.lr).")
    evals: list[str] = option([], "Evals of this stage's task (empty: the eval named like its embedded task).")
    replay: bool = option(True, "Replay the earlier stages in this stage (when the recipe has `replay`; never in stage 1).")

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = TaskConfig()


@dataclass
class Recipe:
    """A fine-tuning run: base model, new task, method, schedule and evals."""

    name: str = option("run", "Run name: the run is written to `<runs_dir>/<name>/`.")
    base: str = option(
        "smollm2-135m",
        "Base model: a built-in alias (smollm2-135m, tiny-random), a Hugging Face id, a local "
        "model folder, or a .gguf file.",
    )
    method: Literal["full", "lora"] = option("lora", "`full`: all weights train; `lora`: adapters only.")
    task: TaskConfig = option(None, "The new task.")
    lora: LoraSettings | None = option(None, "LoRA settings (method: lora only; defaults apply when omitted).")
    train: TrainConfig = option(None, "Optimisation settings.")
    replay: ReplayConfig | None = option(None, "Replay settings (null: plain fine-tuning).")
    snapshots: SnapshotConfig = option(None, "Snapshot schedule (with `stages`: the schedule of each stage).")
    evals: EvalConfig = option(None, "Evaluation suite.")
    cascade: CascadeConfig | None = option(None, "Evaluation cascade (null: the full battery at every snapshot).")
    stages: list[dict[str, Any]] = option(
        [],
        "A sequence of new tasks trained one after another (each: task, steps, lr, evals, replay; see "
        "StageConfig). Replaces `task` and `train.steps`; every snapshot is scored on every stage's "
        "evals and the general suite. Empty: a single new task.",
    )
    runs_dir: str = option("runs", "Folder that holds runs (relative to the working directory).")
    trust_remote_code: bool = option(
        False, "Run Python code that ships with a Hugging Face model (only for models you trust; recorded in the manifest)."
    )
    allow_pickle: bool = option(
        False, "Load pickle-based weights (pytorch_model.bin), which can run code when loaded; default: safetensors only."
    )
    source: str | None = field(default=None, metadata={"help": "", "internal": True})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            hint = hints(Recipe)[f.name]
            cls = section_class(hint)
            if cls is not None and getattr(self, f.name) is None and f.name not in ("lora", "replay", "cascade"):
                setattr(self, f.name, cls())
        if self.method == "lora" and self.lora is None:
            self.lora = LoraSettings()

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe are resolved against."""
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    @property
    def sequence(self) -> list[StageConfig]:
        """The stages, as typed sections (validated when the recipe was loaded)."""
        return [build(StageConfig, entry, f"stages[{i}].", []) for i, entry in enumerate(self.stages)]

    def stage_recipe(self, index: int) -> "Recipe":
        """The recipe that trains stage ``index``: its task, steps and learning rate; replay from
        the second stage on (where the stage allows it)."""
        stage = self.sequence[index]
        train = dataclasses.replace(self.train, steps=stage.steps, lr=stage.lr if stage.lr is not None else self.train.lr)
        replay = self.replay if index > 0 and stage.replay else None
        return dataclasses.replace(self, task=stage.task, train=train, replay=replay, stages=[])

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (every default filled in)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "method=full"]`` into a nested mapping (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            problems.append(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
            continue
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    if problems:
        raise RecipeError(problems, "overrides")
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, key by key; a list is entered by index (``stages.1.lr``)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), list) and all(k.isdigit() for k in value):
            items = list(out[key])
            for index, item in value.items():
                if int(index) >= len(items):
                    raise RecipeError([f"--set {key}.{index}: there is no item {index} (items 0..{len(items) - 1})"], "overrides")
                items[int(index)] = _merge(items[int(index)], item) if isinstance(item, dict) and isinstance(items[int(index)], dict) else item
            out[key] = items
        else:
            out[key] = value
    return out


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Build and validate a recipe from plain data; raises :class:`RecipeError` with every problem."""
    problems: list[str] = []
    recipe = build(Recipe, data if data is not None else {}, "", problems)
    recipe.source = source
    if not problems:
        problems += _check(recipe, data)
    if problems:
        raise RecipeError(problems, source or "recipe")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe YAML file, apply ``--set`` style overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(["no such recipe file; see recipes/ for examples"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError([f"not UTF-8 text ({err.reason} at byte {err.start}); save the recipe as UTF-8"], str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError([f"{where}not valid YAML ({getattr(err, 'problem', err)})"], str(path)) from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError([f"expected a mapping of keys at the top level, got {type(data).__name__}"], str(path))
    data = _merge(data or {}, parse_overrides(overrides or []))
    return recipe_from_dict(data, str(path))


# ---------------------------------------------------------------- semantic checks

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_task(task: TaskConfig, prefix: str, base_dir: Path) -> list[str]:
    from forgetscope import tasks

    problems = []
    sources = [k for k in ("name", "path", "hf_dataset") if getattr(task, k)]
    if len(sources) != 1:
        problems.append(
            f"{prefix}: give exactly one of `name` (embedded task), `path` (your file) or `hf_dataset`"
            f"; got {', '.join(sources) or 'none'}"
        )
    if task.name and task.name not in tasks.EMBEDDED_TASKS:
        problems.append(
            f"{prefix}.name: unknown embedded task {task.name!r}{did_you_mean(task.name, tasks.EMBEDDED_TASKS)}"
            f" (embedded: {', '.join(tasks.EMBEDDED_TASKS)}; use {prefix}.path for your own data)"
        )
    if task.path:
        file = base_dir / task.path
        if not file.is_file():
            problems.append(f"{prefix}.path: no such file {str(file)!r}; give a .jsonl or .csv file")
        elif file.suffix not in (".jsonl", ".json", ".csv"):
            problems.append(f"{prefix}.path: {file.name!r} is not .jsonl or .csv")
    if task.max_examples is not None and task.max_examples <= 0:
        problems.append(f"{prefix}.max_examples: must be positive or null, got {task.max_examples}")
    return problems


def _check_stages(recipe: Recipe, data: dict[str, Any]) -> list[str]:
    """Each stage is a section of its own; its evals default to its embedded task's eval. With
    stages, ``evals.new`` becomes every stage's evals, in order."""
    from forgetscope import evaluate

    problems: list[str] = []
    if isinstance(data.get("evals"), dict) and "new" in data["evals"]:
        problems.append("evals.new: with stages, each stage lists its own evals (stages[i].evals); remove evals.new")
    if isinstance(data.get("task"), dict) or (isinstance(data.get("train"), dict) and "steps" in data["train"]):
        problems.append("task / train.steps: with stages, each stage gives its task and steps; remove them")
    known = set(evaluate.folder_evals(evaluate.evals_dir()))
    new: list[str] = []
    for i, entry in enumerate(recipe.stages):
        prefix = f"stages[{i}]"
        stage = build(StageConfig, entry, f"{prefix}.", problems)
        problems += _check_task(stage.task, f"{prefix}.task", recipe.base_dir)
        if stage.steps <= 0 or (stage.lr is not None and stage.lr <= 0):
            problems.append(f"{prefix}: steps and lr must be positive")
        evals = stage.evals or ([stage.task.name] if stage.task.name in known else [])
        if not evals:
            problems.append(f"{prefix}.evals: list the evals of this stage's task (e.g. a task YAML in evals.include)")
        new += [e for e in evals if e not in new]
    if len(recipe.stages) < 2:
        problems.append("stages: a sequence needs at least 2 stages (one new task: use `task:`)")
    if recipe.replay and recipe.replay.loss == "kl" and recipe.method == "lora":
        problems.append("replay.loss: kl with method: lora compares with the base, not with the model before each "
                        "stage; use loss: ntp or method: full for sequences")
    if recipe.replay and recipe.replay.refresh_every is not None and recipe.method == "lora":
        problems.append("replay.refresh_every: with method: lora the adapter-disabled model is the base, not the model "
                        "before each stage; use method: full for sequences")
    recipe.evals.new = new
    return problems


def _check(recipe: Recipe, data: dict[str, Any]) -> list[str]:
    """Checks that need more than one field, files, or the registries of models and tasks."""
    from forgetscope import models  # local: keep `import forgetscope.recipe` light

    problems = []
    if not _NAME_RE.match(recipe.name) or recipe.name in (".", ".."):
        problems.append(
            f"name: {recipe.name!r} must be letters, digits, '_', '-' or '.', not starting with "
            "'.' (it names a folder under runs_dir)"
        )
    problems += models.check_reference(recipe.base, recipe.base_dir)

    if recipe.method == "full" and data.get("lora") is not None:
        problems.append("lora: LoRA settings on a full fine-tuning run; remove the `lora:` section or set method: lora")
    t = recipe.train
    for key in ("lr", "steps", "batch_size", "grad_accum", "seq_len"):
        if getattr(t, key) <= 0:
            problems.append(f"train.{key}: must be positive, got {getattr(t, key)}")
    if t.warmup_steps < 0:
        problems.append(f"train.warmup_steps: must be 0 or more, got {t.warmup_steps}")
    problems += _check_report_to(t.report_to)
    if t.batch_size > 0 and t.grad_accum > 0 and t.batch_size % t.grad_accum:
        problems.append(
            f"train.batch_size: {t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if recipe.lora is not None and (recipe.lora.r <= 0 or recipe.lora.alpha <= 0):
        problems.append("lora.r and lora.alpha: must be positive")
    if recipe.lora is not None and not 0 <= recipe.lora.dropout < 1:
        problems.append(f"lora.dropout: must be in [0, 1), got {recipe.lora.dropout}")

    problems += _check_replay(recipe)
    if recipe.replay and t.packing:
        problems.append("train.packing: not with replay (each batch is split between new-task and replay examples); "
                        "set train.packing: false")
    problems += _check_cascade(recipe)
    if recipe.stages:
        problems += _check_stages(recipe, data)
    else:
        problems += _check_task(recipe.task, "task", recipe.base_dir)

    problems += check_snapshots(recipe.snapshots, t.steps)
    problems += check_evals(recipe.evals, recipe.base_dir)
    return problems


def check_snapshots(s: SnapshotConfig, steps: int | None) -> list[str]:
    """Problems with a snapshot schedule (``steps``: the training length, when known)."""
    problems = []
    if s.schedule == "log" and s.count < 2:
        problems.append(f"snapshots.count: needs at least 2 (step 0 and the last step), got {s.count}")
    if s.schedule == "every" and (s.every is None or s.every <= 0):
        problems.append("snapshots.every: set a positive interval for schedule: every (e.g. every: 10)")
    if s.schedule == "at":
        if not s.at:
            problems.append("snapshots.at: list the steps for schedule: at (e.g. at: [0, 5, 10, 20])")
        elif steps is not None and steps > 0:
            bad = [x for x in s.at if x < 0 or x > steps]
            if bad:
                problems.append(f"snapshots.at: steps {bad} fall outside 0..train.steps={steps}")
    for key in ("every", "at"):
        if getattr(s, key) is not None and s.schedule != key:
            problems.append(f"snapshots.{key}: only used with schedule: {key} (schedule is {s.schedule!r})")
    return problems


def check_evals(e: EvalConfig, base_dir: Path) -> list[str]:
    """Problems with an eval suite: values, folders, and names no task registry knows."""
    from forgetscope import evaluate

    problems = []
    if not e.new and not e.general:
        problems.append("evals: list at least one eval under `new` or `general`")
    if e.limit is not None and e.limit <= 0:
        problems.append(f"evals.limit: must be positive or null, got {e.limit}")
    if isinstance(e.batch_size, int) and e.batch_size <= 0:
        problems.append(f"evals.batch_size: must be positive or 'auto', got {e.batch_size}")
    for folder in e.include:
        if not (base_dir / folder).is_dir():
            problems.append(f"evals.include: no such folder {str(base_dir / folder)!r}")
    if not problems:
        problems += evaluate.check_eval_names([*e.new, *e.general], evaluate.include_paths(e, base_dir))
    return problems


def _check_report_to(names: list[str]) -> list[str]:
    """Names transformers knows as logging integrations, installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    problems = []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            problems.append(f"train.report_to: unknown integration {name!r}{did_you_mean(name, INTEGRATION_TO_CALLBACK)} "
                            f"(transformers knows: {', '.join(sorted(INTEGRATION_TO_CALLBACK))})")
        elif name not in get_available_reporting_integrations():
            problems.append(f"train.report_to: {name!r} is not installed; pip install {name.replace('_', '-')}, or remove it")
    return problems


def _check_cascade(recipe: Recipe) -> list[str]:
    c = recipe.cascade
    if c is None:
        return []
    problems = [f"cascade.cheap: {name!r} is not in evals.general; add it there or drop it from cascade.cheap "
                "(cascade.cheap: [] keeps the KL probe alone)" for name in c.cheap if name not in recipe.evals.general]
    if c.every is not None and c.every <= 0:
        problems.append(f"cascade.every: must be positive or null, got {c.every}")
    if c.cheap_threshold < 0 or c.kl_threshold < 0:
        problems.append("cascade.cheap_threshold and cascade.kl_threshold: must be 0 or more")
    if min(c.kl_prompts, c.kl_tokens, c.kl_topk) <= 0:
        problems.append("cascade.kl_prompts, kl_tokens and kl_topk: must be positive")
    if recipe.stages:
        problems.append("cascade: not available with stages yet; remove the cascade section")
    return problems


def _check_replay(recipe: Recipe) -> list[str]:
    r = recipe.replay
    if r is None:
        return []
    problems = []
    if not 0 < r.ratio < 1:
        problems.append(f"replay.ratio: must be between 0 and 1 (the share of each batch), got {r.ratio}")
    for key in ("samples", "max_new_tokens", "topk"):
        if getattr(r, key) <= 0:
            problems.append(f"replay.{key}: must be positive, got {getattr(r, key)}")
    if r.temperature <= 0 or not 0 < r.top_p <= 1:
        problems.append("replay.temperature must be > 0 and replay.top_p in (0, 1]")
    if r.coeff is not None and r.coeff < 0:
        problems.append(f"replay.coeff: must be 0 or more, got {r.coeff}")
    if r.prompts == "tasks" and not recipe.stages:
        problems.append("replay.prompts: `tasks` prompts with the earlier stages' tasks; it needs `stages`")
    needs_path = r.source == "data" or r.prompts == "file"
    if needs_path and not r.path:
        problems.append("replay.path: give the file (old data for source: data, prompts for prompts: file)")
    if r.path and not needs_path:
        problems.append("replay.path: only used with source: data or prompts: file")
    if r.path and not (recipe.base_dir / r.path).is_file():
        problems.append(f"replay.path: no such file {str(recipe.base_dir / r.path)!r}")
    if r.refresh_every is not None and (r.source != "self" or r.refresh_every <= 0):
        problems.append("replay.refresh_every: a positive number of steps, with source: self")
    t = recipe.train
    if t.batch_size > 0 and 0 < r.ratio < 1 and round(t.batch_size * r.ratio) in (0, t.batch_size):
        problems.append(f"replay.ratio: {r.ratio} of train.batch_size={t.batch_size} leaves no room for "
                        "replay or for new-task examples; change one of them")
    return problems


def field_reference() -> str:
    """Every recipe field with its type, default and documentation, as printed by ``forgetscope fields``."""
    stage = reference(StageConfig, "stages[i].")
    return f"{reference(Recipe)}\n\nstages[i]:  One stage of `stages` (a sequence of new tasks).\n{stage.lstrip()}"
