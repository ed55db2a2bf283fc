"""ONNX heads: pooling, L2, uint8 prefix, pruning and fp16, on real exported graphs.

Each head is checked against the numpy reference of ``featurebank.export.parity`` applied
to the raw map that onnxruntime computes in the unmodified source graph.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from featurebank.artifact import Preprocessing
from featurebank.errors import UnknownTensorError
from featurebank.export.heads import HEAD_NODE_PREFIX, HeadSpec, add_heads, convert_to_fp16
from featurebank.export.parity import compare_outputs, pool_reference

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

SIZE = 32
PRE = Preprocessing(
    input_size=(3, SIZE, SIZE), interpolation="bicubic", crop_pct=0.875,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
)


def _export(module, path, input_name="pixels", opset=18) -> onnx.ModelProto:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (torch.zeros(2, 3, SIZE, SIZE),), str(path), input_names=[input_name],
            output_names=["logits"], dynamic_axes={input_name: {0: "n"}}, opset_version=opset, dynamo=False,
        )
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def convnet(tmp_path_factory) -> onnx.ModelProto:
    """A small conv net with the ops fp16 must survive: BN (folded), HardSwish, SiLU."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.Hardswish(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.SiLU(),
        torch.nn.Conv2d(32, 48, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(48, 10),
    )
    for m in net.modules():  # non-trivial BN statistics, so folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return _export(net, tmp_path_factory.mktemp("convnet") / "convnet.onnx", input_name="input.1")


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=SIZE)
    return _export(model, tmp_path_factory.mktemp("vit") / "vit.onnx")


def _producer(model: onnx.ModelProto, op_type: str, index: int = 0) -> str:
    return [n.output[0] for n in model.graph.node if n.op_type == op_type][index]


def _raw(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    """The tensor as the unmodified source graph computes it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], {m.graph.input[0].name: x})[0]


def _run(model: onnx.ModelProto, feed: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": feed})


def _floats(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "none"])
def test_nchw_heads_match_numpy_reference(convnet, pooling, normalize):
    tensor = _producer(convnet, "Mul", 0)  # the SiLU output: (N, 32, 16, 16), negative values too
    cut = add_heads(convnet, [HeadSpec(tensor, "embedding", pooling, normalize, "NCHW")], preprocessing=PRE)
    x = _floats()
    (got,) = _run(cut, x)
    expected = pool_reference(_raw(convnet, tensor, x), pooling, layout="NCHW", normalize=normalize)
    assert got.shape == ((2, 32) if pooling != "none" else (2, 32, 16, 16))
    figures = compare_outputs(expected, got, "fp32")
    assert figures["min_cosine"] >= 0.9999
    if normalize and pooling != "none":
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert [o.name for o in cut.graph.output] == ["embedding"]
    assert cut.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "token", "none"])
def test_nlc_heads_match_numpy_reference(vit, pooling, normalize):
    tensor = _producer(vit, "LayerNormalization", -1)  # final norm: (N, 1 + 4 tokens, 64)
    cut = add_heads(vit, [HeadSpec(tensor, "tokens", pooling, normalize, "NLC", gem_p=2.5)], preprocessing=PRE)
    x = _floats()
    (got,) = _run(cut, x)
    raw = _raw(vit, tensor, x)
    assert raw.shape == (2, 5, 64)
    expected = pool_reference(raw, pooling, layout="NLC", normalize=normalize, gem_p=2.5)
    assert got.shape == expected.shape == ((2, 64) if pooling != "none" else (2, 5, 64))
    compare_outputs(expected, got, "fp32")
    if pooling == "token":
        np.testing.assert_allclose(got if not normalize else got * np.linalg.norm(raw[:, 0], axis=1, keepdims=True),
                                   raw[:, 0], rtol=1e-4, atol=1e-5)


def test_outputs_are_the_heads_in_order_with_dynamic_batch(convnet):
    early, late = _producer(convnet, "Conv", 0), _producer(convnet, "Relu", 0)
    cut = add_heads(
        convnet,
        [HeadSpec(late, "late", "avg", False, "NCHW"), HeadSpec(early, "early", "max", True, "NCHW")],
        preprocessing=PRE,
    )
    assert [o.name for o in cut.graph.output] == ["late", "early"]
    assert cut.graph.input[0].name == "pixels"  # renamed from input.1
    assert cut.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for n in (1, 3):
        late_out, early_out = _run(cut, _floats(n, seed=n))
        assert late_out.shape == (n, 48) and early_out.shape == (n, 16)


def test_pruning_keeps_only_what_the_cut_needs(convnet):
    early = add_heads(convnet, [HeadSpec(_producer(convnet, "Conv", 0), "e", "avg", False, "NCHW")], preprocessing=PRE)
    late = add_heads(convnet, [HeadSpec(_producer(convnet, "Relu", 0), "e", "avg", False, "NCHW")], preprocessing=PRE)
    assert len(early.graph.node) < len(late.graph.node) < len(convnet.graph.node)
    assert early.ByteSize() < late.ByteSize() < convnet.ByteSize()
    assert "Gemm" not in {n.op_type for n in late.graph.node}  # the classifier is gone
    assert len(early.graph.initializer) < len(late.graph.initializer)
    used = {i for n in early.graph.node for i in n.input}
    assert all(t.name in used for t in early.graph.initializer)


def test_uint8_input_equals_float_input_after_manual_normalisation(convnet):
    tensor = _producer(convnet, "Relu", 0)
    head = [HeadSpec(tensor, "embedding", "gem", True, "NCHW")]
    as_float = add_heads(convnet, head, input_format="float", preprocessing=PRE)
    as_uint8 = add_heads(convnet, head, input_format="uint8", preprocessing=PRE)
    inp = as_uint8.graph.input[0]
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", SIZE, SIZE, 3]
    prefix_ops = [n.op_type for n in as_uint8.graph.node[:4]]
    assert prefix_ops == ["Transpose", "Cast", "Mul", "Add"]  # NCHW before the per-channel Mul/Add (fast)
    pixels = np.random.default_rng(3).integers(0, 256, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    manual = ((pixels / 255.0 - np.array(PRE.mean)) / np.array(PRE.std)).transpose(0, 3, 1, 2).astype(np.float32)
    (from_uint8,) = _run(as_uint8, pixels)
    (from_float,) = _run(as_float, manual)
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5, atol=1e-6)


def test_normalize_keeps_zero_vectors_finite():
    # x * 0 -> an all-zero (N, 4, 2, 2) map: the L2 head must give zeros, not NaN.
    graph = helper.make_graph(
        [helper.make_node("Mul", ["pixels", "zero"], ["features"])],
        "zeros",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 4, 2, 2])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 4, 2, 2])],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    pre = Preprocessing((4, 2, 2), "bilinear", 1.0, (0.5,) * 4, (0.5,) * 4)
    cut = add_heads(model, [HeadSpec("features", "features", "gem", True, "NCHW")], preprocessing=pre)
    (got,) = _run(cut, np.ones((2, 4, 2, 2), np.float32))
    assert np.all(np.isfinite(got))
    # GeM clamps at 1e-6 before normalising, so the zero map becomes a constant unit vector
    np.testing.assert_allclose(got, np.full((2, 4), 0.5, np.float32), rtol=1e-5)
    cut_avg = add_heads(model, [HeadSpec("features", "embedding", "avg", True, "NCHW")], preprocessing=pre)
    (got_avg,) = _run(cut_avg, np.ones((2, 4, 2, 2), np.float32))
    assert np.array_equal(got_avg, np.zeros((2, 4), np.float32))


def test_opset_17_graph_gets_attribute_axes(tmp_path):
    # Reduce ops take `axes` as an attribute before opset 18; foreign models are often older.
    torch.manual_seed(0)
    older = _export(timm.create_model("test_vit", img_size=SIZE), tmp_path / "vit17.onnx", opset=17)
    assert older.opset_import[0].version == 17
    tensor = _producer(older, "LayerNormalization", -1)
    cut = add_heads(older, [HeadSpec(tensor, "e", "gem", True, "NLC")], preprocessing=PRE)
    assert all(len(n.input) == 1 for n in cut.graph.node if n.op_type.startswith("Reduce"))
    x = _floats()
    expected = pool_reference(_raw(older, tensor, x), "gem", layout="NLC", normalize=True)
    compare_outputs(expected, _run(cut, x)[0], "fp32")


def test_fp16_keeps_io_types_halves_weights_and_matches(convnet):
    tensor = _producer(convnet, "Relu", 0)
    cut = add_heads(convnet, [HeadSpec(tensor, "embedding", "avg", True, "NCHW")], input_format="uint8",
                    preprocessing=PRE)
    half = convert_to_fp16(cut)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = {n.input[1] for n in half.graph.node if n.op_type == "Conv"}
    assert {t.data_type for t in half.graph.initializer if t.name in conv_weights} == {TensorProto.FLOAT16}
    assert half.ByteSize() < 0.6 * cut.ByteSize()
    pixels = np.random.default_rng(5).integers(0, 256, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    figures = compare_outputs(_run(cut, pixels)[0], _run(half, pixels)[0], "fp16")
    assert figures["max_abs_diff"] > 0  # really computed from fp16 weights
    with pytest.raises(ValueError, match="already has float16 weights"):
        convert_to_fp16(half)


def test_fp16_heads_stay_fp32_so_gem_does_not_overflow():
    # Features ~ +-400: x^3 ~ 6e7 overflows fp16 (max 65504) unless the head runs in fp32.
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixels", "w"], ["features"])],
        "big",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 8, 4, 4])],
        [numpy_helper.from_array(np.random.default_rng(0).uniform(50, 150, (8, 3, 1, 1)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    pre = Preprocessing((3, 4, 4), "bilinear", 1.0, (0.5,) * 3, (0.5,) * 3)
    cut = add_heads(model, [HeadSpec("features", "embedding", "gem", False, "NCHW")], preprocessing=pre)
    half = convert_to_fp16(cut)
    head_nodes = [n for n in half.graph.node if n.name.startswith(HEAD_NODE_PREFIX)]
    assert {"Pow", "GlobalAveragePool"} <= {n.op_type for n in head_nodes}
    # Structural, because onnxruntime's CPU provider would hide an fp16 head: it runs Pow
    # in fp32 between merged casts. CUDA would not, and x^3 would overflow there.
    inferred = onnx.shape_inference.infer_shapes(half).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.output]}
    types.update({t.name: t.data_type for t in half.graph.initializer})
    head_tensors = {name for n in head_nodes for name in [*n.input, *n.output]}
    assert {types[name] for name in head_tensors} == {TensorProto.FLOAT}
    assert TensorProto.FLOAT16 in types.values()  # the conv itself is fp16
    x = np.abs(np.random.default_rng(1).normal(size=(2, 3, 4, 4))).astype(np.float32)
    ref, got = _run(cut, x)[0], _run(half, x)[0]
    assert np.all(np.isfinite(got)) and ref.max() > 100
    compare_outputs(ref, got, "fp16")


def test_unknown_tensor_lists_close_names(convnet):
    with pytest.raises(UnknownTensorError, match=r"tensor '/2/Relu_output' is not produced.*closest: .*Relu"):
        add_heads(convnet, [HeadSpec("/2/Relu_output", "e", "avg", False, "NCHW")], preprocessing=PRE)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooling": "median"}, r"pooling must be one of avg, max, gem, token, none; got pooling='median'"),
        ({"layout": "NHWC"}, r"layout must be one of NCHW, NLC; got layout='NHWC'"),
        ({"pooling": "token"}, r"pooling='token' .* needs layout='NLC'; got layout='NCHW'"),
        ({"gem_p": 0}, r"gem_p must be a positive number; got gem_p=0"),
        ({"normalize": "yes"}, r"normalize must be a bool; got normalize='yes'"),
    ],
)
def test_headspec_rejects_bad_arguments(kwargs, message):
    args = {"tensor": "t", "name": "e", "pooling": "avg", "normalize": False, "layout": "NCHW", **kwargs}
    with pytest.raises(ValueError, match=message):
        HeadSpec(**args)


def test_add_heads_rejects_bad_arguments(convnet):
    t = _producer(convnet, "Relu", 0)
    with pytest.raises(ValueError, match=r"input_format must be one of float, uint8; got input_format='png'"):
        add_heads(convnet, [HeadSpec(t, "e", "avg", False, "NCHW")], input_format="png", preprocessing=PRE)
    with pytest.raises(ValueError, match=r"output names must be unique; got \['e'\]"):
        add_heads(convnet, [HeadSpec(t, "e", "avg", False, "NCHW")] * 2, preprocessing=PRE)
    with pytest.raises(ValueError, match=r"heads must name at least one output"):
        add_heads(convnet, [], preprocessing=PRE)
    with pytest.raises(ValueError, match=r"has rank 4 but layout='NLC'"):
        add_heads(convnet, [HeadSpec(t, "e", "avg", False, "NLC")], preprocessing=PRE)
    wrong = Preprocessing((3, 64, 64), "bilinear", 0.875, PRE.mean, PRE.std)
    with pytest.raises(ValueError, match=r"preprocessing.input_size=\(3, 64, 64\) does not fit"):
        add_heads(convnet, [HeadSpec(t, "e", "avg", False, "NCHW")], preprocessing=wrong)


def test_head_named_like_an_inner_tensor_takes_the_name(convnet):
    # The torch export names its raw outputs; a head may want the same name.
    t = _producer(convnet, "Relu", 0)
    cut = add_heads(convnet, [HeadSpec(t, t, "avg", False, "NCHW")], preprocessing=PRE)
    assert [o.name for o in cut.graph.output] == [t]
    x = _floats()
    compare_outputs(pool_reference(_raw(convnet, t, x), "avg"), _run(cut, x)[0], "fp32")
