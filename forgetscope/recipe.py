"""The recipe: one YAML file that says what to fine-tune, how, and what to measure.

The dataclasses below *are* the schema: one section a dataclass, every field documented where
it is defined (``metadata["help"]``, printed by ``forgetscope fields``). They hold data only:
:mod:`forgetscope.load` reads a recipe file into them and :mod:`forgetscope.validate` checks the
result against files and registries. Importing this module imports neither torch nor
transformers, so every module can take its section's type from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forgetscope.schema import hints, option, reference, section_class

DATA_FILES = (".jsonl", ".json", ".csv", ".parquet")
"""The kinds of data file a task (and replay of old data) reads, by suffix."""


@dataclass
class TaskConfig:
    """The new task the model is fine-tuned on."""

    name: str | None = option(
        "numerals",
        "Embedded new task generated in code (see `forgetscope tasks`); the default stands only when "
        "neither `path` nor `hf_dataset` gives the data.",
    )
    path: str | None = option(
        None,
        "Your own data: a .jsonl, .json, .csv or .parquet file with `prompt`/`completion` columns (loss on the "
        "completion only), a `text` column (loss on every token) or a `messages` column of conversations "
        "(loss on the assistant's turns). Relative to the recipe file.",
    )
    hf_dataset: str | None = option(None, "A Hugging Face dataset name, for online users (e.g. `tatsu-lab/alpaca`).")
    hf_config: str | None = option(None, "The dataset's config name, if it has several.")
    split: str = option("train", "The dataset split to train on (`hf_dataset` only).")
    prompt_field: str = option("prompt", "Column holding the prompt.")
    completion_field: str = option("completion", "Column holding the completion.")
    text_field: str = option("text", "Column holding plain text (used when there is no prompt column).")
    messages_field: str = option(
        "messages",
        "Column holding a conversation: a list of {role, content} messages (the OpenAI / TRL format), rendered "
        "with the chat template, loss on the assistant's turns. A prompt and completion that are lists of "
        "messages (TRL's conversational prompt-completion) train on the completion's assistant turns.",
    )
    chat_template: Literal["auto", "on", "off"] = option(
        "auto",
        "Wrap prompt/completion pairs in the base model's chat template: `auto` uses it when the tokenizer has one. "
        "With `stages`: the same in every stage.",
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
        "`source: data`: the old data (a file as task.path takes: prompt/completion, text or conversations). "
        "`source: self` with `prompts: file`: a .txt of prompts, one a line, or a data file with a `prompt` column. Relative to the recipe.",
    )
    prompts: Literal["auto", "bos", "chat", "file", "tasks"] = option(
        "auto",
        "Where self-generated samples start: `bos` (unconditional, for base models), `chat` (generic "
        "user requests in the chat template, for instruct models), `file` (your prompts in `path`), "
        "`tasks` (sequences: prompts of the earlier stages' tasks, answered by the model as it was "
        "before the stage); `auto`: `chat` when the tokenizer has a chat template, else `bos`.",
    )
    samples: int = option(256, "Number of sequences in the replay buffer.")
    max_new_tokens: int = option(96, "Length of each self-generated sample, in tokens (at most train.seq_len).")
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
    coeff: float | None = option(
        None, "Weight of the replay loss (null: 10 for `kl`, as in Marek et al. 2026; 1 for `ntp`)."
    )
    topk: int = option(64, "`loss: kl` with full fine-tuning: how many of the base's log-probs per token to keep.")
    refresh_every: int | None = option(
        None,
        "Draw the buffer anew from the reference (the base, or in a sequence the model before the stage) every N "
        "steps (fewer than the run's, or a stage's), from the next prompts, so samples are rehearsed rather than memorised (Marek et al. 2026: every 16 "
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
        "all of them, about 20 s on an H100) and its loss (the fp32 logits are never written). Pays off on long GPU "
        "runs; scoring and sampling run uncompiled.",
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
    """When to snapshot the model. Step 0 (the untouched base) and the last step are always included."""

    schedule: Literal["log", "every", "at"] = option(
        "log",
        "`log`: `count` snapshots log-spaced (dense early, where most forgetting happens); "
        "`every`: every `every` steps; `at`: the steps listed in `at`.",
    )
    count: int = option(6, "Number of snapshots for `schedule: log`, step 0 and the last step included.")
    every: int | None = option(None, "Snapshot interval for `schedule: every`.")
    at: list[int] | None = option(None, "Explicit steps for `schedule: at` (step 0 and the last step are added).")
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

    new: list[str] | None = option(
        None,
        "Evals of the new task (learning). Null: the eval named like the embedded task (`numerals`), none for "
        "your own data (`task.path`: name your eval here, an lm-eval YAML over held-out data). With `stages`: "
        "each stage lists its own (stages[i].evals).",
    )
    general: list[str] = option(
        ["prose_ppl", "world_capitals", "mmlu_shipped", "base_samples_ppl"],
        "Held-out general-capability evals (forgetting): embedded probes, tasks in evals/ or "
        "your `include` folders, or lm-eval's standard tasks and groups (hellaswag, arc_easy, mmlu, gsm8k, ...), whose "
        "data comes from the Hub or, offline, the HF datasets cache.",
    )
    limit: int | None = option(200, "Score at most this many items per task (null: all).")
    batch_size: int | Literal["auto"] = option(
        "auto",
        "Evaluation batch size: about this many lines of 128 tokens per forward pass (a line packs several "
        "requests); `auto`: on CUDA as many as fit in a quarter of the free memory (found once per run), 16 on CPU.",
    )
    include: list[str] = option([], "Extra folders of lm-eval task YAMLs (relative to the recipe).")
    precision: Literal["fp32", "bf16"] = option(
        "fp32",
        "Scoring precision, whatever the training precision: `fp32` gives the `lm_eval` CLI's scores; `bf16` "
        "(autocast) is about twice as fast on GPUs and CPUs with AMX/AVX512-BF16, scores differ in the last digits.",
    )


@dataclass
class CascadeConfig:
    """Cheap label-free probes at every probe step; the full battery at the snapshots and where a cheap probe moves."""

    every: int | None = option(
        None,
        "Probe every N training steps between the snapshots (cheap probes only, unless a threshold is crossed; "
        "no weights are kept there). null: probe at the snapshots only.",
    )
    cheap: list[str] = option(
        ["base_samples_ppl"],
        "Label-free probes scored at every probe step: evals of evals.general that score the perplexity of text "
        "(lm-eval output_type loglikelihood_rolling).",
    )
    cheap_threshold: float = option(
        0.05,
        "Score the full battery where a cheap probe's primary metric (base_samples_ppl: bits per byte) has moved "
        "this much since the last full battery. 0: the full battery at every probe step (to calibrate, see README).",
    )
    kl: bool = option(
        True,
        "Also measure new_task_kl, KL(base || current) on new-task prompts (Shenfeld et al. 2025), at every probe step.",
    )
    kl_threshold: float = option(
        1.0,
        "Score the full battery where new_task_kl (nats per token) has moved this much since the last full battery "
        '(on SmolLM2-135M a nat is about 3.7 points of general forgetting; README, "Cheap probes ...").',
    )
    kl_prompts: int = option(
        32, "New-task prompts (from the training data; no labels used) the KL probe samples the base's answers to."
    )
    kl_tokens: int = option(32, "Length of each sampled answer, in tokens.")
    kl_topk: int = option(
        64,
        "Full fine-tuning: the base's log-probs kept per position (LoRA: the adapter-disabled model gives the exact KL).",
    )


@dataclass
class StageConfig:
    """One stage of a sequence: a new task trained after the stages before it."""

    task: TaskConfig = option(None, "This stage's new task (the fields of `task`: an embedded `name` or your `path`).")
    steps: int = option(100, "Optimizer steps of this stage.")
    lr: float | None = option(None, "Peak learning rate of this stage (null: train.lr).")
    evals: list[str] = option([], "Evals of this stage's task (empty: the eval named like its embedded task).")
    replay: bool = option(
        True, "Replay the earlier stages in this stage (when the recipe has `replay`; never in stage 1)."
    )

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = TaskConfig()

    @property
    def eval_names(self) -> list[str]:
        """The evals of this stage's task: ``evals``, else the eval named like its embedded task."""
        return self.evals or ([self.task.name] if self.task.name else [])


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
    stages: list[StageConfig] = option(
        [],
        "A sequence of new tasks trained one after another (each: task, steps, lr, evals, replay; the "
        "stages[i] fields). Replaces `task` and `train.steps`; every snapshot is scored on every stage's "
        "evals and the general suite. Empty: a single new task.",
    )
    runs_dir: str = option("runs", "Folder that holds runs (relative to the working directory).")
    trust_remote_code: bool = option(
        False,
        "Run Python code that ships with a Hugging Face model (only for models you trust; recorded in the manifest).",
    )
    allow_pickle: bool = option(
        False,
        "Load pickle-based weights (pytorch_model.bin), which can run code when loaded; default: safetensors only.",
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
    def scored_evals(self) -> EvalConfig:
        """What every snapshot is scored on: ``evals``, where a recipe with ``stages`` has as new-task
        evals every stage's evals, in stage order, and ``evals.new: null`` is the eval named like the
        embedded task (none for a task from a file)."""
        if not self.stages:
            default = [self.task.name] if self.task.name else []
            return dataclasses.replace(self.evals, new=default if self.evals.new is None else self.evals.new)
        new: list[str] = []
        for stage in self.stages:
            new += [name for name in stage.eval_names if name not in new]
        return dataclasses.replace(self.evals, new=new)

    def stage_recipe(self, index: int) -> Recipe:
        """The recipe that trains stage ``index``: its task, steps and learning rate; replay from
        the second stage on (where the stage allows it)."""
        stage = self.stages[index]
        train = dataclasses.replace(
            self.train, steps=stage.steps, lr=stage.lr if stage.lr is not None else self.train.lr
        )
        replay = self.replay if index > 0 and stage.replay else None
        return dataclasses.replace(
            self, task=stage.task, train=train, replay=replay, evals=self.scored_evals, stages=[]
        )

    def absolute(self) -> Recipe:
        """This recipe with its relative file paths (``task.path`` of the task and of every stage,
        ``replay.path``, ``evals.include``, a local ``base`` folder) made absolute against
        ``base_dir``: the same recipe read from any folder, as the run folder's ``recipe.yaml``."""

        def fix(path: str | None) -> str | None:
            return str((self.base_dir / Path(path).expanduser()).resolve()) if path else path

        def task(t: TaskConfig) -> TaskConfig:
            return dataclasses.replace(t, path=fix(t.path))

        local_base = self.base_dir / Path(self.base).expanduser()
        evals = dataclasses.replace(self.evals, include=[fix(p) for p in self.evals.include])
        return dataclasses.replace(
            self,
            base=str(local_base.resolve()) if local_base.exists() else self.base,
            task=task(self.task),
            stages=[dataclasses.replace(s, task=task(s.task)) for s in self.stages],
            replay=dataclasses.replace(self.replay, path=fix(self.replay.path)) if self.replay else None,
            evals=evals,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (every default filled in; with ``stages``, ``evals.new``
        lists every stage's evals)."""
        data = dataclasses.asdict(dataclasses.replace(self, evals=self.scored_evals))
        data.pop("source")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def field_reference() -> str:
    """Every recipe field with its type, default and documentation, as printed by ``forgetscope fields``."""
    return reference(Recipe)
