"""qvec: zero-shot low-bit quantization of fine-tuned ViTs through quantization vectors.

    tau = QuantVector.from_checkpoints(donor_ft, donor_qat)      # theta_QAT - theta_FT on the donor task
    patched = tau.apply(receiver_ft, lam=1.0)                    # zero-shot: no receiver data, no training
    quantized = quantize_checkpoint(patched, QuantSpec(bits=3))  # RTN PTQ, per-channel
    choice = choose_lambda(receiver_path, tau, QuantSpec(bits=3), rule="agree", probe="imgs/")  # no labels

The layers, each a subpackage that imports only those below it: :mod:`qvec.core` (errors, registry, files),
:mod:`qvec.data`, :mod:`qvec.models`, :mod:`qvec.quant`, :mod:`qvec.train`, :mod:`qvec.vectors`,
:mod:`qvec.deploy` (ONNX Runtime export), :mod:`qvec.grid` (studies) and :mod:`qvec.cli`. Names are imported on
first use, so ``import qvec`` (and ``qvec --help``) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": ".core.checkpoint",
    "QvecError": ".core.errors",
    "ModelSpec": ".models",
    "build_model": ".models",
    "get_adapter": ".models",
    "load_model": ".models",
    "GPTQConfig": ".quant",
    "QuantSpec": ".quant",
    "fake_quantize": ".quant",
    "find_targets": ".quant",
    "quantize_": ".quant",
    "quantize_checkpoint": ".quant",
    "pack_checkpoint": ".quant",
    "export_onnx": ".deploy",
    "load_packed": ".quant",
    "prepare_qat": ".quant",
    "convert_qat": ".quant",
    "QuantVector": ".vectors",
    "LambdaChoice": ".vectors",
    "LambdaRule": ".vectors",
    "choose_donor": ".vectors",
    "choose_lambda": ".vectors",
    "get_rule": ".vectors",
    "register_rule": ".vectors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
