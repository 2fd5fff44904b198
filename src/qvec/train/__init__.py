"""Layer 4, training and evaluation: the recipes, fine-tuning (FT and QAT) and pretraining, top-1 evaluation.

May import: :mod:`qvec.core`, :mod:`qvec.data`, :mod:`qvec.models`, :mod:`qvec.quant`.
"""

import importlib

# Names are imported on first use (PEP 562): the recipes load without torch (the CLI's help lists them).
_EXPORTS = {"EvalResult": "qvec.train.evaluate", "evaluate": "qvec.train.evaluate",
            "evaluate_checkpoint": "qvec.train.evaluate", "Recipe": "qvec.train.recipe",
            "finetune": "qvec.train.trainer", "pretrain": "qvec.train.trainer"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["EvalResult", "Recipe", "evaluate", "evaluate_checkpoint", "finetune", "pretrain"]
