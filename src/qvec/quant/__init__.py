"""Layer 3, the quantizers: the integer grid, the quantizer registry and ``quantize_``, RTN, clip search, HQQ,
GPTQ, QAT, PTQ of whole checkpoints, bits per weight, named presets and bit-packed low-bit files.

May import: :mod:`qvec.core`, :mod:`qvec.data` (calibration images), :mod:`qvec.models` (which weights a model's
checkpoint quantizes).
"""

from qvec.quant.base import (
    QUANTIZERS,
    QParams,
    QuantizerConfig,
    as_quantizer,
    get_quantizer,
    quantize_,
    quantizer_from_record,
    quantizer_names,
    register_quantizer,
    unregister_quantizer,
)
from qvec.quant.gptq import GPTQConfig
from qvec.quant.grid import (
    NonFiniteWeightError,
    QuantSpec,
    compute_qparams,
    dequantize_codes,
    dequantize_rows,
    fake_quantize,
    fake_quantize_,
    grouped_view,
    quantize_codes,
    round_rows,
    row_qparams,
)
from qvec.quant.pack import load_packed, pack_checkpoint
from qvec.quant.ptq import QuantizedCheckpoint, quantize_checkpoint, target_keys, target_shapes
from qvec.quant.qat import convert_qat, prepare_qat
from qvec.quant.rtn import RTN
from qvec.quant.targets import ALL_TARGETS, Target, TargetFilter, find_targets

__all__ = [
    "ALL_TARGETS", "GPTQConfig", "NonFiniteWeightError", "QParams", "QUANTIZERS", "QuantSpec", "QuantizedCheckpoint",
    "QuantizerConfig", "RTN", "Target", "TargetFilter", "as_quantizer", "compute_qparams", "convert_qat",
    "dequantize_codes", "dequantize_rows", "fake_quantize", "fake_quantize_", "find_targets", "get_quantizer",
    "grouped_view", "load_packed", "pack_checkpoint", "prepare_qat", "quantize_", "quantize_checkpoint",
    "quantize_codes", "quantizer_from_record", "quantizer_names", "register_quantizer", "round_rows", "row_qparams",
    "target_keys", "target_shapes", "unregister_quantizer",
]
