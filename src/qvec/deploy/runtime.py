"""Run an exported ``.onnx`` in ONNX Runtime (CPU) as a torch module, so that qvec's evaluation runs it on the same
tasks and splits as a checkpoint (``qvec eval --model model.onnx``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.core.spec import DataConfig
from qvec.data.tasks import Task
from qvec.deploy import require
from qvec.deploy.onnx import META_DATA
from qvec.train.evaluate import EvalResult, check_checkpoint_task, evaluate


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind a module's interface: images in, logits out (on the CPU)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - the runtime raises its own types for a missing or bad file
            raise QvecError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.meta: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if META_DATA not in self.meta:
            raise QvecError(f"{path}: not an ONNX model qvec exported (no {META_DATA!r} in its metadata)")
        self.path = Path(path)
        self.input = self.session.get_inputs()[0].name
        self.data_config = DataConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in json.loads(self.meta[META_DATA]).items()})
        self.checkpoint = Checkpoint({}, self.meta, self.path)  # the header, for the task checks of evaluation
        self.num_classes = self.checkpoint.model_spec.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().float().numpy()})[0])


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """An exported model, ready to evaluate (``threads``: the runtime's intra-op threads; default all cores)."""
    return OnnxModel(path, threads)


def evaluate_onnx(path: str | Path, task: Task, split: str = "test", *, threads: int | None = None,
                  batch_size: int | None = None, limit: int | None = None, progress: bool = False,
                  check_classes: bool = True) -> EvalResult:
    """Top-1 of an exported ``.onnx`` (:func:`qvec.deploy.onnx.export_onnx`) run in ONNX Runtime, on the same
    task, split and preprocessing as the checkpoint it was exported from."""
    model = load_onnx(path, threads)
    if check_classes:
        check_checkpoint_task(model.checkpoint, model.checkpoint.model_spec, task)
    return evaluate(model, task, split, batch_size=batch_size, limit=limit, progress=progress,
                    config=model.data_config)
