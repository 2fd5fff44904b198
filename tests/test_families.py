"""OpenCLIP and Hugging Face families on tiny randomly initialised models (no downloads).

Covers the split into backbone and head, the quantization targets (fused attention included), zero-shot heads
against a hand computation, FT and QAT steps, vector extraction and patching, PTQ and pack/unpack, local weight
files, preprocessing and the one-line errors of an offline machine.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from qvec.core.errors import QvecError
from qvec.models import ModelSpec, build_model, checkpoint_from_model, get_adapter, load_model
from qvec.models.templates import GENERIC_TEMPLATES, TEMPLATES, canonical_task, get_templates
from qvec.models.zeroshot import TextTower, ZeroShotClassifier, build_head, head_cache_path, zeroshot_weights
from qvec.quant import QuantSpec, TargetFilter, find_targets, quantize_
from qvec.quant.pack import load_packed, pack_checkpoint
from qvec.quant.ptq import quantize_checkpoint, target_keys
from qvec.quant.qat import convert_qat, prepare_qat
from qvec.vectors.vector import QuantVector

REPO = Path(__file__).resolve().parents[1]
OC_NAME = "qvec-test-tiny-clip"
OC_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
IMG = 32


@pytest.fixture(autouse=True)
def head_cache(tmp_path, monkeypatch):
    """Every test gets its own zero-shot head cache."""
    monkeypatch.setenv("QVEC_HEAD_CACHE", str(tmp_path / "heads"))
    return tmp_path / "heads"


@pytest.fixture(scope="module")
def oc_file(tmp_path_factory) -> Path:
    """A full OpenCLIP checkpoint (both towers) of the tiny architecture: the 'pretrained' file."""
    import open_clip

    from qvec.models.open_clip import model_config

    model_config(ModelSpec("open_clip", OC_NAME, 0, {"model_cfg": OC_CFG}))  # registers the custom config
    torch.manual_seed(0)
    clip = open_clip.create_model(OC_NAME)
    path = tmp_path_factory.mktemp("oc") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny ``CLIPModel`` saved with ``save_pretrained`` (no tokenizer files: the bundled BPE is used)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMG, patch_size=8),
        projection_dim=24,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hfclip") / "tiny-clip"
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG},
                       image_mean=[0.25, 0.5, 0.75], image_std=[0.2, 0.3, 0.4]).save_pretrained(d)
    return d


def vit_config() -> dict:
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=IMG, patch_size=8).to_dict()


def oc_spec(n: int = 3) -> ModelSpec:
    return ModelSpec("open_clip", OC_NAME, n, {"model_cfg": OC_CFG})


def specs_and_weights(family: str, oc_file: Path, hf_clip_dir: Path, n: int = 3) -> tuple[ModelSpec, str | None]:
    """The spec of a tiny model of ``family`` and the local weights that stand for its pretrained backbone."""
    if family == "open_clip":
        return oc_spec(n), str(oc_file)
    if family == "hf-clip":
        return ModelSpec("hf-clip", str(hf_clip_dir), n), str(hf_clip_dir)
    return ModelSpec("hf-vit", "tiny-vit", n, {"config": vit_config()}), None


FAMILIES = ["open_clip", "hf-clip", "hf-vit"]


def pretrained(family: str, oc_file: Path, hf_clip_dir: Path, classes: list[str], task: str, seed: int = 0):
    """theta_0 of ``family`` with the task's head: CLIP heads from the text tower, a seeded linear head for ViT."""
    spec, weights = specs_and_weights(family, oc_file, hf_clip_dir, len(classes))
    torch.manual_seed(seed)
    model = build_model(spec, weights=weights)
    adapter = get_adapter(spec)
    adapter.init_head(model, spec, classes, task)
    return model, adapter, spec


def train_step(model: nn.Module, adapter, spec: ModelSpec, qat: QuantSpec | None = None, seed: int = 1) -> None:
    """One AdamW step on a random batch, the head frozen when the family says so (SPEC section 4)."""
    if qat is not None:
        prepare_qat(model, qat, find_targets(model, adapter.head_prefixes))
    if not adapter.trainable_head(spec):
        for name, p in model.named_parameters():
            if adapter.is_head(name):
                p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, IMG, IMG, generator=g)
    y = torch.randint(0, spec.num_classes, (4,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    model.train()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if qat is not None:
        convert_qat(model)
    model.eval()


def distinct_per_row_at_most(w: torch.Tensor, n: int) -> bool:
    return all(len(torch.unique(row)) <= n for row in w.reshape(w.shape[0], -1))


# -------------------------------------------------------------------------------- backbone and targets


def test_open_clip_backbone_keys_and_targets():
    spec = oc_spec()
    adapter = get_adapter(spec)
    model = build_model(spec)
    state = model.state_dict()
    keys = adapter.backbone_keys(state)
    assert "head.weight" in state and "head.weight" not in keys
    assert set(keys) == {k for k in state if k.startswith("visual.")}
    for k in ("visual.proj", "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
              "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.in_proj_bias",
              "visual.ln_post.weight"):
        assert k in keys
    blk = "visual.transformer.resblocks.{}."
    expected = [blk.format(i) + s for i in range(2)
                for s in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]
    assert [t.key for t in find_targets(model, adapter.head_prefixes)] == expected
    without = [t.key for t in find_targets(model, adapter.head_prefixes, TargetFilter(in_proj=False))]
    assert without == [k for k in expected if "in_proj" not in k]
    assert target_keys(spec) == expected  # the meta-device build of PTQ sees the same targets
    assert target_keys(spec, TargetFilter(in_proj=False)) == without

    # PTQ: the fused projections are quantized, visual.proj, the patch embedding and the head stay float.
    before = {k: v.clone() for k, v in state.items()}
    quantize_(model, QuantSpec(bits=3), find_targets(model, adapter.head_prefixes))
    after = model.state_dict()
    for k in expected:
        assert distinct_per_row_at_most(after[k], 8) and not torch.equal(after[k], before[k])
    for k in ("visual.proj", "visual.conv1.weight", "head.weight", "visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert torch.equal(after[k], before[k])


def test_hf_backbone_keys_and_targets(hf_clip_dir):
    spec = ModelSpec("hf-clip", str(hf_clip_dir), 3)
    adapter = get_adapter(spec)
    model = build_model(spec)
    keys = adapter.backbone_keys(model.state_dict())
    assert "head.weight" not in keys and "visual_projection.weight" in keys
    assert "vision_model.embeddings.patch_embedding.weight" in keys
    per_layer = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    expected = {f"vision_model.encoder.layers.{i}.{m}.weight" for i in range(2) for m in per_layer}
    expected.add("visual_projection.weight")  # an nn.Linear in transformers (OpenCLIP's proj is a parameter)
    assert {t.key for t in find_targets(model, adapter.head_prefixes)} == expected
    assert set(target_keys(spec)) == expected

    vspec = ModelSpec("hf-vit", "tiny-vit", 5, {"config": vit_config()})
    vadapter = get_adapter(vspec)
    vit = build_model(vspec)
    vkeys = vadapter.backbone_keys(vit.state_dict())
    assert {"classifier.weight", "classifier.bias"} & set(vkeys) == set()
    assert set(vkeys) == {k for k in vit.state_dict() if k.startswith("vit.")}
    vt = [t.key for t in find_targets(vit, vadapter.head_prefixes)]
    assert len(vt) == 2 * 6 and not any(k.startswith("classifier") for k in vt)
    assert vadapter.trainable_head(vspec) and not adapter.trainable_head(spec)
    assert vit(torch.randn(2, 3, IMG, IMG)).shape == (2, 5)


# ---------------------------------------------------------------------------------------- zero-shot heads


class TableTextEncoder(TextTower):
    """A text encoder whose embeddings are a lookup table (an ``nn.Embedding`` over a fixed set of prompts)."""

    def __init__(self, table: dict[str, list[float]], logit_scale: float) -> None:
        self.prompts = list(table)
        self.emb = nn.Embedding.from_pretrained(torch.tensor([table[p] for p in self.prompts]))
        self._logit_scale = logit_scale

    def modules(self) -> list[nn.Module]:
        return [self.emb]

    def encode(self, texts, device):
        return self.emb(torch.tensor([self.prompts.index(t) for t in texts], device=device))

    def state(self):
        return {"emb": self.emb.weight}

    @property
    def logit_scale(self) -> float:
        return self._logit_scale


def test_zeroshot_head_by_hand(head_cache):
    """Two classes, two templates: normalise each prompt, average, renormalise, scale by exp(logit_scale)."""
    table = {"a cat.": [3.0, 4.0], "the cat.": [0.0, 2.0], "a dog.": [-5.0, 0.0], "the dog.": [0.0, -0.5]}
    tower = TableTextEncoder(table, math.log(100.0))
    w = zeroshot_weights(tower, ["cat", "dog"], ["a {}.", "the {}."], device="cpu")
    # cat: (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9); dog: (-1, 0), (0, -1) -> (-1, -1) / sqrt(2)
    expected = 100.0 * torch.tensor([[0.3, 0.9], [-0.5, -0.5]])
    expected[0] /= math.sqrt(0.9)
    expected[1] /= math.sqrt(0.5)
    torch.testing.assert_close(w, expected)

    # Cached once per (text tower, classes, templates); a second call reads the file.
    w1 = build_head(tower, ["cat", "dog"], ["a {}.", "the {}."], task="pets")
    path = head_cache_path(tower, ["cat", "dog"], ["a {}.", "the {}."], "pets", head_cache)
    assert path.is_file()
    from qvec.core.checkpoint import read_safetensors, save_safetensors

    tensors, meta = read_safetensors(path)
    save_safetensors(path, {"weight": tensors["weight"] * 2}, meta)
    torch.testing.assert_close(build_head(tower, ["cat", "dog"], ["a {}.", "the {}."], task="pets"), 2 * w1)
    other = head_cache_path(tower, ["dog", "cat"], ["a {}.", "the {}."], "pets", head_cache)
    assert other != path
    path.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="unreadable"):
        torch.testing.assert_close(build_head(tower, ["cat", "dog"], ["a {}.", "the {}."], task="pets"), w1)


def test_open_clip_head_matches_open_clip(oc_file):
    """The head and logits equal OpenCLIP's own zero-shot computation on the same weights."""
    import open_clip

    classes, task = ["airplane", "bird", "truck"], "CIFAR10"
    model, adapter, spec = pretrained("open_clip", oc_file, None, classes, task)
    clip = open_clip.create_model(OC_NAME, pretrained=str(oc_file)).eval()
    tok = open_clip.get_tokenizer(OC_NAME)
    templates = TEMPLATES["CIFAR10"]
    with torch.no_grad():
        rows = []
        for c in classes:
            e = F.normalize(clip.encode_text(tok([t.format(c) for t in templates])), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=-1))
        expected = torch.stack(rows) * clip.logit_scale.exp()
        torch.testing.assert_close(model.head.weight, expected, rtol=1e-5, atol=1e-5)
        x = torch.randn(2, 3, IMG, IMG)
        torch.testing.assert_close(model(x), F.normalize(clip.encode_image(x), dim=-1) @ expected.T,
                                   rtol=1e-5, atol=1e-5)
    assert not any(adapter.is_head(n) for n, _ in model.named_parameters())  # a buffer: nothing can train it


def test_hf_clip_head_and_logits(hf_clip_dir):
    from transformers import CLIPModel

    classes = ["cat", "dog"]
    model, adapter, spec = pretrained("hf-clip", None, hf_clip_dir, classes, "hf:tanganke/stanford_cars")
    clip = CLIPModel.from_pretrained(hf_clip_dir).eval()
    w = model.head.weight
    torch.testing.assert_close(w.norm(dim=1), torch.full((2,), float(clip.logit_scale.detach().exp())))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=x)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        torch.testing.assert_close(model(x), F.normalize(feats, dim=-1) @ w.T, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- FT, QAT, vectors, patch, pack


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_qat_vector_patch_pack(family, oc_file, hf_clip_dir, tmp_path):
    donor_classes, recv_classes = ["0", "1", "2"], ["negative", "positive"]
    qspec = QuantSpec(bits=3)

    ft, adapter, dspec = pretrained(family, oc_file, hf_clip_dir, donor_classes, "MNIST")
    head0 = {k: v.clone() for k, v in ft.state_dict().items() if adapter.is_head(k)}
    theta0 = {k: v.clone() for k, v in ft.state_dict().items()}
    train_step(ft, adapter, dspec)
    qat, _, _ = pretrained(family, oc_file, hf_clip_dir, donor_classes, "MNIST")
    assert all(torch.equal(v, theta0[k]) for k, v in qat.state_dict().items())  # QAT starts from theta_0 too

    # The QAT forward sees exactly the PTQ'd weights (fused in_proj included), gradients reach latent weights.
    prepare_qat(qat, qspec, find_targets(qat, adapter.head_prefixes))
    x = torch.randn(2, 3, IMG, IMG)
    ptq_copy, _, _ = pretrained(family, oc_file, hf_clip_dir, donor_classes, "MNIST")
    quantize_(ptq_copy, qspec, find_targets(ptq_copy, adapter.head_prefixes))
    with torch.no_grad():
        torch.testing.assert_close(qat.eval()(x), ptq_copy.eval()(x), rtol=1e-5, atol=1e-5)
    convert_qat(qat)
    train_step(qat, adapter, dspec, qat=qspec)

    recv, _, rspec = pretrained(family, oc_file, hf_clip_dir, recv_classes, "RenderedSST2", seed=5)
    train_step(recv, adapter, rspec, seed=2)

    for model in (ft, qat, recv):
        state = model.state_dict()
        assert set(state) == set(theta0) and not any(".parametrizations." in k for k in state)
        changed = [k for k in adapter.backbone_keys(state) if not torch.equal(state[k], theta0[k])]
        assert changed, "the backbone trained"
    for k, v in head0.items():  # frozen zero-shot heads do not move; the supervised head does
        assert torch.equal(ft.state_dict()[k], v) == (not adapter.trainable_head(dspec))

    fp = {"qvec.backbone_fingerprint": "tiny"}
    ck = {name: checkpoint_from_model(m, s, **{"qvec.task": t, **fp})
          for name, m, s, t in (("ft", ft, dspec, "MNIST"), ("qat", qat, dspec, "MNIST"),
                                ("recv", recv, rspec, "RenderedSST2"))}
    for name, c in ck.items():
        c.save(tmp_path / f"{name}.safetensors")
    ck = {name: type(c).load(tmp_path / f"{name}.safetensors") for name, c in ck.items()}

    vec = QuantVector.from_checkpoints(ck["ft"], ck["qat"])
    assert set(vec.tensors) == set(adapter.backbone_keys(ck["ft"].state))
    assert not any(adapter.is_head(k) for k in vec.tensors)
    fused = [k for k in vec.tensors if k.endswith("in_proj_weight")]
    assert bool(fused) == (family == "open_clip")
    vec.save(tmp_path / "vec.safetensors")
    vec = QuantVector.load(tmp_path / "vec.safetensors")

    # D = R, lambda = 1 gives back theta_QAT; a patched receiver keeps its own head.
    same = vec.apply(ck["ft"], 1.0)
    for k in vec.tensors:
        torch.testing.assert_close(same.state[k], ck["qat"].state[k], rtol=0, atol=1e-6)
    patched = vec.apply(ck["recv"], 1.0)
    for k, v in ck["recv"].state.items():
        if adapter.is_head(k):
            assert torch.equal(patched.state[k], v)
    model, _, _ = load_model(patched)
    assert model(x).shape == (2, len(recv_classes))

    # PTQ (the authors' setting: in_proj_weight stays float) and a real 3-bit pack that reloads.
    ptq = quantize_checkpoint(patched, qspec, TargetFilter(in_proj=False))
    for k in target_keys(rspec, TargetFilter(in_proj=False)):
        assert distinct_per_row_at_most(ptq.state[k], 8)
    for k in fused:
        assert torch.equal(ptq.state[k], patched.state[k])
    out = tmp_path / "packed.safetensors"
    pack_checkpoint(patched, qspec, out, TargetFilter(in_proj=False), scale_dtype="float32")
    unpacked = load_packed(out)
    assert set(unpacked.state) == set(ptq.state)
    for k, v in ptq.state.items():
        torch.testing.assert_close(unpacked.state[k], v, rtol=0, atol=1e-6)
    packed_model, _, _ = load_model(unpacked)
    ptq_model, _, _ = load_model(ptq)
    with torch.no_grad():
        torch.testing.assert_close(packed_model(x), ptq_model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ files and offline


def test_open_clip_local_files(oc_file, tmp_path):
    spec = oc_spec()
    adapter = get_adapter(spec)
    full = build_model(spec, weights=str(oc_file))
    assert isinstance(full, ZeroShotClassifier) and full.text_tower is not None
    adapter.init_head(full, spec, ["a", "b", "c"], "EuroSAT")

    # The pretrained file may also be given as the 'pretrained' option (a path instead of a tag).
    via_option = ModelSpec("open_clip", OC_NAME, 3, {"model_cfg": OC_CFG, "pretrained": str(oc_file)})
    via_file = ModelSpec("open_clip", OC_NAME, 3, {"model_cfg": OC_CFG, "file": str(oc_file)})
    for other in (build_model(via_option, pretrained=True), build_model(via_file, pretrained=True)):
        assert all(torch.equal(v, full.state_dict()[k]) for k, v in other.state_dict().items() if k != "head.weight")

    # A qvec checkpoint holds only the image tower and the head: it loads, but cannot build new heads...
    ck = checkpoint_from_model(full, spec)
    ck.save(tmp_path / "ft.safetensors")
    image_only = build_model(spec, weights=str(tmp_path / "ft.safetensors"))
    assert image_only.text_tower is None
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(image_only(x), full(x))
    with pytest.raises(QvecError, match="without its text encoder"):
        adapter.init_head(image_only, spec, ["a", "b"], "EuroSAT")
    # ... unless the spec names where its text tower comes from.
    adapter.init_head(image_only, via_option, ["a", "b", "c"], "EuroSAT")
    torch.testing.assert_close(image_only.head.weight, full.head.weight)

    with pytest.raises(QvecError, match="not an OpenCLIP"):
        bad = tmp_path / "bad.safetensors"
        save_file({"token_embedding.weight": torch.zeros(2, 2)}, str(bad))
        build_model(spec, weights=str(bad))
    with pytest.raises(QvecError, match="not found"):
        build_model(spec, weights=str(tmp_path / "missing.pt"))


def test_hf_local_weight_files(hf_clip_dir, tmp_path):
    from transformers import ViTConfig, ViTModel

    # A single hub-format weights file with the config in the spec.
    cfg = json.loads((hf_clip_dir / "config.json").read_text())
    spec = ModelSpec("hf-clip", "my-clip", 2, {"config": cfg})
    from_file = build_model(spec, weights=str(hf_clip_dir / "model.safetensors"))
    from_dir = build_model(ModelSpec("hf-clip", str(hf_clip_dir), 2), pretrained=True)
    x = torch.randn(1, 3, IMG, IMG)
    torch.testing.assert_close(from_file.image_features(x), from_dir.image_features(x))
    assert from_file.text_tower is not None

    # A bare ViTModel file (the hub layout of the in21k backbones): converted by transformers, pooler dropped.
    vcfg = ViTConfig(**{k: v for k, v in vit_config().items() if k in ("hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")})
    torch.manual_seed(3)
    ViTModel(vcfg).save_pretrained(tmp_path / "vit")
    vspec = ModelSpec("hf-vit", "tiny-vit", 4, {"config": vcfg.to_dict()})
    vit = build_model(vspec, weights=str(tmp_path / "vit" / "model.safetensors"))
    ref = ViTModel.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.vit(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state)
    # and a qvec checkpoint of it loads back through the same path
    ck = checkpoint_from_model(vit, vspec)
    ck.save(tmp_path / "vit_ft.safetensors")
    again = build_model(vspec, weights=str(tmp_path / "vit_ft.safetensors"))
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        (ModelSpec("open_clip", "ViT-B-32", 10, {"pretrained": "openai"}),
         "hf download timm/vit_base_patch32_clip_224.openai open_clip_pytorch_model.bin"),
        (ModelSpec("open_clip", "ViT-B-16", 10, {"pretrained": "laion2b_s34b_b88k"}),
         "hf download laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
        (ModelSpec("hf-clip", "openai/clip-vit-base-patch16", 10), "hf download openai/clip-vit-base-patch16"),
        (ModelSpec("hf-vit", "google/vit-base-patch16-224-in21k", 10), "hf download google/vit-base-patch16-224-in21k"),
    ],
)
def test_offline_pretrained_is_one_line(offline, spec, hint):
    with pytest.raises(QvecError) as err:
        build_model(spec, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and hint in msg and "--weights" in msg


def test_open_clip_spec_errors():
    with pytest.raises(QvecError, match="needs a pretrained tag"):
        build_model(ModelSpec("open_clip", "ViT-B-32", 10), pretrained=True)
    with pytest.raises(QvecError, match="no pretrained tag 'nope'.*openai"):
        build_model(ModelSpec("open_clip", "ViT-B-32", 10, {"pretrained": "nope"}), pretrained=True)
    with pytest.raises(QvecError, match="unknown open_clip model"):
        build_model(ModelSpec("open_clip", "ViT-Q-99", 10))
    with pytest.raises(QvecError, match="differently"):
        build_model(ModelSpec("open_clip", "ViT-B-32", 10, {"model_cfg": OC_CFG}))


def test_checkpoint_rebuild_needs_no_weights(offline):
    """Checkpoints of the paper's models rebuild with no hub access (configs are known locally)."""
    for spec, n in ((ModelSpec("open_clip", "ViT-B-32", 10, {"pretrained": "openai"}), 48),
                    (ModelSpec("hf-clip", "openai/clip-vit-base-patch32", 10), 12 * 6 + 1)):
        with torch.device("meta"):
            model = build_model(spec)
        assert len(find_targets(model, get_adapter(spec).head_prefixes)) == n


def test_preprocessing_per_family(offline, hf_clip_dir):
    oc = get_adapter("open_clip")
    b32 = oc.data_config(ModelSpec("open_clip", "ViT-B-32", 10, {"pretrained": "openai"}))
    assert (b32.image_size, b32.interpolation) == (224, "bicubic")
    assert b32.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    l14 = oc.data_config(ModelSpec("open_clip", "ViT-L-14", 10, {"pretrained": "laion2b_s32b_b82k"}))
    assert l14.mean == (0.5, 0.5, 0.5) and l14.std == (0.5, 0.5, 0.5)
    assert oc.data_config(oc_spec()).image_size == IMG
    # The OpenAI tag means QuickGELU; a rebuilt checkpoint uses it too.
    from open_clip.transformer import QuickGELU

    with torch.device("meta"):
        m = build_model(ModelSpec("open_clip", "ViT-B-32", 10, {"pretrained": "openai"}))
    assert any(isinstance(mod, QuickGELU) for mod in m.modules())

    hf = get_adapter("hf-clip")
    local = hf.data_config(ModelSpec("hf-clip", str(hf_clip_dir), 2))  # its saved image processor
    assert (local.image_size, local.mean, local.std) == (IMG, (0.25, 0.5, 0.75), (0.2, 0.3, 0.4))
    hub = hf.data_config(ModelSpec("hf-clip", "openai/clip-vit-base-patch16", 2))  # processor defaults, offline
    assert (hub.image_size, hub.interpolation) == (224, "bicubic") and hub.mean == b32.mean
    vit = get_adapter("hf-vit").data_config(ModelSpec("hf-vit", "tiny-vit", 2, {"config": vit_config()}))
    assert (vit.image_size, vit.mean, vit.interpolation) == (IMG, (0.5, 0.5, 0.5), "bilinear")


# ------------------------------------------------------------------------------- templates and configs


def test_templates_cover_the_paper_tasks():
    from qvec.data.tasks import PAPER_TASKS

    assert set(PAPER_TASKS) == set(TEMPLATES)
    for name in PAPER_TASKS:
        assert get_templates(name) == TEMPLATES[name] and all(t.count("{}") == 1 for t in TEMPLATES[name])
    assert len(TEMPLATES["ImageNet"]) == 80 and len(TEMPLATES["CIFAR100"]) == 18
    assert canonical_task("hf:tanganke/stanford_cars") == "Cars" and canonical_task("fashion_mnist") == "FashionMNIST"
    assert canonical_task("emnist_letters") == "EMNIST" and canonical_task("SUN397Val") == "SUN397"
    assert get_templates("my_own_task") == GENERIC_TEMPLATES


PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.toml"))


def test_paper_configs():
    import open_clip

    from qvec.data.tasks import PAPER_TASKS

    assert len(PAPER_CONFIGS) == 10
    for path in PAPER_CONFIGS:
        raw = tomllib.loads(path.read_text())
        assert raw["tasks"] == list(PAPER_TASKS), path.name
        assert raw["bits"] == [3] and raw["granularity"] == "channel" and raw["seeds"] == [2038]
        assert raw["lambdas"] == [0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50]
        rec = raw["recipe"]
        assert (rec["lr"], rec["weight_decay"], rec["warmup_steps"], rec["batch_size"]) == (1e-5, 0.1, 500, 128)
        assert (rec["grad_clip"], rec["label_smoothing"], rec["seed"]) == (1.0, 0.0, 2038)
        assert {t: r["epochs"] for t, r in rec["tasks"].items()} == {t: p.epochs for t, p in PAPER_TASKS.items()}
        spec = ModelSpec.parse(raw["model"], **raw.get("model_options", {}))
        if spec.family == "open_clip":
            assert spec.options["pretrained"] in open_clip.list_pretrained_tags_by_model(spec.name)
        with torch.device("meta"):
            assert find_targets(build_model(spec), get_adapter(spec).head_prefixes)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_load_in_the_grid(path, offline, tmp_path, monkeypatch):
    """They load with or without a local data folder: paper task names fall back to Hugging Face."""
    grid = pytest.importorskip("qvec.grid.config")
    monkeypatch.setenv("QVEC_DATA", str(tmp_path))
    cfg = grid.load_config(path)
    assert cfg.model_spec().family in ("open_clip", "hf-clip", "timm") and len(cfg.all_tasks) == 22
