"""`featurebank cut`: foreign ONNX models exported for real into tmp, listed, cut, verified
against the source graph and written atomically.

Most tests use timm's tiny random ``test_resnet`` (2 MB) and ``test_vit``; torchvision's
``resnet18`` (47 MB, a real model-zoo layout) is used where its size is the point.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from featurebank.artifact import Preprocessing, read_model_card
from featurebank.errors import ExportParityError, NotOnnxModelError, UnknownTensorError
from featurebank.export.onnx_cut import cut_onnx, graph_input_size, list_onnx_tensors, onnx_weights_sha256
from featurebank.export.parity import compare_outputs, pool_reference

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

SIZE = 64
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PRE = Preprocessing(input_size=(3, SIZE, SIZE), interpolation="bilinear", crop_pct=0.875, **IMAGENET)
VIT_PRE = Preprocessing(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3)
EARLY = "/layer1/layer1.0/act2/Relu_output_0"  # test_resnet: (N, 32, 16, 16)
LATE = "/layer4/layer4.0/act2/Relu_output_0"  # test_resnet: (N, 96, 2, 2)
R18_EARLY = "/layer1/layer1.0/relu/Relu_output_0"
R18_LATE = "/layer4/layer4.1/relu_1/Relu_output_0"


def _export(model, path: Path, size: int, dynamic: bool = True) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(1 if not dynamic else 2, 3, size, size),), str(path),
            input_names=["input.1"], output_names=["logits"],
            dynamic_axes={"input.1": {0: "N"}, "logits": {0: "N"}} if dynamic else None,
            opset_version=18, dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory) -> Path:
    """torchvision resnet18 (random weights) as a model-zoo file: input `input.1`, 1000 logits."""
    torch.manual_seed(0)
    return _export(torchvision.models.resnet18(weights=None), tmp_path_factory.mktemp("zoo") / "resnet18.onnx", SIZE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """timm test_resnet (random weights): input `input.1`, 1000 logits."""
    torch.manual_seed(0)
    return _export(timm.create_model("test_resnet"), tmp_path_factory.mktemp("zoo") / "test_resnet.onnx", SIZE)


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _export(timm.create_model("test_vit", img_size=32), tmp_path_factory.mktemp("zoo") / "test_vit.onnx", 32)


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _run(path: Path, feed: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": feed})


def _source_map(path: Path, tensor: str, x: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], {"input.1": x})[0]


def _images(n: int = 2, size: int = SIZE, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _normalise(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    x = (pixels / 255.0 - np.array(pre.mean)) / np.array(pre.std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32)


# -- listing ---------------------------------------------------------------------------


def test_list_onnx_tensors_puts_maps_first_in_graph_order(resnet18):
    tensors = list_onnx_tensors(resnet18)
    ranks = [t.rank for t in tensors]
    first_other = next(i for i, r in enumerate(ranks) if r not in (3, 4))
    assert all(r in (3, 4) for r in ranks[:first_other]) and all(r not in (3, 4) for r in ranks[first_other:])
    names = [t.name for t in tensors]
    assert names.index(R18_EARLY) < names.index(R18_LATE)
    by_name = {t.name: t for t in tensors}
    assert by_name[R18_EARLY].shape == ("batch", 64, 16, 16) and by_name[R18_EARLY].stride == 4
    assert by_name[R18_LATE].shape == ("batch", 512, 2, 2) and by_name[R18_LATE].stride == 32
    assert by_name[R18_LATE].op_type == "Relu" and by_name[R18_LATE].dtype == "float32"
    assert by_name["logits"].shape == ("batch", 1000) and by_name["logits"].stride is None
    assert "input.1" not in by_name  # the input is not a cut point


def test_list_onnx_tensors_of_a_vit_skips_shape_arithmetic(vit):
    tensors = list_onnx_tensors(vit)
    assert all(t.rank >= 2 for t in tensors)
    norm = [t for t in tensors if t.op_type == "LayerNormalization"][-1]
    assert norm.rank == 3 and norm.shape[1:] == (5, 64)
    assert not any(t.op_type in ("Sqrt", "Shape") for t in tensors)


def test_graph_input_size(tiny, tmp_path):
    assert graph_input_size(tiny) == (SIZE, SIZE)
    model = onnx.load(str(tiny))
    for axis in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = "hw"
    onnx.save(model, str(tmp_path / "dyn.onnx"))
    with pytest.raises(ValueError, match=r"dynamic height/width .*\(--input-size H W"):
        graph_input_size(tmp_path / "dyn.onnx")


# -- cutting ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pool", ["avg", "max", "gem", "none"])
def test_cut_resnet_late_matches_source(tiny, out_dir, pool, normalize):
    out = out_dir / "cut.onnx"
    card = cut_onnx(tiny, LATE, out, pool=pool, normalize=normalize, preprocessing=PRE)
    assert card.output().shape == ((96,) if pool != "none" else (96, 2, 2))
    figures = card.verification["outputs"]["embedding"]
    assert figures["min_cosine"] >= 0.9999 and figures["max_abs_diff"] <= figures["atol"]
    # independently of the built-in check: run the written file against the source map
    x = _normalise(_images(3), PRE)
    (got,) = _run(out, x)
    expected = pool_reference(_source_map(tiny, LATE, x), pool, normalize=normalize)
    compare_outputs(expected, got, "fp32")
    assert read_model_card(out) == card


def test_cut_card_fields(tiny, out_dir, tmp_path):
    card = cut_onnx(tiny, EARLY, out_dir / "early.onnx", pool="gem", preprocessing=PRE, weights_license="MIT")
    assert card.backbone == "test_resnet" and card.weights_source == "onnx:test_resnet.onnx"
    assert card.layer == EARLY and card.output().pooling == "gem" and card.dim == 32
    assert card.weights_license == "MIT" and card.preprocessing == PRE and card.input_name == "pixels"
    assert card.verification["inputs"] == 2 and card.verification["provider"] == "CPUExecutionProvider"
    # the weights hash is the source's, independent of where the file lies
    moved = tmp_path / "elsewhere" / "renamed.onnx"
    moved.parent.mkdir()
    shutil.copy(tiny, moved)
    assert card.weights_sha256 == onnx_weights_sha256(onnx.load(str(moved))) == onnx_weights_sha256(onnx.load(str(tiny)))
    other = cut_onnx(moved, EARLY, out_dir / "b.onnx", pool="gem", preprocessing=PRE, backbone="test_resnet")
    assert other.weights_sha256 == card.weights_sha256
    assert other.output().fingerprint != card.output().fingerprint  # weights_source names the file


def test_weights_hash_sees_a_changed_weight(tiny):
    model = onnx.load(str(tiny))
    before = onnx_weights_sha256(model)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.flat[0] += 1e-3
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    assert onnx_weights_sha256(model) != before


def test_early_cut_is_smaller_than_late_cut(resnet18, out_dir):
    cut_onnx(resnet18, R18_EARLY, out_dir / "early.onnx", preprocessing=PRE)
    cut_onnx(resnet18, R18_LATE, out_dir / "late.onnx", preprocessing=PRE)
    early, late = onnx.load(str(out_dir / "early.onnx")), onnx.load(str(out_dir / "late.onnx"))
    assert len(early.graph.node) < len(late.graph.node)
    assert os.path.getsize(out_dir / "early.onnx") < 0.05 * os.path.getsize(out_dir / "late.onnx")
    assert os.path.getsize(out_dir / "late.onnx") < os.path.getsize(resnet18)  # the 512x1000 fc is gone


@pytest.mark.parametrize("pool", ["token", "avg", "gem", "max", "none"])
def test_cut_vit_tokens(vit, out_dir, pool):
    tensor = [t for t in list_onnx_tensors(vit) if t.op_type == "LayerNormalization"][-1].name
    out = out_dir / "vit.onnx"
    card = cut_onnx(vit, tensor, out, pool=pool, normalize=True, preprocessing=VIT_PRE)
    assert card.output().shape == ((64,) if pool != "none" else (5, 64))
    x = _normalise(_images(2, 32), VIT_PRE)
    (got,) = _run(out, x)
    compare_outputs(pool_reference(_source_map(vit, tensor, x), pool, layout="NLC", normalize=True), got, "fp32")


def test_token_pool_on_a_conv_map_is_refused(tiny, out_dir):
    with pytest.raises(ValueError, match=r"pool='token' needs an \(N, tokens, C\) tensor"):
        cut_onnx(tiny, LATE, out_dir / "x.onnx", pool="token", preprocessing=PRE)
    assert list(out_dir.iterdir()) == []


def test_uint8_cut_equals_float_cut_after_manual_normalisation(tiny, out_dir):
    cut_onnx(tiny, LATE, out_dir / "f.onnx", pool="avg", normalize=True, preprocessing=PRE)
    card = cut_onnx(tiny, LATE, out_dir / "u.onnx", pool="avg", normalize=True, preprocessing=PRE,
                    input_format="uint8")
    assert card.input_format == "uint8"
    pixels = _images(2)
    (from_uint8,) = _run(out_dir / "u.onnx", pixels)
    (from_float,) = _run(out_dir / "f.onnx", _normalise(pixels, PRE))
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-4, atol=1e-6)


def test_multi_output_cut(tiny, out_dir):
    out = out_dir / "two.onnx"
    card = cut_onnx(tiny, [EARLY, LATE], out, pool=["max", "gem"], preprocessing=PRE)
    assert [o.name for o in card.outputs] == [f"embedding:{EARLY}", f"embedding:{LATE}"]
    assert [o.layer for o in card.outputs] == [EARLY, LATE] and [o.dim for o in card.outputs] == [32, 96]
    x = _normalise(_images(2), PRE)
    early, late = _run(out, x)
    compare_outputs(pool_reference(_source_map(tiny, EARLY, x), "max"), early, "fp32")
    compare_outputs(pool_reference(_source_map(tiny, LATE, x), "gem"), late, "fp32")
    named = cut_onnx(tiny, [EARLY, LATE], out_dir / "named.onnx", names=["e", "l"], preprocessing=PRE)
    assert [o.name for o in named.outputs] == ["e", "l"]


def test_fp16_cut_within_fp16_tolerance_and_half_the_size(resnet18, out_dir):
    cut_onnx(resnet18, R18_LATE, out_dir / "fp32.onnx", pool="gem", normalize=True, preprocessing=PRE)
    card = cut_onnx(resnet18, R18_LATE, out_dir / "fp16.onnx", pool="gem", normalize=True, preprocessing=PRE,
                    precision="fp16", input_format="uint8")
    figures = card.verification["outputs"]["embedding"]
    assert card.precision == "fp16" and figures["min_cosine"] >= 0.999
    assert figures["max_abs_diff"] > 0  # fp16 weights really used
    ratio = os.path.getsize(out_dir / "fp16.onnx") / os.path.getsize(out_dir / "fp32.onnx")
    assert 0.45 < ratio < 0.55
    sess = ort.InferenceSession(str(out_dir / "fp16.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)" and sess.get_outputs()[0].type == "tensor(float)"


@pytest.mark.gpu
def test_fp16_cut_on_cuda_kernels_within_fp16_tolerance(resnet18, vit, out_dir):
    # cut_onnx verifies on the CPU provider, which computes fp16 graphs in fp32 between
    # casts; here the same file runs on CUDA's true fp16 kernels.
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider")
    probe = ort.InferenceSession(str(vit), providers=["CUDAExecutionProvider"])
    if probe.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("the CUDA provider is installed but cannot start (no GPU or CUDA libraries)")
    card = cut_onnx(resnet18, R18_LATE, out_dir / "fp16.onnx", pool="gem", normalize=True, preprocessing=PRE,
                    precision="fp16", input_format="uint8")
    sess = ort.InferenceSession(str(out_dir / "fp16.onnx"), providers=["CUDAExecutionProvider"])
    pixels = _images(8)
    (got,) = sess.run(None, {"pixels": pixels})
    expected = pool_reference(_source_map(resnet18, R18_LATE, _normalise(pixels, PRE)), "gem", normalize=True)
    figures = compare_outputs(expected, got, "fp16")
    print("cuda fp16:", figures, "cpu fp16:", card.verification["outputs"]["embedding"])


def test_fixed_batch_source_gives_dynamic_batch_cut(tmp_path, out_dir):
    torch.manual_seed(0)
    src = _export(timm.create_model("test_resnet"), tmp_path / "fixed.onnx", SIZE, dynamic=False)
    assert onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    card = cut_onnx(src, LATE, out_dir / "dyn.onnx", preprocessing=PRE)
    assert card.verification["inputs"] == 2
    assert _run(out_dir / "dyn.onnx", _normalise(_images(3), PRE))[0].shape == (3, 96)


# -- failures leave nothing behind -------------------------------------------------------


def test_parity_failure_raises_and_writes_nothing(tiny, out_dir):
    # fp16 weights cannot reproduce the fp32 source exactly: with atol=0 the check must fail
    out = out_dir / "cut.onnx"
    with pytest.raises(ExportParityError, match=r"max abs diff [0-9.e-]+ \(allowed 0\), min cosine 0\.99\d+ \(required"):
        cut_onnx(tiny, LATE, out, preprocessing=PRE, precision="fp16", atol=0.0)
    assert list(out_dir.iterdir()) == []


def test_compare_outputs_reports_a_wrong_reference():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 16)).astype(np.float32)
    got = ref.copy()
    got[1, ::2] *= -1  # row 1 points elsewhere
    with pytest.raises(ExportParityError, match=r"embedding: .* max abs diff .* min cosine -?0\.\d+ \(required 0\.9999\)"):
        compare_outputs(ref, got, "fp32", name="embedding")
    with pytest.raises(ExportParityError, match=r"shape \(2, 8\) but the source model gives \(2, 16\)"):
        compare_outputs(ref, got[:, :8], "fp32")
    nan = ref.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ExportParityError, match="1 NaN/inf values"):
        compare_outputs(ref, nan, "fp16")
    small = ref + 1e-4 * np.abs(ref).max()
    assert compare_outputs(ref, small, "fp32")["max_abs_diff"] == pytest.approx(1e-4 * np.abs(ref).max(), rel=1e-2)
    zeros = np.zeros((2, 4), np.float32)
    assert compare_outputs(zeros, zeros, "fp32")["min_cosine"] == 1.0


def test_not_onnx_file(tmp_path, out_dir):
    bogus = tmp_path / "photo.onnx"
    bogus.write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg, not a protobuf" * 10)
    with pytest.raises(NotOnnxModelError, match=r"photo.onnx' is not an ONNX model"):
        cut_onnx(bogus, "x", out_dir / "cut.onnx", preprocessing=PRE)
    with pytest.raises(NotOnnxModelError, match="no ONNX file at"):
        list_onnx_tensors(tmp_path / "missing.onnx")
    assert list(out_dir.iterdir()) == []


def test_unknown_tensor_lists_close_names(tiny, out_dir):
    with pytest.raises(UnknownTensorError, match=r"'/layer4/layer4.0/act9/Relu_output_0' .*closest: .*/layer4/layer4.0/act"):
        cut_onnx(tiny, "/layer4/layer4.0/act9/Relu_output_0", out_dir / "cut.onnx", preprocessing=PRE)
    assert list(out_dir.iterdir()) == []


def test_unwritable_output_is_refused_before_any_work(tiny, tmp_path):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        cut_onnx(tiny, LATE, a_file / "cut.onnx", preprocessing=PRE)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        cut_onnx(tiny, LATE, tmp_path / "nope" / "cut.onnx", preprocessing=PRE)
    with pytest.raises(ValueError, match="is the source model"):
        cut_onnx(tiny, LATE, tiny, preprocessing=PRE)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_refused(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write to output folder"):
            cut_onnx(tiny, LATE, ro / "cut.onnx", preprocessing=PRE)
    finally:
        ro.chmod(0o700)


def test_failure_keeps_an_existing_output_untouched(tiny, out_dir):
    out = out_dir / "cut.onnx"
    cut_onnx(tiny, EARLY, out, preprocessing=PRE)
    before = out.read_bytes()
    with pytest.raises(ExportParityError):
        cut_onnx(tiny, LATE, out, preprocessing=PRE, precision="fp16", atol=0.0)
    assert out.read_bytes() == before and sorted(p.name for p in out_dir.iterdir()) == ["cut.onnx"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pool": "median"}, r"pool must be one of avg, max, gem, token, none; got pool='median'"),
        ({"pool": ["avg", "max"]}, r"pool needs one value per tensor in at \(1\)"),
        ({"precision": "int8"}, r"precision must be 'fp32' or 'fp16'; got precision='int8'"),
        ({"input_format": "png"}, r"input_format must be 'float' or 'uint8'; got input_format='png'"),
        ({"names": ["a", "b"]}, r"names needs one name per tensor in at \(1\)"),
        ({"at": []}, r"at must be a tensor name or a non-empty list"),
        ({"preprocessing": Preprocessing((3, 224, 224), "bilinear", 0.875, **IMAGENET)},
         r"preprocessing.input_size=\(3, 224, 224\) does not fit"),
    ],
)
def test_bad_arguments(tiny, out_dir, kwargs, message):
    args = {"at": LATE, "preprocessing": PRE, **kwargs}
    at = args.pop("at")
    with pytest.raises(ValueError, match=message):
        cut_onnx(tiny, at, out_dir / "cut.onnx", **args)
    assert list(out_dir.iterdir()) == []
