"""Splitting a backbone where fine-tuning starts, and the network that fine-tuning trains.

``split_backbone(model, "blocks.5")`` cuts an EfficientNet-style timm model (``conv_stem``,
``bn1``, ``blocks.<stage>.<block>``, ``conv_head``, ``bn2``, ``global_pool``) into

* the **bottom**: everything before ``blocks.5``, frozen; its output, the activation map
  (N, C, H, W), is what the store caches once per image;
* the **top**: ``blocks.5`` and everything after it up to and including the global pooling;
  its output is the pooled feature vector (N, D), the same vector ``model.forward_head(...,
  pre_logits=True)`` gives.

Both share their modules (and so their parameters) with ``model``. :class:`FineTunedNet`
puts bottom, top and a linear head back together: ``forward(x) -> (features, logits)``.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from featurebank.errors import FineTuneError, UnknownLayerError

__all__ = ["FineTunedNet", "list_cut_points", "split_backbone"]

_EFFICIENTNET_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")


def _sequence(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's forward pass as an ordered list of (name, module), down to single blocks."""
    if not all(hasattr(model, part) for part in _EFFICIENTNET_PARTS) or not isinstance(model.blocks, nn.Sequential):
        raise FineTuneError(
            f"cannot split a {type(model).__name__} for fine-tuning: only EfficientNet-style timm models "
            f"(with {', '.join(_EFFICIENTNET_PARTS)}) are supported; use an efficientnet_lite* backbone"
        )
    seq: list[tuple[str, nn.Module]] = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            seq.append((f"blocks.{i}.{j}", block))
    seq += [("conv_head", model.conv_head), ("bn2", model.bn2), ("global_pool", model.global_pool)]
    return seq


def _cut_index(seq: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """Cut point name -> index in ``seq`` of the first module the top holds."""
    index = {name: k for k, (name, _) in enumerate(seq)}
    cuts: dict[str, int] = {"conv_stem": 0}
    for name, k in index.items():
        if name.startswith("blocks."):
            stage = name.rsplit(".", 1)[0]
            cuts.setdefault(stage, k)  # "blocks.5" is its first block
            cuts[name] = k
    cuts["conv_head"] = index["conv_head"]
    return dict(sorted(cuts.items(), key=lambda kv: (kv[1], kv[0].count("."))))


def list_cut_points(model: nn.Module) -> list[str]:
    """The names ``split_backbone`` accepts for ``model``, from the bottom of the network up:
    ``conv_stem`` (train everything), each stage ``blocks.<i>`` and block ``blocks.<i>.<j>``,
    and ``conv_head`` (train only the last convolution)."""
    return list(_cut_index(_sequence(model)))


class _Chain(nn.Sequential):
    """The modules of one side of the cut, run in order (timm's global_pool flattens)."""


def split_backbone(model: nn.Module, unfreeze: str) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` where fine-tuning starts.

    Parameters
    ----------
    model : an EfficientNet-style timm model (efficientnet_lite0, test_efficientnet ...)
    unfreeze : the first layer that trains (``"blocks.5"``, ``"blocks.5.1"``, ``"conv_head"``,
        ``"conv_stem"``); see :func:`list_cut_points`.

    Returns
    -------
    (bottom, top) : bottom maps images (N, 3, H, W) to the activation map (N, C, h, w) and has
        its parameters frozen (``requires_grad=False``) and is in eval mode; top maps that
        activation map to the pooled features (N, D), float32. Both share modules with ``model``.

    Raises UnknownLayerError (listing the valid names) when ``unfreeze`` is not a cut point,
    FineTuneError when ``model`` is not an EfficientNet-style network.
    """
    seq = _sequence(model)
    cuts = _cut_index(seq)
    if unfreeze not in cuts:
        close = difflib.get_close_matches(str(unfreeze), list(cuts), n=3, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise UnknownLayerError(
            f"cannot unfreeze from {unfreeze!r}: it is not a cut point of this network.{hint} "
            f"Valid: {', '.join(cuts)}"
        )
    k = cuts[unfreeze]
    bottom = _Chain(*(m for _, m in seq[:k])).eval()
    for p in bottom.parameters():
        p.requires_grad_(False)
    top = _Chain(*(m for _, m in seq[k:]))
    return bottom, top


class FineTunedNet(nn.Module):
    """Frozen bottom, trainable top and a linear head: ``forward(x) -> (features, logits)``.

    features : (N, D) float32, the pooled output of ``top``; logits : (N, n_classes).
    """

    def __init__(self, bottom: nn.Module, top: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.bottom = bottom
        self.top = top
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.top(self.bottom(x))
        return features, self.head(features)
