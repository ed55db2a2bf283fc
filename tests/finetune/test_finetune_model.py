"""split_backbone and FineTunedNet on timm's tiny EfficientNet and real photo crops."""

from __future__ import annotations

import pytest
import torch

from featurebank.errors import FineTuneError, UnknownLayerError
from featurebank.finetune.model import FineTunedNet, list_cut_points, split_backbone


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("unfreeze", ["blocks.3", "blocks.4.0", "conv_head", "conv_stem"])
def test_bottom_then_top_is_the_full_models_pooled_features(tiny_backbone, texture_crops, unfreeze):
    x = torch.from_numpy(texture_crops[0][:6])
    with torch.no_grad():
        want = _pooled(tiny_backbone, x)
        bottom, top = split_backbone(tiny_backbone, unfreeze)
        got = top.eval()(bottom(x))
    assert got.shape == want.shape == (6, 256)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in bottom.parameters())
    assert all(p.requires_grad for p in top.parameters())
    assert not bottom.training


def test_the_cut_decides_what_is_frozen_and_the_activation_shape(tiny_backbone, texture_crops):
    x = torch.from_numpy(texture_crops[0][:2])
    bottom, top = split_backbone(tiny_backbone, "blocks.4")
    with torch.no_grad():
        a = bottom(x)
    assert a.shape == (2, 48, 4, 4)  # output of blocks.3 on a 64x64 crop (stride 16)
    top_params = {id(p) for p in top.parameters()}
    assert top_params == {id(p) for n, p in tiny_backbone.named_parameters()
                          if n.startswith(("blocks.4.", "conv_head.", "bn2."))}
    assert {id(p) for p in bottom.parameters()}.isdisjoint(top_params)


def test_fine_tuned_net_returns_features_and_logits(tiny_backbone, texture_crops):
    x = torch.from_numpy(texture_crops[0][:3])
    bottom, top = split_backbone(tiny_backbone, "blocks.4")
    head = torch.nn.Linear(256, 3)
    net = FineTunedNet(bottom, top, head).eval()
    with torch.no_grad():
        features, logits = net(x)
        torch.testing.assert_close(features, _pooled(tiny_backbone, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, head(features))
    assert logits.shape == (3, 3)


def test_cut_points_are_listed_bottom_up(tiny_backbone):
    cuts = list_cut_points(tiny_backbone)
    assert cuts == ["conv_stem", "blocks.0", "blocks.0.0", "blocks.1", "blocks.1.0", "blocks.2", "blocks.2.0",
                    "blocks.3", "blocks.3.0", "blocks.4", "blocks.4.0", "conv_head"]


def test_an_unknown_cut_point_lists_the_valid_ones(tiny_backbone):
    with pytest.raises(UnknownLayerError, match=r"cannot unfreeze from 'blocks\.9': it is not a cut point of this "
                       r"network\. Closest: .*Valid: conv_stem, blocks\.0, blocks\.0\.0, .*, conv_head$"):
        split_backbone(tiny_backbone, "blocks.9")
    with pytest.raises(UnknownLayerError, match=r"'bn2'.*Valid: conv_stem"):
        split_backbone(tiny_backbone, "bn2")


def test_a_network_that_is_not_efficientnet_style_is_refused():
    import timm

    with pytest.raises(FineTuneError, match=r"cannot split a ResNet for fine-tuning: only EfficientNet-style timm "
                       r"models"):
        split_backbone(timm.create_model("test_resnet"), "layer4")


def test_efficientnet_lite0_splits_at_its_stages(texture_crops):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0").eval()  # the default backbone's network, random weights
    cuts = list_cut_points(model)
    assert [c for c in cuts if c.count(".") == 1] == [f"blocks.{i}" for i in range(7)]
    assert cuts[-1] == "conv_head" and "blocks.5.3" in cuts
    x = torch.from_numpy(texture_crops[0][:2])
    with torch.no_grad():
        want = _pooled(model, x)
        for unfreeze, shape in (("blocks.5", (2, 112, 4, 4)), ("blocks.6", (2, 192, 2, 2))):
            bottom, top = split_backbone(model, unfreeze)
            a = bottom(x)
            assert a.shape == shape
            torch.testing.assert_close(top.eval()(a), want, atol=1e-5, rtol=0)
    assert want.shape == (2, 1280)


def test_the_default_unfreeze_point_moves_down_with_the_number_of_training_images(tiny_backbone):
    from featurebank.finetune.job import UNFREEZE_MORE_AT, default_unfreeze

    stages = [c for c in list_cut_points(tiny_backbone) if c.startswith("blocks.") and c.count(".") == 1]
    assert stages[-3:] == ["blocks.2", "blocks.3", "blocks.4"]  # timm's test_efficientnet has five stages
    assert UNFREEZE_MORE_AT == (2_000, 5_000)
    got = {n: default_unfreeze(tiny_backbone, n) for n in (None, 100, 1_999, 2_000, 4_999, 5_000, 60_000)}
    assert got == {None: "blocks.4", 100: "blocks.4", 1_999: "blocks.4", 2_000: "blocks.3", 4_999: "blocks.3",
                   5_000: "blocks.2", 60_000: "blocks.2"}
