"""The parameters of each job kind, typed.

A job's parameters travel to workers in other processes and on Ray, and (without ``label``) they are hashed into
the job's content key, so they stay plain JSON-able dicts: these TypedDicts give them names and types (checked by
a type checker, read by a contributor) without changing a byte of what is hashed or sent.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Common(TypedDict):
    """What every model-building job knows: the model, the data folder, the target filter (its record: the
    ``in_proj`` flag, or the whole filter)."""

    model: str  # ModelSpec JSON
    data_dir: str | None
    include_in_proj: bool | dict


class TrainingParams(Common, total=False):
    """``pretrain`` (theta_0 on a JPEG corpus) and ``finetune`` (FT, or QAT on a trainable grid when ``qat``)."""

    data_file: str  # pretrain only: the corpus
    task: str
    recipe: str  # Recipe JSON
    init: str | None  # the theta_0 file (None: the family's hub weights)
    qat: dict | None  # the QuantSpec grid QAT trains on; None for FT
    seed: int
    bits: int | None
    out: str
    label: str


class VectorParams(TypedDict, total=False):
    """``vector``: tau = theta_QAT - theta_FT of a donor, or the mean of other donors' vectors (``sources``)."""

    ft: str
    qat: str
    coverage: str  # all | quantized
    targets: bool | dict  # the target filter that ``quantized`` coverage follows
    sources: list[str]
    out: str
    label: str


class EvalParams(Common):
    """What every evaluation job shares: limits, batch size and theta_0."""

    test_limit: int | None
    val_limit: int | None
    batch_size: int | None
    theta0_key: str
    theta0: str | None


class ReceiverParams(EvalParams):
    """An evaluation of one receiver's FT model."""

    receiver: str
    seed: int
    receiver_ft: str
    receiver_ft_key: str
    label: str


class PipelineFields(TypedDict, total=False):
    """What a pipeline's jobs carry about its quantizer at one bit-width."""

    pipeline: str
    bits: int | None
    quant: dict | None  # the record row keys hash (RTN: its grid; others: config and calibration set)
    quantizer: dict  # the quantizer config record (qvec.quant.quantizer_from_record)
    quant_label: str  # how rows name it
    calib: dict  # {"source", "id", "images"}: calibrated quantizers only


class BaselineParams(ReceiverParams, PipelineFields, total=False):
    """``baseline``: FT and theta_0 in float (``kinds``), or a pipeline's quantizer on FT, matched QAT, theta_0."""

    kinds: list[str]
    qat: str
    qat_key: str
    known: dict[str, float]  # rows already stored, handed to the worker (not part of the key)


class CellsParams(ReceiverParams, PipelineFields, total=False):
    """``cells``: Q(FT + lam tau_D) of one (pipeline, bits, coverage, donor, receiver) over the lambda grid, the
    rules' scores and every rule's choice on test."""

    donor: str
    vector: str
    vector_key: str
    coverage: str
    lambdas: list[float]
    select_lambda: bool
    test_lambdas: str
    rules: list[str]
    signals: dict[str, Any]
    known: dict[str, float]  # rows already stored, handed to the worker (not part of the key)


JobParams = TrainingParams | VectorParams | BaselineParams | CellsParams
