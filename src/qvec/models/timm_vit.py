"""timm Vision Transformers (any ``timm`` ViT by name) and qvec's built-in small ViTs for 32x32 inputs.

timm is imported on first use (:func:`_timm`): importing it takes seconds, and a command that builds no model, or
``qvec --help``, must not wait for it.
"""

from __future__ import annotations

import sys
from collections.abc import Collection

import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.models.base import (
    DataConfig,
    ModelAdapter,
    ModelSpec,
    claim_bare_names,
    constructor_options,
    default_bare_family,
    register_adapter,
)
from qvec.models.guard import meta_build
from qvec.models.hub import offline_error, require_weights_file
from qvec.models.loading import load_backbone_weights

# Small ViTs for the CPU-scale replication: 32x32 inputs, 4x4 patches (64 tokens + class token).
# Their training and evaluation throughput is in docs/training.md ("Training and evaluation throughput").
SMALL_VITS: dict[str, dict] = {
    "vit-nano": dict(embed_dim=96, depth=4, num_heads=3),
    "vit-mini": dict(embed_dim=128, depth=6, num_heads=4),
    "vit-small": dict(embed_dim=192, depth=6, num_heads=3),
    "vit-base": dict(embed_dim=256, depth=8, num_heads=4),
}
SMALL_VIT_MEAN = (0.5, 0.5, 0.5)
SMALL_VIT_STD = (0.5, 0.5, 0.5)
_SMALL_DEFAULTS = dict(img_size=32, patch_size=4, mlp_ratio=4.0, class_token=True, global_pool="token")


def _timm():
    """``timm``, imported on first use."""
    import timm

    return timm


def _vision_transformer() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def build_small_vit(name: str, num_classes: int, **overrides) -> nn.Module:
    """A timm ``VisionTransformer`` sized for 32x32 images (``name`` from :data:`SMALL_VITS`)."""
    if name not in SMALL_VITS:
        raise QvecError(f"unknown built-in model {name!r}; known: {', '.join(SMALL_VITS)}")
    cfg = {**_SMALL_DEFAULTS, **SMALL_VITS[name], **overrides}
    width, heads = cfg.get("embed_dim"), cfg.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        raise QvecError(f"qvec:{name}: width embed_dim = {width} is not divisible by num_heads = {heads} "
                        f"(each head takes embed_dim / num_heads channels)")
    return _vision_transformer()(num_classes=num_classes, **cfg)


@register_adapter
class SmallViTAdapter(ModelAdapter):
    """qvec's own 32x32 ViTs (timm ``VisionTransformer`` configs); weights only from local files."""

    family = "qvec"
    has_hub_weights = False
    head_prefixes = ("head",)

    def build(self, spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
        if pretrained and not weights:
            raise QvecError(
                f"built-in model {spec.name!r} has no hub weights; pretrain one with 'qvec pretrain' and pass its file"
            )
        model = _check_patch_grid(build_small_vit(spec.name, spec.num_classes, **spec.options), spec)
        if weights:
            load_backbone_weights(model, weights, self)
        return model

    def data_config(self, spec: ModelSpec, model: nn.Module | None = None) -> DataConfig:
        return DataConfig(int(spec.options.get("img_size", 32)), SMALL_VIT_MEAN, SMALL_VIT_STD, "bilinear")

    def check_spec(self, spec: ModelSpec) -> None:
        meta_build(spec.with_classes(spec.num_classes or 2))  # options and size, on the meta device

    def option_names(self, spec: ModelSpec) -> Collection[str]:
        return constructor_options(_vision_transformer())

    def names(self) -> list[str]:
        return list(SMALL_VITS)


claim_bare_names(SmallViTAdapter.family, lambda: list(SMALL_VITS))


def _check_patch_grid(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """A ViT whose input size is not a multiple of its patch size cannot run (timm only fails at forward time)."""
    pe = getattr(model, "patch_embed", None)
    size, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if size and patch and not getattr(pe, "dynamic_img_pad", False):
        if any(s % p for s, p in zip(size, patch, strict=False)):
            raise QvecError(f"{spec}: input size {size[0]} px is not a multiple of the patch size {patch[0]} "
                            f"(try {max(1, size[0] // patch[0]) * patch[0]} or {(size[0] // patch[0] + 1) * patch[0]})")
    return model


@register_adapter
class TimmAdapter(ModelAdapter):
    """Any timm ViT by name (``vit_base_patch16_224.orig_in21k``); weights from the hub or a local file."""

    family = "timm"
    head_prefixes = ("head",)

    def build(self, spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
        """``weights`` may be any timm-layout file of this architecture (e.g. 518-px DINOv2 loaded at 112 px):
        timm's checkpoint filter resamples its position embedding and a head of another size is replaced."""
        kwargs = dict(spec.options)
        if spec.num_classes:
            kwargs["num_classes"] = spec.num_classes
        try:
            if weights:
                require_weights_file(weights)
            model = _check_patch_grid(_timm().create_model(spec.name, pretrained=pretrained and not weights, **kwargs),
                                      spec)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise QvecError(
                    f"unknown timm model {spec.name!r}; see timm.list_models('vit_*') for the known ones"
                ) from None
            raise
        except TypeError as e:  # a model option timm's constructor does not take
            raise QvecError(f"timm model {spec.name!r} does not accept these options {spec.options}: {e}") from None
        except OSError as e:  # hub download failed (offline, gated, missing file)
            raise offline_error(f"timm:{spec.name}", e, hint=f"hf download timm/{spec.name}") from None
        if weights:
            load_backbone_weights(model, weights, self)
        return model

    def check_spec(self, spec: ModelSpec) -> None:
        meta_build(spec.with_classes(spec.num_classes or 2))  # options and size, on the meta device

    def filter_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The state through the checkpoint filter of the model's timm module (``checkpoint_filter_fn``), as
        timm's own ``load_pretrained`` does: position embeddings resampled to the model's patch grid."""
        fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        return fn(state, model) if fn is not None else state

    def data_config(self, spec: ModelSpec, model: nn.Module | None = None) -> DataConfig:
        """timm's data config (mean, std, interpolation) at the size the model was built for (``img_size``)."""
        timm = _timm()
        if model is None:
            model = timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes or 0, **spec.options)
        cfg = timm.data.resolve_data_config({}, model=model)
        size = cfg["input_size"][-1]
        grid_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if grid_size:
            size = grid_size[-1] if isinstance(grid_size, tuple | list) else int(grid_size)
        return DataConfig(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))

    def names(self) -> list[str]:
        return _timm().list_models("vit_*")


default_bare_family(TimmAdapter.family)  # any other bare name is a timm architecture
