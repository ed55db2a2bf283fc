"""The issue's "Must show": training on cached activations and training through the full network
(frozen bottom under no_grad) give the same first-step gradients on the top and head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurebank.finetune.model import FineTunedNet, split_backbone
from featurebank.finetune.train import set_train_modes, batch_loss


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train_bn", [False, True])
@pytest.mark.parametrize("unfreeze", ["blocks.3", "conv_head"])
def test_cached_and_full_forward_paths_agree_on_the_first_steps_gradients(tiny_backbone, texture_crops, unfreeze,
                                                                         train_bn):
    X, y = texture_crops
    x, t = torch.from_numpy(X[:12]), torch.from_numpy(y[:12])
    bottom, top = split_backbone(tiny_backbone, unfreeze)
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 3)
    state = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}

    # the cached path: the bottom's output stored as a float32 array, read back as train_top does
    with torch.no_grad():
        cache = bottom(x).numpy().astype(np.float32)
    set_train_modes(top, head, train_bn)
    loss, _ = batch_loss(top, head, torch.from_numpy(cache).float(), t)
    loss.backward()
    cached = {**_grads(top), **{f"head.{k}": v for k, v in _grads(head).items()}}

    # the full-forward path: images through the whole network, the frozen bottom under no_grad
    tiny_backbone.load_state_dict(state)  # train-mode batch norm moved the running statistics
    top.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    net = FineTunedNet(bottom, top, head)
    set_train_modes(top, head, train_bn)
    with torch.no_grad():
        activations = net.bottom(x)
    logits = net.head(net.top(activations))
    full_loss = torch.nn.functional.cross_entropy(logits, t)
    full_loss.backward()
    full = {**_grads(top), **{f"head.{k}": v for k, v in _grads(head).items()}}

    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=0)
    assert cached.keys() == full.keys() and len(cached) == len(list(top.parameters())) + 2
    assert all(g.abs().sum() > 0 for g in cached.values() if g.numel() > 1)
    for name in cached:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-7, msg=name)
    assert not any(p.grad is not None for p in bottom.parameters())  # nothing below the cut trains


def test_fine_tuned_net_forward_is_the_full_forward_path(tiny_backbone, texture_crops):
    X, y = texture_crops
    bottom, top = split_backbone(tiny_backbone, "blocks.4")
    head = torch.nn.Linear(256, 3)
    net = FineTunedNet(bottom, top, head)
    set_train_modes(top, head, False)
    _, logits = net(torch.from_numpy(X[:8]))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[:8])).backward()
    assert all(p.grad is not None for p in top.parameters())
    assert all(p.grad is None for p in bottom.parameters())
