"""Forgetting curves from your own training script: a plain transformers Trainer plus one line.

    python examples/trainer_callback.py                                  # a tiny model, offline, seconds
    python examples/trainer_callback.py --model HuggingFaceTB/SmolLM2-135M-Instruct --lora --steps 200
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_callback.py

The run folder (runs/my-sft by default) is the one `forgetscope run` writes; then, for example:

    forgetscope report runs/my-sft -o runs/my-sft-report
    forgetscope gate runs/my-sft --policy examples/callback_policy.yaml
"""

import argparse

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from forgetscope import ForgettingCallback, models, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny-random", help="a Hugging Face id, a local folder or a forgetscope alias"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight")
    parser.add_argument(
        "--report-to", nargs="*", default=[], help="the Trainer's logging integrations, e.g. tensorboard"
    )
    parser.add_argument("--name", default="my-sft")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--output-dir", default="trainer_output")
    args = parser.parse_args()

    # An ordinary fine-tuning script: a model, its tokenizer, text data, a Trainer.
    path = models.resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    texts = [f"{r['prompt']} {r['completion']}{tokenizer.eos_token}" for r in tasks.numerals("train")[:256]]
    train_data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3 if args.lora else 3e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )

    # The one line forgetscope adds: score the base and every snapshot, write runs/<name>.
    trainer.add_callback(
        ForgettingCallback(
            trainer,
            evals={"new": ["numerals"], "general": ["prose_ppl", "world_capitals"], "limit": 20},
            name=args.name,
            runs_dir=args.runs_dir,
        )
    )
    trainer.train()


if __name__ == "__main__":
    main()
    # Under accelerate launch: leave the process group, as PyTorch asks of every process, once the
    # Trainer (and the DDP model that also holds the group) is gone, as it is when main() returns.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
