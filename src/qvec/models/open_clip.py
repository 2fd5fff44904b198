"""OpenCLIP image encoders with frozen zero-shot heads (family ``open_clip``; SPEC sections 4 and 6).

``ModelSpec("open_clip", "ViT-B-32", options={"pretrained": "openai"})`` is OpenCLIP's ViT-B/32 with OpenAI's
weights. The qvec model is the image tower (``visual.*``, OpenCLIP's own key names) plus a zero-shot head
(``head.weight``); the text tower is loaded beside it only to build heads and never enters a checkpoint.

Options read from ``ModelSpec.options``:

* ``pretrained``: an OpenCLIP pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...) or the path of a local
  OpenCLIP checkpoint. The tag also fixes preprocessing (mean/std) and QuickGELU, so keep it when loading weights
  from a file that holds that tag's weights (``--weights`` or the ``file`` option).
* ``file``: a local copy of the tag's weights (e.g. ``open_clip_pytorch_model.bin``) to load instead of the hub;
  keeping the tag keeps its preprocessing and QuickGELU.
* ``quick_gelu``: force QuickGELU on or off (default: what the model config or the tag says).
* ``model_cfg``: a full OpenCLIP model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for an architecture
  OpenCLIP does not ship; it is registered under the spec's name with ``open_clip.add_model_config``.

Quantization targets are the image tower's ``nn.Linear`` weights (``mlp.c_fc``, ``mlp.c_proj``, the attention's
``out_proj``) and the fused ``in_proj_weight`` of each ``nn.MultiheadAttention`` (off with
``include_in_proj=False``, the authors' PTQ). ``visual.proj`` is a plain parameter and ``visual.conv1`` the
patch-embedding convolution: both stay in float.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.models.base import DataConfig, ModelAdapter, ModelSpec, register_adapter
from qvec.models.hub import offline_error, require_weights_file
from qvec.models.loading import load_backbone_weights
from qvec.models.zeroshot import TextTower, ZeroShotClassifier, ZeroShotHead, init_zeroshot_head

# ------------------------------------------------------------------------------------------ configs


def _oc():
    """``open_clip``, imported on first use (it takes seconds; most qvec commands never need it)."""
    import open_clip

    return open_clip

_REGISTERED: dict[str, str] = {}  # custom config name -> its JSON, registered in this process
_CONFIG_DIR: Path | None = None


def _register_config(name: str, cfg: dict) -> None:
    """Make a custom ``model_cfg`` known to OpenCLIP under ``name`` (its public ``add_model_config``)."""
    global _CONFIG_DIR
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise QvecError("open_clip model_cfg must be a dict with 'embed_dim', 'vision_cfg' and 'text_cfg'")
    text = json.dumps(cfg, sort_keys=True)
    if _REGISTERED.get(name) == text:
        return
    if name not in _REGISTERED and name in _oc().list_models():
        if _oc().get_model_config(name) != cfg:
            raise QvecError(f"open_clip already defines {name!r} differently; give the custom model_cfg another name")
        return
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise QvecError(f"open_clip model name {name!r}: use letters, digits and -_.+ for a custom model_cfg")
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="qvec-open_clip-configs-"))
    path = _CONFIG_DIR / f"{name}.json"
    path.write_text(text)
    _oc().add_model_config(path)
    _REGISTERED[name] = text


def model_config(spec: ModelSpec) -> dict:
    """The OpenCLIP architecture config of ``spec`` (a copy)."""
    custom = spec.options.get("model_cfg")
    if custom is not None:
        _register_config(spec.name, custom)
        return copy.deepcopy(custom)
    cfg = _oc().get_model_config(spec.name)
    if cfg is None:
        raise QvecError(
            f"unknown open_clip model {spec.name!r}; see open_clip.list_models() (e.g. ViT-B-32, ViT-B-16, ViT-L-14, "
            "ViT-H-14) or give a model_cfg"
        )
    return cfg


def _is_path(text: str) -> bool:
    suffixes = (".pt", ".pth", ".bin", ".safetensors")
    return os.path.isfile(text) or os.sep in text or "/" in text or text.endswith(suffixes)


def _tag(spec: ModelSpec) -> str | None:
    """The pretrained tag of ``spec`` (None when absent or a file path)."""
    tag = spec.options.get("pretrained")
    return None if not tag or _is_path(str(tag)) else str(tag)


def _tag_cfg(spec: ModelSpec) -> dict:
    tag = _tag(spec)
    if tag is None:
        return {}
    cfg = _oc().get_pretrained_cfg(spec.name, tag)
    if not cfg:
        known = _oc().list_pretrained_tags_by_model(spec.name)
        raise QvecError(
            f"open_clip:{spec.name} has no pretrained tag {tag!r}; known: {', '.join(known) or 'none'} "
            "(or pass a local checkpoint file)"
        )
    return cfg


def quick_gelu(spec: ModelSpec, cfg: dict | None = None) -> bool:
    """Whether the towers use QuickGELU: the option, else the model config, else the tag (OpenAI weights do)."""
    if "quick_gelu" in spec.options:
        return bool(spec.options["quick_gelu"])
    cfg = cfg if cfg is not None else model_config(spec)
    return bool(cfg.get("quick_gelu", False) or _tag_cfg(spec).get("quick_gelu", False))


def preprocess_config(spec: ModelSpec, cfg: dict | None = None) -> dict:
    """OpenCLIP's preprocessing for ``spec``: its defaults, the model config's, the tag's, the tower's size."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = cfg if cfg is not None else model_config(spec)
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), cfg.get("preprocess_cfg", {}))
    pp = merge_preprocess_dict(pp, _tag_cfg(spec))
    pp["size"] = cfg["vision_cfg"].get("image_size", pp["size"])
    return pp


# ------------------------------------------------------------------------------------------ modules


class OpenCLIPClassifier(ZeroShotClassifier):
    """OpenCLIP image tower + frozen zero-shot head: images -> logits."""

    def __init__(self, visual: nn.Module, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = ZeroShotHead(num_classes, embed_dim)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class OpenCLIPText(TextTower):
    """The text half of an OpenCLIP model (the image tower is detached first, so moving it moves nothing else)."""

    def __init__(self, clip: nn.Module, tokenizer) -> None:
        clip.visual = nn.Identity()
        self.clip = clip.eval()
        self.tokenizer = tokenizer

    def modules(self) -> list[nn.Module]:
        return [self.clip]

    def encode(self, texts, device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(device)
        return self.clip.encode_text(tokens)

    def state(self) -> dict[str, torch.Tensor]:
        return self.clip.state_dict()

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().reshape(-1)[0])

    def tokenizer_id(self) -> str:
        return f"open_clip:{type(self.tokenizer).__name__}:{getattr(self.tokenizer, 'context_length', '')}"


def _vision_tower(cfg: dict, quick: bool) -> nn.Module:
    """The image tower alone, built exactly as ``open_clip.CLIP`` builds it (no text tower: fast, small)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]), quick, None)


def _image_only_file(path: Path) -> bool:
    """True for a file holding only an image tower (and maybe a head), e.g. a qvec checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises several types on corrupt files
            raise QvecError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    else:
        from qvec.core.checkpoint import read_any_state_dict

        keys = list(read_any_state_dict(path))
    return bool(keys) and all(k.startswith(("visual.", "head.")) for k in keys)


@register_adapter
class OpenCLIPAdapter(ModelAdapter):
    """OpenCLIP ViTs by architecture name and pretrained tag (or a local checkpoint), zero-shot heads."""

    family = "open_clip"
    head_prefixes = ("head",)

    def build(self, spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
        cfg = model_config(spec)
        quick = quick_gelu(spec, cfg)
        source = weights
        if source is None and pretrained:
            src = spec.options.get("file") or spec.options.get("pretrained")
            if not src:
                known = ", ".join(_oc().list_pretrained_tags_by_model(spec.name)) or "none"
                raise QvecError(
                    f"open_clip:{spec.name} needs a pretrained tag (--pretrained TAG; known: {known}) "
                    "or a local checkpoint (--weights FILE)"
                )
            source = str(src)
        if source is None:
            model = OpenCLIPClassifier(_vision_tower(cfg, quick), spec.num_classes, cfg["embed_dim"])
        elif weights is not None or _is_path(source):
            model = self._from_file(spec, cfg, quick, require_weights_file(source))
        else:
            model = self._from_tag(spec, cfg, quick)
        model.data_cfg = self.data_config(spec)
        return model

    def _from_tag(self, spec: ModelSpec, cfg: dict, quick: bool) -> OpenCLIPClassifier:
        tag, tcfg = _tag(spec), _tag_cfg(spec)
        try:
            clip = _oc().create_model(spec.name, pretrained=tag, force_quick_gelu=quick)
        except RuntimeError as e:
            if "download" not in str(e).lower():
                raise QvecError(f"open_clip:{spec.name} ({tag}): {str(e).splitlines()[0][:200]}") from None
            repo, fname = os.path.split(tcfg.get("hf_hub", ""))  # OpenCLIP's own 'org/name/[file]' convention
            hint = f"hf download {repo} {fname or 'open_clip_pytorch_model.bin'}" if repo else f"curl -LO {tcfg['url']}"
            raise offline_error(f"open_clip:{spec.name} ({tag})", e, hint=hint) from None
        return self._wrap(spec, cfg, clip)

    def _from_file(self, spec: ModelSpec, cfg: dict, quick: bool, path: Path) -> OpenCLIPClassifier:
        if _image_only_file(path):  # an image tower (e.g. a qvec checkpoint): no text tower to build heads with
            model = OpenCLIPClassifier(_vision_tower(cfg, quick), spec.num_classes, cfg["embed_dim"])
            load_backbone_weights(model, path, self)
            return model
        try:
            clip = _oc().create_model(spec.name, pretrained=str(path), force_quick_gelu=quick)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise QvecError(f"{path}: not an OpenCLIP {spec.name} checkpoint ({first})") from None
        return self._wrap(spec, cfg, clip)

    def _wrap(self, spec: ModelSpec, cfg: dict, clip: nn.Module) -> OpenCLIPClassifier:
        model = OpenCLIPClassifier(clip.visual, spec.num_classes, cfg["embed_dim"])
        try:
            tokenizer = _oc().get_tokenizer(spec.name)
        except (OSError, RuntimeError, ValueError) as e:
            raise offline_error(f"the tokenizer of open_clip:{spec.name}", e, hint=f"hf download {spec.name}") from None
        model.attach_text_tower(OpenCLIPText(clip, tokenizer))
        return model

    def data_config(self, spec: ModelSpec, model: nn.Module | None = None) -> DataConfig:
        cached = getattr(model, "data_cfg", None) if model is not None else None
        if isinstance(cached, DataConfig):
            return cached
        pp = preprocess_config(spec)
        size = pp["size"]
        size = int(size[-1]) if isinstance(size, list | tuple) else int(size)
        return DataConfig(size, tuple(pp["mean"]), tuple(pp["std"]), pp.get("interpolation", "bicubic"))

    def trainable_head(self, spec: ModelSpec) -> bool:
        return False

    def init_head(self, model: nn.Module, spec: ModelSpec, classnames: list[str], task: str) -> None:
        """Install the task's zero-shot head; a model loaded without its text tower borrows the tag's."""
        has_source = spec.options.get("pretrained") or spec.options.get("file")
        if isinstance(model, ZeroShotClassifier) and model.text_tower is None and has_source:
            model.attach_text_tower(self.build(spec, pretrained=True).text_tower)
        init_zeroshot_head(model, classnames, task)

    def names(self) -> list[str]:
        return [n for n in _oc().list_models() if n.startswith("ViT")]
