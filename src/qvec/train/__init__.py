"""Layer 4, training and evaluation: the recipes, fine-tuning (FT and QAT) and pretraining, top-1 evaluation.

May import: :mod:`qvec.core`, :mod:`qvec.data`, :mod:`qvec.models`, :mod:`qvec.quant`.
"""

from qvec.core.lazy import lazy_exports

# Names are imported on first use (PEP 562): the recipes load without torch (the CLI's help lists them).
_EXPORTS = {"EvalResult": "qvec.train.evaluate", "evaluate": "qvec.train.evaluate",
            "evaluate_checkpoint": "qvec.train.evaluate", "Recipe": "qvec.train.recipe",
            "finetune": "qvec.train.trainer", "pretrain": "qvec.train.trainer"}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["EvalResult", "Recipe", "evaluate", "evaluate_checkpoint", "finetune", "pretrain"]
