"""forgetscope: measure what a language model forgets when it is fine-tuned.

Forgetting curves from your own Trainer / SFTTrainer script::

    from forgetscope import ForgettingCallback
    trainer.add_callback(ForgettingCallback(trainer, evals={"general": ["hellaswag", "arc_easy"]}, name="my-sft"))

The notebook API (imported on first use, so that the command line starts fast)::

    import forgetscope
    table = forgetscope.load_results(["runs"])         # tidy curves of every run in runs/
    items = forgetscope.load_items(["runs/full_ft"])    # per-item scores, for pairing across steps
    analysis = forgetscope.analyse(["runs"], target=0.9)
    forgetscope.plot_frontier(analysis.summary)         # learning vs forgetting, Pareto frontier
    forgetscope.plot_forgetting(analysis.drops)         # forgetting curves with 95% CI bands
"""

import importlib

_EXPORTS = {
    "ForgettingCallback": "forgetscope.callback",
    "load_results": "forgetscope.results",
    "load_items": "forgetscope.results",
    "analyse": "forgetscope.report",
    "metrics": "forgetscope.metrics",
    "run_summary": "forgetscope.metrics",
    "rank_runs": "forgetscope.metrics",
    "plot_curves": "forgetscope.figures",
    "plot_forgetting": "forgetscope.figures",
    "plot_learning": "forgetscope.figures",
    "plot_frontier": "forgetscope.figures",
    "UserError": "forgetscope.errors",  # what a bad input raises: a message saying what to change
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module if module.__name__.endswith(f".{name}") else getattr(module, name)
    raise AttributeError(f"module 'forgetscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The exports too (a notebook's tab completion lists them before their first use)."""
    return sorted({*globals(), *_EXPORTS})
