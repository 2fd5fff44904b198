"""qvec: zero-shot low-bit quantization of fine-tuned ViTs through quantization vectors.

    tau = QuantVector.from_checkpoints(donor_ft, donor_qat)      # theta_QAT - theta_FT on the donor task
    patched = tau.apply(receiver_ft, lam=1.0)                    # zero-shot: no receiver data, no training
    quantized = quantize_checkpoint(patched, QuantSpec(bits=3))  # RTN PTQ, per-channel
    choice = choose_lambda(receiver_path, tau, QuantSpec(bits=3), rule="agree", probe="imgs/")  # no labels
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint  # noqa: E402
from .errors import QvecError  # noqa: E402
from .gptq import GPTQConfig  # noqa: E402  (registers the GPTQ quantize_ handler)
from .models import ModelSpec, build_model, get_adapter, load_model  # noqa: E402
from .pack import load_packed, pack_checkpoint  # noqa: E402
from .ptq import quantize_checkpoint  # noqa: E402
from .qat import convert_qat, prepare_qat  # noqa: E402
from .quant import QuantSpec, fake_quantize, find_targets, quantize_  # noqa: E402
from .rules import LambdaRule, get_rule, register_rule  # noqa: E402
from .selection import LambdaChoice, choose_donor, choose_lambda  # noqa: E402
from .vector import QuantVector  # noqa: E402

__all__ = [
    "Checkpoint",
    "GPTQConfig",
    "LambdaChoice",
    "LambdaRule",
    "ModelSpec",
    "QuantSpec",
    "QuantVector",
    "QvecError",
    "build_model",
    "choose_donor",
    "choose_lambda",
    "convert_qat",
    "fake_quantize",
    "find_targets",
    "get_adapter",
    "get_rule",
    "load_model",
    "load_packed",
    "pack_checkpoint",
    "prepare_qat",
    "quantize_",
    "quantize_checkpoint",
    "register_rule",
]
