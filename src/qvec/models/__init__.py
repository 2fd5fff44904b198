"""Layer 2, model families: a registry from a family name to an adapter (build, backbone/head split, targets).

May import: :mod:`qvec.core`, :mod:`qvec.data` (class names and data configs of tasks)."""

from __future__ import annotations

from torch import nn

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.core.schema import META_MODEL
from qvec.models.base import DataConfig, ModelAdapter, ModelSpec, builtin_names, families, get_adapter, register_adapter
from qvec.models.loading import load_state_strict

__all__ = [
    "DataConfig",
    "ModelAdapter",
    "ModelSpec",
    "build_model",
    "builtin_names",
    "families",
    "get_adapter",
    "load_model",
    "register_adapter",
    "with_model",
]


def build_model(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """Build a model of ``spec`` (randomly initialised unless ``pretrained`` or ``weights``). Its options and size
    are checked on the meta device first (:mod:`qvec.models.guard`): an unknown option, or a model larger than
    the memory available, is one line before anything is allocated."""
    from qvec.models.guard import check_model_fits, meta_build

    check_model_fits(meta_build(spec), str(spec))
    return get_adapter(spec).build(spec, pretrained=pretrained, weights=weights)


def load_model(ckpt: Checkpoint, spec: ModelSpec | None = None) -> tuple[nn.Module, ModelAdapter, ModelSpec]:
    """Rebuild the model a checkpoint holds (architecture from its header unless ``spec`` is given). The header is
    not trusted: options, size, keys and shapes are checked against the file's own tensors on the meta device
    before the model is built (:mod:`qvec.models.guard`)."""
    from qvec.models.guard import check_model_fits, meta_build

    spec = spec or ckpt.model_spec
    adapter = get_adapter(spec)
    check_model_fits(meta_build(spec, ckpt.state, ckpt.name()), ckpt.name())
    model = adapter.build(spec, pretrained=False)
    load_state_strict(model, ckpt.state, ckpt.name())
    model.eval()
    return model, adapter, spec


def parse_model_name(name: str, **options) -> ModelSpec:
    """A model name from the command line, checked: a built-in name must exist, and a bare name that is not
    built in must be a timm model; the error lists the built-in names."""
    spec = ModelSpec.parse(name, **options)
    if spec.family == "qvec" and spec.name not in builtin_names():
        raise QvecError(f"unknown built-in model {spec.name!r}; known: {', '.join(builtin_names())}")
    if spec.family == "timm" and ":" not in name:
        import timm

        if not timm.is_model(spec.name):
            raise QvecError(f"unknown model {name!r}; built-in: {', '.join(builtin_names())}; or any timm model "
                            "name (timm:NAME, see `qvec models timm`)")
    return spec


def with_model(ckpt: Checkpoint, model: str) -> Checkpoint:
    """Give a headerless checkpoint (a plain state dict) its architecture; the class count is read off its head."""
    spec = ModelSpec.parse(model)
    if not spec.num_classes:
        spec = spec.with_classes(get_adapter(spec).infer_num_classes(ckpt.state))
    ckpt.meta[META_MODEL] = spec.to_json()
    return ckpt


def checkpoint_from_model(model: nn.Module, spec: ModelSpec, **meta: str) -> Checkpoint:
    """Wrap a model's state dict with the header that lets qvec rebuild it."""
    if any(".parametrizations." in k for k in model.state_dict()):
        raise QvecError("model is still prepared for QAT; call qvec.qat.convert_qat first")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(state, {META_MODEL: spec.to_json(), **meta})
