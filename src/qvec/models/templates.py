"""CLIP prompt templates for the paper's 22 tasks (SPEC section 5), and a generic fallback.

Zero-shot heads (SPEC section 4) average the text embeddings of every template filled with a class name, so the
templates are part of a CLIP model's head and must be the standard ones to compare with published numbers. These
are the prompts of the CLIP paper's evaluation suite as used by the task-arithmetic literature (task_vectors,
wise-ft) and, for the tasks those do not cover, by FusionBench's 20-task CLIP benchmark (which uses the same Hugging
Face datasets as SPEC section 5). Templates are ``str.format`` strings with one ``{}`` for the class name.
"""

from __future__ import annotations

import re

GENERIC_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_PHOTO_OF_A_THE = ("a photo of a {}.", "a photo of the {}.")

_CIFAR = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

# The 80 ImageNet prompts of the CLIP paper (Prompt_Engineering_for_ImageNet), in their original order.
_IMAGENET = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

_RESISC45 = tuple(
    f"{kind} {of} {{}}."
    for of in ("of", "of a", "of the")
    for kind in (
        "satellite imagery",
        "aerial imagery",
        "satellite photo",
        "aerial photo",
        "satellite view",
        "aerial view",
    )
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "Cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "DTD": tuple(
        f"a photo of {art} {{}} {what}."
        for art in ("a", "the")
        for what in ("texture", "pattern", "thing", "object")
    ),
    "EuroSAT": (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "GTSRB": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "MNIST": ('a photo of the number: "{}".',),
    "RESISC45": _RESISC45,
    "SUN397": _PHOTO_OF_A_THE,
    "SVHN": ('a photo of the number: "{}".',),
    "CIFAR10": _CIFAR,
    "CIFAR100": _CIFAR,
    "STL10": _PHOTO_OF_A_THE,
    "Food101": ("a photo of {}, a type of food.",),
    "Flowers102": ("a photo of a {}, a type of flower.",),
    "FER2013": (
        "a photo of a {} looking face.",
        "a photo of a face showing the emotion: {}.",
        "a photo of a face looking {}.",
        "a face that looks {}.",
        "they look {}.",
        "look at how {} they are.",
    ),
    "PCAM": ("this is a photo of {}",),
    "OxfordIIITPet": ("a photo of a {}, a type of pet.",),
    "RenderedSST2": ("a {} review of a movie.",),
    "EMNIST": ('a photo of the digit character: "{}".',),
    "FashionMNIST": _PHOTO_OF_A_THE,
    "KMNIST": ("a photo of the character {}.",),
    "TinyImageNet": _IMAGENET,
    "ImageNet": _IMAGENET,
}

# Other spellings of the task names (dataset ids, local file names), compared after normalisation.
_ALIASES: dict[str, str] = {
    "stanfordcars": "Cars",
    "dtd10": "DTD",
    "describabletextures": "DTD",
    "resisc": "RESISC45",
    "sun": "SUN397",
    "stl": "STL10",
    "food": "Food101",
    "flowers": "Flowers102",
    "oxfordflowers102": "Flowers102",
    "oxfordflowers": "Flowers102",
    "fer": "FER2013",
    "wdsfer2013": "FER2013",
    "patchcamelyon": "PCAM",
    "oxfordpets": "OxfordIIITPet",
    "oxfordiiitpets": "OxfordIIITPet",
    "pets": "OxfordIIITPet",
    "sst2": "RenderedSST2",
    "emnistletters": "EMNIST",
    "fmnist": "FashionMNIST",
    "tinyimagenet200": "TinyImageNet",
    "imagenet1k": "ImageNet",
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NORM: dict[str, str] = {_norm(k): k for k in TEMPLATES} | _ALIASES


def canonical_task(task: str) -> str | None:
    """The paper task a name stands for (``hf:tanganke/stanford_cars`` -> ``Cars``), or None."""
    name = task.removeprefix("hf:").rstrip("/")
    candidates = [name, name.rsplit("/", 1)[-1]]
    if name.endswith("Val"):  # task_vectors' convention for validation variants
        candidates.append(name[: -len("Val")])
    for cand in candidates:
        hit = _BY_NORM.get(_norm(cand))
        if hit:
            return hit
    return None


def get_templates(task: str | None) -> tuple[str, ...]:
    """The prompt templates for ``task``; the generic ``a photo of a {}.`` for tasks outside the paper's 22."""
    canon = canonical_task(task) if task else None
    return TEMPLATES[canon] if canon else GENERIC_TEMPLATES


def fill(template: str, classname: str) -> str:
    """One prompt: the template with the class name in place of ``{}``."""
    return template.format(classname)
