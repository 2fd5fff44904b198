"""Layer 5, the method: quantization vectors and their arithmetic, the measurement core (patch, quantize, score
one candidate), signals, lambda rules and the label-free choice of lambda and donor, and the theory check.

May import: :mod:`qvec.core`, :mod:`qvec.data`, :mod:`qvec.models`, :mod:`qvec.quant`, :mod:`qvec.train`.
"""

from qvec.vectors.rules import LambdaRule, get_rule, register_rule
from qvec.vectors.selection import LambdaChoice, choose_donor, choose_lambda
from qvec.vectors.vector import QuantVector

__all__ = ["LambdaChoice", "LambdaRule", "QuantVector", "choose_donor", "choose_lambda", "get_rule",
           "register_rule"]
