"""Layer 4, training and evaluation: the recipes, fine-tuning (FT and QAT) and pretraining, top-1 evaluation.

May import: :mod:`qvec.core`, :mod:`qvec.data`, :mod:`qvec.models`, :mod:`qvec.quant`.
"""

from qvec.train.evaluate import EvalResult, evaluate, evaluate_checkpoint
from qvec.train.recipe import Recipe
from qvec.train.trainer import finetune, pretrain

__all__ = ["EvalResult", "Recipe", "evaluate", "evaluate_checkpoint", "finetune", "pretrain"]
