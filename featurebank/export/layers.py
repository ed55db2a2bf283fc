"""Where a backbone can be cut, and cutting it so the graph keeps only what a layer needs.

Layer names are module paths (``blocks.3``, ``layer2``, ``blocks.5.1``), plus two aliases:

* ``features``: the output of ``forward_features`` (the last feature map before pooling and
  classifier: ``bn2`` in EfficientNet, ``layer4`` in ResNet, ``norm`` in a ViT);
* ``logits``: the full network's output (the classifier), ``(N, num_classes)``.

Cutting uses FX (timm's ``create_feature_extractor``, or torchvision's): every node the chosen
outputs do not depend on is dropped, so an early cut yields a smaller ONNX graph.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch

from featurebank.errors import UnknownLayerError
from featurebank.export.registry import BackboneSpec, get_backbone

__all__ = ["LayerInfo", "list_layers", "resolve_layers", "truncate"]

_SKIP_TYPES = (
    torch.nn.Identity,
    torch.nn.Dropout,
    torch.nn.Flatten,
    torch.nn.AdaptiveAvgPool2d,
    torch.nn.AdaptiveMaxPool2d,
    torch.nn.Linear,
)


@dataclass(frozen=True)
class LayerInfo:
    """A place to cut: ``shape`` is per sample ((C, H, W), (tokens, C) or (classes,)),
    ``stride`` the input pixels per output cell (None for token/vector outputs)."""

    name: str
    shape: tuple[int, ...]
    stride: int | None
    alias_of: str | None = None

    @property
    def layout(self) -> str:
        return {3: "NCHW", 2: "NLC", 1: "NC"}[len(self.shape)]


def _candidate_modules(model: torch.nn.Module) -> list[str]:
    names = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        depth = name.count(".") + 1 if name else 0
        if depth == 0 or depth > 3 or isinstance(module, _SKIP_TYPES):
            continue
        parent = modules[name.rpartition(".")[0]] if depth > 1 else None
        if parent is not None and not isinstance(parent, (torch.nn.Sequential, torch.nn.ModuleList)):
            continue  # inside a block (attention, act of a norm ...): not a place to cut
        if "pool" in type(module).__name__.lower():
            continue
        names.append(name)
    return names


def _classifier_name(model: torch.nn.Module, spec: BackboneSpec) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name and name in dict(model.named_modules()):
        return name
    return list(dict(model.named_children()))[-1]


def _trace_shapes(model: torch.nn.Module, spec: BackboneSpec) -> tuple[list[tuple[str, tuple[int, ...]]], str, tuple[int, ...], int]:
    """Run one forward pass with hooks; returns ([(module, shape)] in execution order,
    features module name, logits shape, input height)."""
    modules = dict(model.named_modules())
    order: list[tuple[str, tuple[int, ...]]] = []
    seen: dict[int, str] = {}
    hooks = []

    def hook(name):
        def fn(_m, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() in (3, 4):
                order.append((name, tuple(out.shape[1:])))
                seen[id(out)] = name

        return fn

    for name in _candidate_modules(model):
        hooks.append(modules[name].register_forward_hook(hook(name)))
    h = spec.input_size[1]
    x = torch.zeros(1, *spec.input_size)
    try:
        with torch.no_grad():
            if hasattr(model, "forward_features"):
                feats = model.forward_features(x)
                features = seen.get(id(feats))
                logits = model.forward_head(feats) if hasattr(model, "forward_head") else model(x)
            else:
                logits = model(x)
                features = None
    finally:
        for hk in hooks:
            hk.remove()
    if features is None:
        # torchvision: the last rank-3/4 output before pooling/classifier
        features = order[-1][0] if order else None
    # keep first occurrence of each module (some modules run twice)
    uniq, names = [], set()
    for name, shape in order:
        if name not in names:
            names.add(name)
            uniq.append((name, shape))
    return uniq, features, tuple(logits.shape[1:]), h


def _build_for_shapes(spec: BackboneSpec) -> torch.nn.Module:
    from featurebank.export.weights import _create

    torch.manual_seed(0)
    return _create(spec).eval()


def list_layers(backbone: str | BackboneSpec, model: torch.nn.Module | None = None) -> list[LayerInfo]:
    """The layers ``backbone`` can be cut at, in execution order, then ``features`` and
    ``logits``.

    >>> [l.name for l in list_layers("test_resnet")][-2:]
    ['features', 'logits']
    """
    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    model = model if model is not None else _build_for_shapes(spec)
    order, features, logits_shape, h = _trace_shapes(model, spec)

    def stride(shape: tuple[int, ...]) -> int | None:
        if len(shape) == 3 and shape[1] > 0:
            return max(1, round(h / shape[1]))
        return None

    infos = [LayerInfo(name, shape, stride(shape)) for name, shape in order]
    if features is not None:
        fshape = dict(order)[features]
        infos.append(LayerInfo("features", fshape, stride(fshape), alias_of=features))
    infos.append(LayerInfo("logits", logits_shape, None, alias_of=_classifier_name(model, spec)))
    return infos


def resolve_layers(layers: Sequence[str], infos: Sequence[LayerInfo]) -> list[LayerInfo]:
    """Look up each requested layer; an unknown one raises UnknownLayerError listing valid names."""
    by_name = {i.name: i for i in infos}
    if not layers:
        raise UnknownLayerError("no layer given; pass at least one --layer")
    out = []
    for name in layers:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=5, cutoff=0.4)
            hint = f" Closest: {', '.join(close)}." if close else ""
            listing = ", ".join(by_name)
            raise UnknownLayerError(f"unknown layer {name!r}.{hint} Valid layers: {listing}")
        if by_name[name] in out:
            raise UnknownLayerError(f"layer {name!r} is given twice")
        out.append(by_name[name])
    return out


class _Outputs(torch.nn.Module):
    """Return the extractor's dict as a tuple in the requested order."""

    def __init__(self, extractor: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.extractor = extractor
        self.keys = keys

    def forward(self, x):
        d = self.extractor(x)
        return tuple(d[k] for k in self.keys)


def truncate(model: torch.nn.Module, spec: BackboneSpec, layers: Sequence[LayerInfo]) -> torch.nn.Module:
    """A module computing only ``layers`` (a tuple of tensors, in order) from ``model``."""
    nodes = {}
    for i, info in enumerate(layers):
        nodes[info.alias_of or info.name] = f"out{i}"
    if spec.family == "timm":
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    try:
        extractor = create_feature_extractor(model, return_nodes=nodes)
    except Exception as exc:  # FX cannot trace every model; the aliases still work without it
        if len(layers) == 1 and layers[0].name in ("features", "logits"):
            return _Whole(model, layers[0].name)
        raise UnknownLayerError(
            f"cannot cut {spec.name} at {', '.join(l.name for l in layers)}: FX tracing failed "
            f"({type(exc).__name__}: {str(exc)[:200]}); use --layer features or logits"
        ) from None
    return _Outputs(extractor, [f"out{i}" for i in range(len(layers))]).eval()


class _Whole(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, which: str):
        super().__init__()
        self.model = model
        self.which = which

    def forward(self, x):
        if self.which == "features":
            return (self.model.forward_features(x),)
        return (self.model(x),)
