"""The parameters of each job kind, typed.

A job's parameters travel to workers in other processes and on Ray, and (without ``label``) they are hashed into
the job's content key, so they stay plain JSON-able dicts: these TypedDicts give them names and types (checked by
a type checker, read by a contributor) without changing a byte of what is hashed or sent.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Common(TypedDict):
    """What every model-building job knows: the model, the data folder, whether fused in_proj weights count."""

    model: str  # ModelSpec JSON
    data_dir: str | None
    include_in_proj: bool


class TrainingParams(Common, total=False):
    """``pretrain`` (theta_0 on a JPEG corpus) and ``finetune`` (FT, or QAT when ``qat`` is set)."""

    data_file: str  # pretrain only: the corpus
    task: str
    recipe: str  # Recipe JSON
    init: str | None  # the theta_0 file (None: the family's hub weights)
    qat: dict | None  # QuantSpec dict of QAT; None for FT
    seed: int
    bits: int | None
    out: str
    label: str


class VectorParams(TypedDict, total=False):
    """``vector``: tau = theta_QAT - theta_FT of a donor, or the mean of other donors' vectors (``sources``)."""

    ft: str
    qat: str
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


class BaselineParams(ReceiverParams, total=False):
    """``baseline``: FT, theta_0 and their PTQ (``kinds``), and QAT+PTQ at one bit-width."""

    kinds: list[str]
    bits: int | None
    quant: dict | None
    qat: str
    qat_key: str


class CellsParams(ReceiverParams, total=False):
    """``cells``: PTQ(FT + lam tau_D) of one (donor, receiver, bits) over the lambda grid, the rules' scores and
    every rule's choice on test."""

    donor: str
    bits: int
    quant: dict
    vector: str
    vector_key: str
    lambdas: list[float]
    select_lambda: bool
    test_lambdas: str
    rules: list[str]
    signals: dict[str, Any]
    known: dict[str, float]  # rows already stored, handed to the worker (not part of the key)


class PipelinePair(TypedDict):
    donor: str
    vector: str
    vector_key: str


class PipelineParams(CellsParams, total=False):
    """A pipeline job (kind = the quantizer's name): that quantizer on FT, on QAT and on FT + lam tau_D for each
    donor. Its config dict sits under the quantizer's own name (``params["gptq"]``), as keys always had it."""

    quantizer: str  # not part of the key: the key's prefix already names it
    qat: str
    qat_key: str
    calib: dict  # {"source", "id", "images"}: calibrated quantizers only
    pairs: list[PipelinePair]


JobParams = TrainingParams | VectorParams | BaselineParams | CellsParams | PipelineParams
