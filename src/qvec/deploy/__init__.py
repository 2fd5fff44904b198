"""Layer 6, deployment: a quantized model in a form that runs with its real bits (ONNX Runtime's ``MatMulNBits``).

:mod:`qvec.deploy.nbits` lays qvec's codes out for the runtime, :mod:`qvec.deploy.onnx` exports a model, and
:mod:`qvec.deploy.runtime` runs an exported file (``qvec eval`` on an ``.onnx``). ``onnx`` and ``onnxruntime`` are
the optional extra ``qvec[onnx]``; without them these functions raise one line saying so.

May import: :mod:`qvec.core`, :mod:`qvec.data`, :mod:`qvec.models`, :mod:`qvec.quant`, :mod:`qvec.train` (to
evaluate an exported model), :mod:`qvec.vectors`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qvec.core.errors import QvecError


def require(module: str) -> ModuleType:
    """Import a module of the optional ``onnx`` extra, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise QvecError(f"{module} is not installed: ONNX export and ONNX Runtime evaluation need the optional "
                        "extra, pip install 'qvec[onnx]'") from None


def __getattr__(name: str):
    lazy = {"export_onnx": ".onnx", "ExportReport": ".onnx", "register_onnx_family": ".onnx",
            "OnnxModel": ".runtime", "load_onnx": ".runtime", "evaluate_onnx": ".runtime"}
    if name not in lazy:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(lazy[name], __name__), name)
