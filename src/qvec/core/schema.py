"""The header schema of every file qvec writes: metadata keys, formats and the schema version.

qvec stores its artifacts as safetensors whose ``__metadata__`` header (string keys, string values) says what the
file holds. This module is the one place that names those keys; every writer and reader imports them from here.

Four formats, told apart by ``qvec.format``:

* ``checkpoint``: a model's weights (``Checkpoint.save``; trained, patched, PTQ'd or unpacked models).
* ``vector``: a quantization vector tau = theta_QAT - theta_FT (``QuantVector.save``).
* ``packed``: bit-packed low-bit codes with their scales (``qvec.pack.pack_checkpoint``).
* ``zeroshot-head``: a cached CLIP zero-shot head (``qvec.zeroshot.build_head``).

Every save writes ``qvec.schema`` (:data:`SCHEMA_VERSION`) and ``qvec.version`` (the library version). A file
without ``qvec.schema`` was written by a qvec from before the schema existed: it is schema 0, carries the same
keys, and loads unchanged (:func:`upgrade_header`). A file of a newer schema than this qvec knows is refused in one
line (:func:`check_header`), as is a file of a known schema that lacks one of its format's required keys.

The schema covers header *metadata* only. Fingerprints (``qvec.backbone_fingerprint``, the text tower's) hash
tensors, and grid content keys hash job inputs, so adding or bumping ``qvec.schema`` changes neither.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from qvec.core.errors import QvecError

#: The header schema this qvec writes. Bump it (and add a step to :data:`UPGRADES`) when a key changes meaning or
#: a reader starts to need a key older files lack.
SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------- every format
META_FORMAT = "qvec.format"  # checkpoint | vector | packed | zeroshot-head
META_SCHEMA = "qvec.schema"  # integer header schema, as a decimal string
META_VERSION = "qvec.version"  # qvec's version when the file was first written

# ------------------------------------------------------------------ checkpoints (and packed checkpoints)
META_MODEL = "qvec.model"  # ModelSpec JSON: family, name, classes, options
META_TASK = "qvec.task"  # the task trained for (``pretrain:<corpus>`` for theta_0)
META_KIND = "qvec.kind"  # pretrained | ft | qat | patched, with ``+ptq`` once quantized
META_QUANT = "qvec.quant"  # quantizer JSON (QAT's, PTQ's, or a vector's QAT quantizer)
META_FINGERPRINT = "qvec.backbone_fingerprint"  # sha256 of theta_0's backbone tensors (16 hex digits)
META_CLASSES = "qvec.classes"  # JSON list of class names
META_RECIPE = "qvec.recipe"  # training recipe JSON (train.py)
META_TRAIN_SECONDS = "qvec.train_seconds"  # training wall time (train.py)
META_INIT = "qvec.init"  # file name of the weights a fine-tune started from, when not theta_0 (train.py; no path)
META_INCLUDE_IN_PROJ = "qvec.include_in_proj"  # whether fused q/k/v in_proj weights were QAT targets (train.py)
META_PATCH = "qvec.patch"  # JSON {"donor", "lambda"} of a patched checkpoint (QuantVector.apply)
# lambda chosen by a label-free rule (selection.LambdaChoice.to_meta; ``qvec patch --lam auto``)
META_LAMBDA_RULE = "qvec.lambda_rule"
META_LAMBDA = "qvec.lambda"
META_LAMBDA_DONOR = "qvec.lambda_donor"
META_LAMBDA_SCORES = "qvec.lambda_scores"
META_LAMBDA_PROBE = "qvec.lambda_probe"

# ------------------------------------------------------------------------------------------- vectors
META_DONOR = "qvec.donor"  # the donor task, or the arithmetic that made the vector (``mean(a, b)``)
META_PARAMS = "qvec.num_params"  # values in the vector's tensors
META_COVERAGE = "qvec.coverage"  # which tensors the vector covers: all (float backbone) | quantized (PTQ targets)

# ------------------------------------------------------------------------------------ packed checkpoints
META_PACKED = "qvec.packed"  # JSON {"quant", "shapes", "dtypes", "scale_dtype"}
#: suffixes of a packed weight's tensors: bit-packed codes, scales, zero points (asymmetric grids)
PACKED_SUFFIXES = (".__qcodes", ".__qscale", ".__qzero")

# ------------------------------------------------------------------------------------- zero-shot heads
META_CLASSNAMES = "qvec.classnames"  # JSON list of the class names the head was built for
META_TEMPLATES = "qvec.templates"  # JSON list of the prompt templates
META_TEXT_FINGERPRINT = "qvec.text_fingerprint"  # sha256 of the text tower's weights and tokenizer
META_LOGIT_SCALE = "qvec.logit_scale"  # the tower's logit scale (repr of a float)

# ---------------------------------------------------------------------------------------------- values
FORMAT_CHECKPOINT = "checkpoint"
FORMAT_VECTOR = "vector"
FORMAT_PACKED = "packed"
FORMAT_HEAD = "zeroshot-head"
KIND_PATCHED = "patched"

_CHECKPOINT_KEYS = (META_MODEL, META_TASK, META_KIND, META_QUANT, META_FINGERPRINT, META_CLASSES, META_RECIPE,
                    META_TRAIN_SECONDS, META_INIT, META_INCLUDE_IN_PROJ, META_PATCH, META_LAMBDA_RULE, META_LAMBDA,
                    META_LAMBDA_DONOR, META_LAMBDA_SCORES, META_LAMBDA_PROBE)


@dataclass(frozen=True)
class Format:
    """One file format: the keys a file of it must carry (from schema 1 on) and the others it may carry."""

    name: str
    description: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return self.required + self.optional


#: Keys every file qvec writes carries, whatever its format.
COMMON_REQUIRED = (META_FORMAT, META_SCHEMA, META_VERSION)

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format(FORMAT_CHECKPOINT, "a model's weights (trained, patched, quantized or unpacked)", COMMON_REQUIRED,
           _CHECKPOINT_KEYS),
    Format(FORMAT_VECTOR, "a quantization vector theta_QAT - theta_FT over the backbone",
           (*COMMON_REQUIRED, META_PARAMS), (META_MODEL, META_DONOR, META_QUANT, META_FINGERPRINT, META_COVERAGE)),
    Format(FORMAT_PACKED, "bit-packed low-bit codes, scales and zero points, other tensors as is",
           (*COMMON_REQUIRED, META_PACKED, META_MODEL, META_QUANT),
           tuple(k for k in _CHECKPOINT_KEYS if k not in (META_MODEL, META_QUANT))),
    Format(FORMAT_HEAD, "a cached CLIP zero-shot head (class embeddings)",
           (*COMMON_REQUIRED, META_CLASSNAMES, META_TEMPLATES, META_TEXT_FINGERPRINT, META_LOGIT_SCALE),
           (META_TASK,)),
)}


def all_keys() -> frozenset[str]:
    """Every header key qvec writes."""
    return frozenset(k for f in FORMATS.values() for k in f.keys)


# ------------------------------------------------------------------------------------------- versions
def header_schema(meta: Mapping[str, str], path: str | os.PathLike | None = None) -> int:
    """The schema a header was written with: ``qvec.schema``, or 0 for a file from before the key existed."""
    raw = meta.get(META_SCHEMA)
    if raw is None:
        return 0
    try:
        version = int(raw)
    except (TypeError, ValueError):
        version = -1
    if version < 0 or str(version) != str(raw).strip():
        raise QvecError(f"{_where(path)}: header key {META_SCHEMA!r} is {raw!r}, expected a non-negative integer")
    return version


def _v0_to_v1(meta: dict[str, str]) -> None:
    """Schema 0 (before ``qvec.schema``) has the keys of schema 1. A qvec header without ``qvec.format`` was read
    as a checkpoint then, so it says so now."""
    if META_FORMAT not in meta and any(k.startswith("qvec.") for k in meta):
        meta[META_FORMAT] = FORMAT_CHECKPOINT


#: ``UPGRADES[n]`` turns a schema-``n`` header into a schema ``n + 1`` one, in place.
UPGRADES: dict[int, Callable[[dict[str, str]], None]] = {0: _v0_to_v1}


def upgrade_header(meta: Mapping[str, str]) -> dict[str, str]:
    """A header of an older schema as this qvec writes it: each step of :data:`UPGRADES` in turn, then
    ``qvec.schema`` set to :data:`SCHEMA_VERSION`. Keys are only added, never changed or removed; a header of
    the current schema, or one without any qvec key (a plain safetensors file), comes back as it is."""
    out = dict(meta)
    version = header_schema(out)
    if version >= SCHEMA_VERSION or not any(k.startswith("qvec.") for k in out):
        return out
    for v in range(version, SCHEMA_VERSION):
        UPGRADES[v](out)
    out[META_SCHEMA] = str(SCHEMA_VERSION)
    return out


def check_header(meta: Mapping[str, str], path: str | os.PathLike | None = None) -> dict[str, str]:
    """The header of a file qvec is about to load, checked and upgraded to :data:`SCHEMA_VERSION`.

    A newer schema than this qvec's is refused (it may mean what this qvec cannot read). A file that says it has
    a known schema (1 or later) must carry every required key of its format. A schema-0 file is upgraded
    without that check: older qvec wrote the same keys, and loading it must not start to fail."""
    version = header_schema(meta, path)
    if version > SCHEMA_VERSION:
        raise QvecError(f"{_where(path)}: header schema {version} is newer than this qvec's ({SCHEMA_VERSION}); "
                        "upgrade qvec to read it")
    if version >= 1:
        missing = [k for k in required_keys(meta.get(META_FORMAT)) if k not in meta]
        if missing:
            fmt = meta.get(META_FORMAT)
            raise QvecError(f"{_where(path)}: header (schema {version}{f', format {fmt}' if fmt else ''}) lacks "
                            f"required key {missing[0]!r}")
    return upgrade_header(meta)


def required_keys(fmt: str | None) -> tuple[str, ...]:
    """What a header of format ``fmt`` must carry (an unknown format: the keys every file carries)."""
    f = FORMATS.get(fmt) if fmt is not None else None
    return f.required if f is not None else COMMON_REQUIRED


def stamp_header(meta: Mapping[str, str], version: str, path: str | os.PathLike | None = None) -> dict[str, str]:
    """The header a save writes: ``qvec.schema`` set to :data:`SCHEMA_VERSION`, ``qvec.version`` kept or set to
    ``version``, and every required key of its format present (a writer never makes a file its reader refuses)."""
    out = dict(meta)
    out[META_SCHEMA] = str(SCHEMA_VERSION)
    out.setdefault(META_VERSION, version)
    missing = [k for k in required_keys(out.get(META_FORMAT)) if k not in out]
    if missing:
        raise QvecError(f"{_where(path)}: refusing to write a header without required key {missing[0]!r}")
    return out


def _where(path: str | os.PathLike | None) -> str:
    return str(path) if path is not None else "the file"
