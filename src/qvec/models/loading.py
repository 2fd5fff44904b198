"""Loading weights into a freshly built model, strictly, with errors that name the first bad key."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qvec.core.checkpoint import read_any_state_dict
from qvec.core.errors import QvecError
from qvec.models.base import ModelAdapter


def check_state_matches(
    model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, keys=None
) -> None:
    """Raise a QvecError naming the first missing, extra or mis-shaped key of ``state`` vs the model."""
    keys = list(model_state) if keys is None else list(keys)
    for k in keys:
        if k not in state:
            raise QvecError(f"{source}: missing key {k!r} (expected shape {tuple(model_state[k].shape)})")
        if state[k].shape != model_state[k].shape:
            raise QvecError(
                f"{source}: key {k!r} has shape {tuple(state[k].shape)}, "
                f"the model expects {tuple(model_state[k].shape)}"
            )
    extra = [k for k in state if k not in model_state]
    if extra:
        raise QvecError(f"{source}: unexpected key {extra[0]!r} (not in the model; {len(extra)} extra in all)")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """``model.load_state_dict(state)`` with a readable error instead of PyTorch's multi-line one."""
    check_state_matches(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)
    return model


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], adapter: ModelAdapter,
                        source: str) -> nn.Module:
    """Load a backbone state into ``model`` through the adapter's checkpoint filter (which resamples position
    embeddings to the model's input size); every backbone key must match, a head of another size is dropped."""
    own = model.state_dict()
    try:
        state = adapter.filter_state(dict(state), model)
    except (RuntimeError, ValueError, KeyError, AssertionError, IndexError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QvecError(f"{source}: cannot adapt these weights to {type(model).__name__} ({first[:200]})") from None
    state = {k: v for k, v in state.items() if not (adapter.is_head(k) and (k not in own or own[k].shape != v.shape))}
    backbone = [k for k in own if not adapter.is_head(k)]
    check_state_matches(own, {k: v for k, v in state.items() if not adapter.is_head(k) or k in own},
                        source, keys=backbone)
    model.load_state_dict(state, strict=False)
    return model


def load_backbone_weights(model: nn.Module, path: str | Path, adapter: ModelAdapter) -> nn.Module:
    """Load a pretrained file into ``model`` (see :func:`load_backbone_state`)."""
    return load_backbone_state(model, read_any_state_dict(path), adapter, str(path))
