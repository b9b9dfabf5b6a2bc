"""Command line: one subcommand per public function. Errors in user input exit with code 2."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from forgetscope.errors import UserError


def _cmd_run(args: argparse.Namespace) -> None:
    from forgetscope.load import load_recipe
    from forgetscope.runner import run

    root = run(load_recipe(args.recipe, args.set))
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, the main process reports
        _report_paths("run", root)


def _report_paths(what: str, root: Path) -> None:
    print(f"\nforgetscope: {what} finished: {root}")
    print(f"  curves table : {root / 'curves.csv'}")
    print(f"  curves figure: {root / 'curves.png'}")
    print(f"  snapshots    : {root / 'snapshots'}")


def _cmd_audit(args: argparse.Namespace) -> None:
    from forgetscope.audit import audit
    from forgetscope.load import RecipeError, recipe_from_dict
    from forgetscope.recipe import EvalConfig

    defaults = EvalConfig()
    evals = {
        "new": args.new or [],
        "general": args.general if args.general is not None else defaults.general,
        "limit": args.limit if args.limit else None,
        "include": args.include,
    }
    try:
        config = recipe_from_dict({"evals": evals, "base": args.base}).evals  # same type checks as a recipe
    except RecipeError as err:  # name the flags, not the recipe keys they fill
        raise UserError("\n".join(_flag_problem(problem) for problem in err.problems)) from None
    root = audit(
        args.base,
        args.checkpoints,
        config,
        name=args.name,
        runs_dir=args.runs_dir,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    _report_paths("audit", root)


_AUDIT_FLAGS = {
    "base": "--base",
    "evals": "--new/--general",
    "evals.new": "--new",
    "evals.general": "--general",
    "evals.limit": "--limit",
    "evals.include": "--include",
}


def _flag_problem(problem: str) -> str:
    """A recipe-validation line about a key that an audit flag filled, said of the flag."""
    key, sep, rest = problem.partition(":")
    return f"{_AUDIT_FLAGS[key]}:{rest}" if sep and key in _AUDIT_FLAGS else problem


def _weights(pairs: list[str]) -> dict[str, float]:
    """``["prose_ppl=2", ...]`` -> ``{"prose_ppl": 2.0}``."""
    out = {}
    for pair in pairs:
        probe, _, value = pair.partition("=")
        try:
            out[probe] = float(value)
        except ValueError:
            raise UserError(f"--weight {pair!r}: expected PROBE=NUMBER, e.g. --weight prose_ppl=2") from None
        if not probe or not out[probe] >= 0 or math.isinf(out[probe]):
            raise UserError(f"--weight {pair!r}: a probe's weight is a number, 0 or more, e.g. --weight prose_ppl=2")
    return out


def _finite(text: str) -> float:
    """argparse type: a finite number (a --target of nan or inf is never reached)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, e.g. 0.9, got {text!r}")
    return value


def _items(text: str) -> int:
    """argparse type: a number of items per eval, 0 for all."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of items, 0 for all, e.g. 200, got {text!r}")
    return value


def _write_report(runs: list[Path | str], args: argparse.Namespace) -> None:
    from forgetscope import report

    html, md = report.write(
        runs,
        args.out,
        target=args.target,
        weights=_weights(args.weight),
        title=args.title,
        correction=args.correction,
        keep_at_chance=args.keep_at_chance,
    )
    print(f"\nforgetscope: report written\n  HTML    : {html}\n  Markdown: {md}")


def _cmd_report(args: argparse.Namespace) -> None:
    from forgetscope import io

    io.check_out_dir(Path(args.out), "-o")
    _write_report(args.runs, args)


def _cmd_compare(args: argparse.Namespace) -> None:
    from forgetscope import io, validate
    from forgetscope.load import load_recipe
    from forgetscope.runner import check_folder, run

    recipes = [load_recipe(path, args.set) for path in args.recipes]  # every recipe is checked before any training
    io.check_out_dir(Path(args.out), "-o")
    out = Path(args.out).absolute()
    for recipe in recipes:  # a run folder this compare is about to make
        root = (Path(recipe.runs_dir) / recipe.name).absolute()
        if out == root or root in out.parents:
            where = "is" if out == root else "lies inside"
            raise UserError(
                f"-o {args.out}: {where} the folder of the run {recipe.name!r} that this compare writes, whose files "
                "the report would mix with; choose a folder outside every run"
            )
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        fix = "a --set name=... names every one the same" if any(s.startswith("name=") for s in args.set) else ""
        raise UserError(
            f"recipes share a run name ({', '.join(names)}); give each its own `name:` in its file"
            + (f" ({fix})" if fix else "")
        )
    if problems := validate.check_target(recipes, args.target):
        raise UserError(problems[0])
    for recipe in recipes:
        check_folder(recipe)
    roots = []
    for i, recipe in enumerate(recipes, start=1):
        print(f"\nforgetscope: compare: recipe {i}/{len(recipes)}: {recipe.name}")
        roots.append(run(recipe))
    _write_report(roots, args)


def _cmd_sweep(args: argparse.Namespace) -> None:
    from forgetscope.sweep import run_sweep

    run_sweep(args.recipes, args.key, args.values, args.out, args.set, args.target, args.title)


def _cmd_gate(args: argparse.Namespace) -> int:
    from forgetscope import gate, io

    out = Path(args.out or args.run)
    if out.resolve() != Path(args.run).resolve():  # the gated run's own folder is the default
        io.check_out_dir(out, "--out")
    policy = gate.load_policy(args.policy)
    result = gate.check(args.run, policy, step=args.step)
    print(gate.render_text(result))
    json_path, md_path = gate.write(result, Path(args.out) if args.out else Path(args.run))
    print(f"  JSON    : {json_path}\n  Markdown: {md_path}")
    return 0 if result["verdict"] == "pass" else 1


def _cmd_show(args: argparse.Namespace) -> None:
    import yaml

    from forgetscope.load import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    data = recipe.absolute().to_dict()  # runs the same when saved anywhere else
    if recipe.stages:  # each stage gives its task, steps and evals; the top-level ones are not used
        del data["task"], data["train"]["steps"], data["evals"]["new"]
        if recipe.replay is None:  # stages' `replay: true` asks for the recipe's replay, which it has not
            for stage in data["stages"]:
                del stage["replay"]
    print(yaml.safe_dump(data, sort_keys=False), end="")


def _cmd_fields(args: argparse.Namespace) -> None:
    from forgetscope.recipe import field_reference

    print(field_reference(), end="")


def _cmd_tasks(args: argparse.Namespace) -> None:
    from forgetscope import registry, tasks

    missing = [folder for folder in args.include if not Path(folder).is_dir()]
    if missing:
        what = "a file, not a folder" if Path(missing[0]).exists() else "no such folder"
        raise UserError(f"--include {missing[0]}: {what}; give folders of task YAMLs")
    print("Embedded new tasks (task.name):")
    for name in tasks.EMBEDDED_TASKS:
        print(f"  {name:16s} {tasks.describe(name)}")
    for folder in [registry.evals_dir(), *map(Path, args.include)]:
        print(f"\nEval tasks in {folder} (evals.new / evals.general):")
        broken = registry.unusable(folder)
        own = Path(folder).resolve() == registry.evals_dir().resolve()
        shipped = set() if own else set(registry.folder_evals(registry.evals_dir()))
        for name, first_line in registry.folder_evals(folder).items():
            if name in shipped:
                first_line = "NOT USABLE: forgetscope ships an eval of that name; rename the task"
            print(f"  {name:16s} {f'NOT USABLE: {broken[name]}' if name in broken else first_line}")
    if args.all:
        names = registry.task_manager((str(registry.evals_dir()), *map(str, args.include))).all_tasks
        print(
            f"\nAll {len(names)} lm-eval tasks, groups and tags (standard ones need their data: online, or in the HF datasets cache):"
        )
        print("\n".join(f"  {n}" for n in names))
    else:
        print(
            "\nlm-eval's standard tasks (hellaswag, arc_easy, mmlu, gsm8k, ...) work too, online or from the HF datasets "
            "cache: `forgetscope tasks --all`."
        )


class _Parser(argparse.ArgumentParser):
    """argparse with a bad command line said in one line (exit 2), like every other bad input,
    instead of the usage block before it; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forgetscope",
        description="Measure what a language model forgets when it is fine-tuned.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_command(name: str, help: str, func) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help)
        cmd.add_argument("recipe", help="recipe YAML file, e.g. recipes/lora.yaml")
        cmd.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe field, e.g. --set train.lr=1e-4 --set snapshots.count=4 (repeatable)",
        )
        cmd.set_defaults(func=func)
        return cmd

    recipe_command(
        "run", "fine-tune by a recipe, snapshot on its schedule, score every snapshot, write curves", _cmd_run
    )
    recipe_command(
        "show",
        "print the resolved recipe (every default filled in, relative paths made absolute; itself a valid recipe) after validating it",
        _cmd_show,
    )
    audit_cmd = sub.add_parser(
        "audit",
        help="score checkpoints trained elsewhere (full models or peft adapters) against their base",
        description="Score checkpoints trained elsewhere against their base (step 0) and write curves like `run` does.",
    )
    audit_cmd.add_argument("--base", required=True, help="the base model: alias, local folder, .gguf file or HF id")
    audit_cmd.add_argument(
        "--checkpoints",
        required=True,
        nargs="+",
        metavar="DIR",
        help="checkpoint folders (a full model or a peft adapter), folders of them such as the output_dir "
        "of HF Trainer, TRL or axolotl (checkpoint-*/ inside), or Hugging Face ids",
    )
    audit_cmd.add_argument(
        "--new", nargs="*", metavar="TASK", help="new-task evals: what the fine-tune was meant to learn (default: none)"
    )
    audit_cmd.add_argument(
        "--general", nargs="*", metavar="TASK", help="general-capability evals (default: the embedded suite)"
    )
    audit_cmd.add_argument("--limit", type=_items, default=200, help="items per eval, 0 for all (default 200)")
    audit_cmd.add_argument(
        "--include", nargs="*", default=[], metavar="DIR", help="folders of your own lm-eval task YAMLs"
    )
    audit_cmd.add_argument("--name", default="audit", help="run name: results go to RUNS_DIR/NAME (default audit)")
    audit_cmd.add_argument("--runs-dir", default="runs", help="folder that holds runs (default runs)")
    audit_cmd.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "on", "off"],
        help="render new-task prompts with the base's chat template (default auto: when it has one)",
    )
    audit_cmd.add_argument(
        "--trust-remote-code", action="store_true", help="run Python code shipped with the model (only if you trust it)"
    )
    audit_cmd.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle-based weights (pytorch_model.bin); default: safetensors only",
    )
    audit_cmd.set_defaults(func=_cmd_audit)

    def report_options(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "-o", "--out", required=True, metavar="DIR", help="folder for report.html, report.md and the figures"
        )
        cmd.add_argument(
            "--target",
            type=_finite,
            metavar="SCORE",
            help="new-task score for steps-to-target and forgetting at matched learning, e.g. 0.9",
        )
        cmd.add_argument(
            "--weight",
            action="append",
            default=[],
            metavar="PROBE=W",
            help="weight of a general probe in general forgetting (default 1 each; 0 leaves it out; repeatable)",
        )
        cmd.add_argument("--title", default="forgetscope report", help="the report's title")
        cmd.add_argument(
            "--correction",
            default="holm",
            choices=["holm", "bh", "none"],  # stats.CORRECTIONS (not imported: the CLI starts light)
            help="adjust each run's general probes' p-values: holm (family-wise, default), bh (false discovery rate), none",
        )
        cmd.add_argument(
            "--keep-at-chance",
            action="store_true",
            help="keep probes whose base score is not clearly above chance in general forgetting (default: left out)",
        )

    report_cmd = sub.add_parser(
        "report",
        help="write an HTML + Markdown report comparing finished runs",
        description="Write a self-contained HTML report and a Markdown summary of one or more runs.",
    )
    report_cmd.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders of runs (e.g. runs/)")
    report_options(report_cmd)
    report_cmd.set_defaults(func=_cmd_report)
    compare_cmd = sub.add_parser(
        "compare",
        help="run several recipes (sharing the base's evaluation) and write one report",
        description="Run several recipes one after another and write one comparison report. "
        "The base (step 0) is scored once: later recipes with the same base and evals "
        "reuse its cached results; finished runs are not run again.",
    )
    compare_cmd.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files")
    compare_cmd.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field in every recipe (repeatable)"
    )
    report_options(compare_cmd)
    compare_cmd.set_defaults(func=_cmd_compare)
    sweep_cmd = sub.add_parser(
        "sweep",
        help="run recipes of stages at several values of one field; plot forgetting against it",
        description="Run each recipe (a sequence: what the model knew, then the fine-tune) at every "
        "value of one field, measure the forgetting of the earlier stages (at the end, and "
        "at matched learning with --target) and the steps to the target, and write "
        "sweep.csv and sweep.png (with the rows of earlier sweeps of the same key into the same folder).",
    )
    sweep_cmd.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files with stages")
    sweep_cmd.add_argument(
        "--key",
        required=True,
        help="the field to sweep, as for --set: train.lr, base, ... (not name or runs_dir; one key per -o folder)",
    )
    sweep_cmd.add_argument(
        "--values", required=True, nargs="+", metavar="VALUE", help="its values (parsed as YAML; each once)"
    )
    sweep_cmd.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field in every run, other than --key (repeatable)",
    )
    sweep_cmd.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for sweep.csv and sweep.png")
    sweep_cmd.add_argument(
        "--target", type=_finite, metavar="SCORE", help="new-task score for steps to target and matched learning"
    )
    sweep_cmd.add_argument("--title", default="", help="the figure's title")
    sweep_cmd.set_defaults(func=_cmd_sweep)
    gate_cmd = sub.add_parser(
        "gate",
        help="check a run against a release policy: exit 0 pass, 1 fail, 2 unusable input",
        description="Check a finished run against a release policy (allowed drops per probe, minimum "
        "new-task scores). Prints a verdict table, writes gate.json and gate.md, and exits "
        "0 (pass), 1 (fail) or 2 (unusable input). See examples/release_policy.yaml.",
    )
    gate_cmd.add_argument("run", metavar="RUN", help="a run folder")
    gate_cmd.add_argument("--policy", required=True, help="policy YAML, e.g. examples/release_policy.yaml")
    gate_cmd.add_argument("--step", type=int, help="the step to check (default: the last evaluated one)")
    gate_cmd.add_argument(
        "--out",
        metavar="DIR",
        help="where gate.json and gate.md go (default: the run folder; else a folder outside every run)",
    )
    gate_cmd.set_defaults(func=_cmd_gate)
    sub.add_parser("fields", help="print every recipe field with its type, default and meaning").set_defaults(
        func=_cmd_fields
    )
    tasks_cmd = sub.add_parser("tasks", help="list the embedded new tasks and the eval tasks a recipe can use")
    tasks_cmd.add_argument(
        "--include", nargs="*", default=[], metavar="DIR", help="also list the task YAMLs in these folders"
    )
    tasks_cmd.add_argument("--all", action="store_true", help="also list every lm-eval task name")
    tasks_cmd.set_defaults(func=_cmd_tasks)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, SLURM's time limit, ``timeout``), raised where the command is, so it
    stops as Ctrl-C stops it: the run is marked failed and resumes when the command runs again."""


_main_pid = os.getpid()  # the process whose SIGTERM stops the command (set again where main installs the handler)


def _terminate(signum: int, frame: object) -> NoReturn:
    """SIGTERM in the command's process: raise :class:`Terminated`. A forked child inherits the
    handler (lm-eval's bootstrap pool forks workers, and ends them with SIGTERM): there it dies as
    SIGTERM's default action would, without a traceback."""
    if os.getpid() != _main_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # delivered at once: the process ends here, killed by the signal
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `forgetscope`: what it can do
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    global _main_pid
    _main_pid = os.getpid()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        code = args.func(args) or 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher (torch is loaded by then)
            from forgetscope import distributed

            distributed.finish()
        return code
    except UserError as err:
        for line in str(err).splitlines():
            print(f"forgetscope: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `forgetscope gate ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what finished is on disk, a run resumes where it stopped
        how = f"stopped by {err}" if isinstance(err, Terminated) else "interrupted"
        print(f"\nforgetscope: {how}; what finished is kept: run the same command to go on", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130
    finally:
        if previous is not None:  # None: not ours to set (another thread, or a handler set outside Python)
            signal.signal(signal.SIGTERM, previous)
