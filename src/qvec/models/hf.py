"""Hugging Face ``transformers`` models: CLIP with zero-shot heads (``hf-clip``) and ViT classifiers (``hf-vit``).

``hf-clip:openai/clip-vit-base-patch16`` is ``transformers.CLIPModel``'s image half (``vision_model.*`` and
``visual_projection.weight``, the hub's own key names) plus a frozen zero-shot head (``head.weight``) built from its
text half, which is kept beside the model and never enters a checkpoint. ``hf-vit:google/vit-base-patch16-224-in21k``
is ``ViTForImageClassification`` (``vit.*``) with a new linear head (``classifier.*``) trained with the backbone.

The name is a hub id or a local directory (``save_pretrained`` / ``hf download --local-dir``). Options read from
``ModelSpec.options``:

* ``config``: a full ``CLIPConfig`` / ``ViTConfig`` as a dict (``config.to_dict()``), for architectures that are not
  on the hub, e.g. tiny test models. Without it the config comes from the name: a directory, a small built-in table of
  the paper's models (so checkpoints reload with no network), then the hub cache.

Quantization targets are every ``nn.Linear`` weight of the image encoder: the separate ``q/k/v/out_proj`` of the
attention, ``fc1``/``fc2`` of the MLP and, for CLIP, ``visual_projection`` (an ``nn.Linear`` here, unlike OpenCLIP's
``visual.proj`` parameter). The patch-embedding convolution, embeddings and norms stay in float.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from qvec.core.checkpoint import read_any_state_dict
from qvec.core.errors import QvecError
from qvec.models.base import DataConfig, ModelAdapter, ModelSpec, register_adapter
from qvec.models.hub import offline_error, require_weights_file
from qvec.models.loading import check_state_matches
from qvec.models.zeroshot import TextTower, ZeroShotClassifier, ZeroShotHead, init_zeroshot_head

_HF_ERRORS = (OSError, ValueError)

# Configs of the paper's models (SPEC section 6), so their checkpoints rebuild with no hub access.
_CLIP_VISION_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
KNOWN_CLIP: dict[str, dict] = {
    "openai/clip-vit-base-patch32": dict(vision_config={**_CLIP_VISION_B, "patch_size": 32}, text_config=_CLIP_TEXT_B,
                                         projection_dim=512),
    "openai/clip-vit-base-patch16": dict(vision_config={**_CLIP_VISION_B, "patch_size": 16}, text_config=_CLIP_TEXT_B,
                                         projection_dim=512),
    "openai/clip-vit-large-patch14": dict(
        vision_config={**_CLIP_VISION_B, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "patch_size": 14},
        text_config={**_CLIP_TEXT_B, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        projection_dim=768,
    ),
}
_VIT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
            image_size=224, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True)
KNOWN_VIT: dict[str, dict] = {
    "google/vit-base-patch16-224-in21k": _VIT,
    "google/vit-base-patch16-224": _VIT,
    "google/vit-large-patch16-224-in21k": {**_VIT, "hidden_size": 1024, "intermediate_size": 4096,
                                           "num_hidden_layers": 24, "num_attention_heads": 16},
    "google/vit-huge-patch14-224-in21k": {**_VIT, "hidden_size": 1280, "intermediate_size": 5120,
                                          "num_hidden_layers": 32, "num_attention_heads": 16, "patch_size": 14},
}
_DATA_CONFIGS: dict[str, DataConfig] = {}  # per spec: resolving an image processor may read the hub cache
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _hub_config(cls, spec: ModelSpec):
    """The config of ``spec`` from its options, its directory, the built-in table or the hub cache."""
    if "config" in spec.options:
        try:
            return cls.from_dict(copy.deepcopy(spec.options["config"]))
        except (TypeError, ValueError, KeyError) as e:
            raise QvecError(f"{spec}: malformed 'config' option ({_first_line(e)})") from None
    try:
        return cls.from_pretrained(spec.name)
    except _HF_ERRORS as e:
        raise offline_error(f"the config of {spec}", e, hint=f"hf download {spec.name} config.json") from None


def _resample_name(resample) -> str:
    value = getattr(resample, "value", resample)
    return _RESAMPLE.get(int(value), "bicubic") if value is not None else "bicubic"


def _size_of(size) -> int | None:
    """The square side of an image processor's ``size``/``crop_size`` (dict or SizeDict)."""
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    for key in ("height", "shortest_edge", "width"):
        if get(key):
            return int(get(key))
    return None


def _processor_data_config(spec: ModelSpec, default_cls, image_size: int, source: str | None) -> DataConfig:
    """Mean/std/size/resampling from the model's image processor (directory or hub cache), else the defaults.

    A model with a custom ``config`` option and no directory has no processor: the class defaults with the config's
    image size.
    """
    proc = None
    if source is not None:
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(source)
        except (*_HF_ERRORS, ImportError, KeyError):
            proc = None
    size = None
    if proc is not None:
        size = _size_of(getattr(proc, "crop_size", None)) if getattr(proc, "do_center_crop", False) else None
        size = size or _size_of(getattr(proc, "size", None))
    else:
        proc = default_cls()
    return DataConfig(
        int(size or image_size),
        tuple(float(x) for x in proc.image_mean),
        tuple(float(x) for x in proc.image_std),
        _resample_name(getattr(proc, "resample", 3)),
    )


def _processor_source(spec: ModelSpec, weights: str | None) -> str | None:
    """Where an image processor may be found: the weights directory, else the name unless it is a custom config."""
    if weights and os.path.isdir(weights):
        return weights
    return None if "config" in spec.options and not os.path.isdir(spec.name) else spec.name


def _from_pretrained(cls, source: str, what: str, allow_missing: tuple[str, ...] = (), **kwargs):
    """``cls.from_pretrained(source)`` that fails on missing weights (transformers would initialise them randomly)."""
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    except _HF_ERRORS as e:
        raise offline_error(what, e, hint=f"hf download {source}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(allow_missing)]
    if missing:
        raise QvecError(f"{source}: weights for {what} lack {missing[0]!r} ({len(missing)} missing in all)")
    return model


def _from_pretrained_file(cls, cfg, path: Path, what: str, **kwargs):
    """Load a single hub-format weights file with transformers (which converts older key layouts)."""
    with tempfile.TemporaryDirectory(prefix="qvec-hf-") as d:
        cfg.save_pretrained(d)
        name = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
        os.symlink(path.resolve(), Path(d) / name)
        return _from_pretrained(cls, d, what, local_files_only=True, **kwargs)


def _source(spec: ModelSpec, pretrained: bool, weights: str | None) -> str | None:
    """Where pretrained weights come from: a weights file or directory, else the name (hub id or directory)."""
    if weights:
        return weights
    if not pretrained:
        return None
    if "config" in spec.options and not os.path.isdir(spec.name):
        raise QvecError(f"{spec} has a custom config and no hub weights; pass a weights file or directory")
    return spec.name


# --------------------------------------------------------------------------------------------- hf-clip


class HFCLIPClassifier(ZeroShotClassifier):
    """``CLIPModel``'s image encoder and projection + frozen zero-shot head: images -> logits."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear, num_classes: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = ZeroShotHead(num_classes, visual_projection.out_features)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=images).pooler_output)


class _BPETokenizer:
    """OpenAI's CLIP BPE (bundled with OpenCLIP): the same token ids as the hub's CLIPTokenizer for CLIP vocabularies.

    Used when the model directory or cache has no tokenizer files, so heads can be built offline.
    """

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.tok = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.eot = self.tok.eot_token_id

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tok(texts)
        upto_eot = (ids == self.eot).int().cumsum(dim=1) - (ids == self.eot).int() == 0
        return ids, upto_eot.long()


class HFCLIPText(TextTower):
    """``CLIPModel``'s text encoder, text projection and logit scale (detached from the image half)."""

    def __init__(self, clip: nn.Module, tokenizer, tokenizer_name: str) -> None:
        self.text_model = clip.text_model.eval()
        self.text_projection = clip.text_projection
        self._logit_scale = float(clip.logit_scale.detach())
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name
        self.max_length = int(clip.config.text_config.max_position_embeddings)

    def modules(self) -> list[nn.Module]:
        return [self.text_model, self.text_projection]

    def encode(self, texts, device: torch.device) -> torch.Tensor:
        if isinstance(self.tokenizer, _BPETokenizer):
            ids, mask = self.tokenizer(list(texts))
        else:
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        out = self.text_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return self.text_projection(out.pooler_output)

    def state(self) -> dict[str, torch.Tensor]:
        state = {f"text_model.{k}": v for k, v in self.text_model.state_dict().items()}
        state.update({f"text_projection.{k}": v for k, v in self.text_projection.state_dict().items()})
        state["logit_scale"] = torch.tensor(self._logit_scale)
        return state

    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    def tokenizer_id(self) -> str:
        return f"hf:{self.tokenizer_name}:{self.max_length}"


def _clip_tokenizer(source: str | None, clip: nn.Module):
    """The hub/directory tokenizer when present, else OpenAI's BPE (all CLIP vocabularies of 49408 use it)."""
    if source is not None:
        from transformers import AutoTokenizer

        tcfg = clip.config.text_config
        try:
            tok = AutoTokenizer.from_pretrained(source)
            if len(tok) >= 0.9 * tcfg.vocab_size:  # transformers builds an empty tokenizer when files are missing
                return tok, f"{type(tok).__name__}:{source}"
        except (*_HF_ERRORS, ImportError, KeyError, TypeError):
            pass
    tcfg = clip.config.text_config
    if tcfg.vocab_size != 49408:
        raise QvecError(
            f"no tokenizer found for this CLIP model (vocabulary {tcfg.vocab_size}); put its tokenizer files "
            "(tokenizer.json or vocab.json + merges.txt) beside its weights"
        )
    return _BPETokenizer(int(tcfg.max_position_embeddings)), "openai-bpe"


@register_adapter
class HFCLIPAdapter(ModelAdapter):
    """``transformers.CLIPModel`` (hub id or directory) as an image classifier with a zero-shot head."""

    family = "hf-clip"
    head_prefixes = ("head",)

    def config(self, spec: ModelSpec):
        from transformers import CLIPConfig

        if "config" not in spec.options and spec.name in KNOWN_CLIP and not os.path.isdir(spec.name):
            return CLIPConfig(**copy.deepcopy(KNOWN_CLIP[spec.name]))
        return _hub_config(CLIPConfig, spec)

    def _vision_only(self, spec: ModelSpec, cfg) -> HFCLIPClassifier:
        from transformers import CLIPVisionModelWithProjection

        vcfg = copy.deepcopy(cfg.vision_config)
        vcfg.projection_dim = cfg.projection_dim
        vm = CLIPVisionModelWithProjection(vcfg)
        return HFCLIPClassifier(vm.vision_model, vm.visual_projection, spec.num_classes)

    def build(self, spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
        from transformers import CLIPImageProcessor, CLIPModel

        source = _source(spec, pretrained, weights)
        if source is None:
            cfg = self.config(spec)
            model = self._vision_only(spec, cfg)
        elif os.path.isdir(source) or not weights:
            clip = _from_pretrained(CLIPModel, source, f"hf-clip:{source}")
            cfg = clip.config
            model = self._wrap(spec, clip, source)
        else:
            cfg = self.config(spec)
            model = self._from_file(spec, cfg, require_weights_file(source))
        if source is not None:  # a checkpoint rebuild (source None) must not touch the hub: data_config is lazy
            size = int(cfg.vision_config.image_size)
            model.data_cfg = _processor_data_config(spec, CLIPImageProcessor, size, _processor_source(spec, weights))
        return model

    def _from_file(self, spec: ModelSpec, cfg, path: Path) -> HFCLIPClassifier:
        from transformers import CLIPModel

        state = read_any_state_dict(path)
        if all(k.startswith(("vision_model.", "visual_projection.", "head.")) for k in state):
            model = self._vision_only(spec, cfg)  # an image encoder (e.g. a qvec checkpoint): no text half
            _load_backbone_state(model, state, str(path), self)
            return model
        del state
        clip = _from_pretrained_file(CLIPModel, cfg, path, f"hf-clip:{spec.name}")
        return self._wrap(spec, clip, None)

    def _wrap(self, spec: ModelSpec, clip: nn.Module, source: str | None) -> HFCLIPClassifier:
        model = HFCLIPClassifier(clip.vision_model, clip.visual_projection, spec.num_classes)
        tokenizer, name = _clip_tokenizer(source, clip)
        model.attach_text_tower(HFCLIPText(clip, tokenizer, name))
        return model

    def data_config(self, spec: ModelSpec, model: nn.Module | None = None) -> DataConfig:
        cached = getattr(model, "data_cfg", None) if model is not None else None
        if isinstance(cached, DataConfig):
            return cached
        from transformers import CLIPImageProcessor

        key = spec.with_classes(0).to_json()
        if key not in _DATA_CONFIGS:
            size = int(self.config(spec).vision_config.image_size)
            _DATA_CONFIGS[key] = _processor_data_config(spec, CLIPImageProcessor, size, _processor_source(spec, None))
        return _DATA_CONFIGS[key]

    def trainable_head(self, spec: ModelSpec) -> bool:
        return False

    def init_head(self, model: nn.Module, spec: ModelSpec, classnames: list[str], task: str) -> None:
        """Install the task's zero-shot head; a model loaded without its text half borrows the hub model's."""
        has_source = "config" not in spec.options or os.path.isdir(spec.name)
        if isinstance(model, ZeroShotClassifier) and model.text_tower is None and has_source:
            model.attach_text_tower(self.build(spec, pretrained=True).text_tower)
        init_zeroshot_head(model, classnames, task)

    def names(self) -> list[str]:
        return list(KNOWN_CLIP)


# ---------------------------------------------------------------------------------------------- hf-vit


class HFViTClassifier(nn.Module):
    """``ViTForImageClassification`` returning plain logits (same modules and keys: ``vit.*``, ``classifier.*``)."""

    def __init__(self, vit: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vit(pixel_values=images).last_hidden_state[:, 0, :])


def _load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, adapter: ModelAdapter) -> None:
    """Every backbone key must match; a head of another size (another task's classes) is dropped."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (adapter.is_head(k) and (k not in own or own[k].shape != v.shape))}
    check_state_matches(own, state, source, keys=[k for k in own if not adapter.is_head(k)])
    model.load_state_dict(state, strict=False)


@register_adapter
class HFViTAdapter(ModelAdapter):
    """``transformers.ViTForImageClassification`` with a new linear head trained jointly (SPEC section 4)."""

    family = "hf-vit"
    head_prefixes = ("classifier",)

    def config(self, spec: ModelSpec):
        from transformers import ViTConfig

        if "config" not in spec.options and spec.name in KNOWN_VIT and not os.path.isdir(spec.name):
            cfg = ViTConfig(**KNOWN_VIT[spec.name])
        else:
            cfg = _hub_config(ViTConfig, spec)
        cfg.num_labels = spec.num_classes or cfg.num_labels
        return cfg

    def build(self, spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
        from transformers import ViTForImageClassification, ViTImageProcessor

        source = _source(spec, pretrained, weights)
        kwargs = {"num_labels": spec.num_classes} if spec.num_classes else {}
        load = dict(allow_missing=("classifier.",), ignore_mismatched_sizes=True, **kwargs)
        if source is not None and (os.path.isdir(source) or not weights):
            hf = _from_pretrained(ViTForImageClassification, source, f"hf-vit:{source}", **load)
            model = HFViTClassifier(hf.vit, hf.classifier)
        else:
            hf = ViTForImageClassification(self.config(spec))
            model = HFViTClassifier(hf.vit, hf.classifier)
            if source is not None:
                path = require_weights_file(source)
                state = read_any_state_dict(path)
                if all(k in state for k in model.state_dict() if not self.is_head(k)):  # qvec's own key layout
                    _load_backbone_state(model, state, str(path), self)
                else:  # a hub file (older key names, maybe a bare ViTModel): let transformers convert it
                    del state
                    hf = _from_pretrained_file(ViTForImageClassification, self.config(spec), path,
                                               f"hf-vit:{spec.name}", **load)
                    model = HFViTClassifier(hf.vit, hf.classifier)
        if source is not None:
            size = int(hf.config.image_size)
            model.data_cfg = _processor_data_config(spec, ViTImageProcessor, size, _processor_source(spec, weights))
        return model

    def data_config(self, spec: ModelSpec, model: nn.Module | None = None) -> DataConfig:
        cached = getattr(model, "data_cfg", None) if model is not None else None
        if isinstance(cached, DataConfig):
            return cached
        from transformers import ViTImageProcessor

        key = spec.with_classes(0).to_json()
        if key not in _DATA_CONFIGS:
            size = int(self.config(spec).image_size)
            _DATA_CONFIGS[key] = _processor_data_config(spec, ViTImageProcessor, size, _processor_source(spec, None))
        return _DATA_CONFIGS[key]

    def names(self) -> list[str]:
        return list(KNOWN_VIT)
