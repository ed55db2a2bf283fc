"""INT8 export: the CPU's integer-kernel class, the settings it selects, calibration on real
photos, the gates on held-out photos (refused exports write nothing), fingerprints and the
session's kernel-class check. The model is timm's tiny random-weight EfficientNet (uint8 input,
conftest's ``tiny_model``); the images are real photo crops from scikit-image, as JPEGs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings

import numpy as np
import onnx
import pytest
from PIL import Image

from featurebank import _cpu
from featurebank._cpu import KERNEL_CLASSES, cpu_kernel_class, flags_of_cpuinfo, kernel_class_of_flags
from featurebank.artifact import (
    ModelCard,
    OutputSpec,
    Preprocessing,
    read_model_card,
    space_fingerprint,
    write_model_card,
)
from featurebank.cli import main
from featurebank.decoding import decode_image
from featurebank.embedder.session import open_model
from featurebank.errors import KernelClassError, ModelCardError, QuantizationError, QuantizationGateError
from featurebank.export.onnx_export import export_backbone
from featurebank.export.quantize import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_CALIBRATION_SIZE,
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_KNN_AGREEMENT,
    DEFAULT_SEARCH_BUDGET_S,
    MIN_HOLDOUT,
    conv_groups,
    feature_agreement,
    quantize_model,
    search_exclusions,
    settings_for,
    split_images,
    u8s8_is_exact,
)

# Real /proc/cpuinfo texts (abridged to the lines that matter, flags lines verbatim in the
# parts that decide), one per kernel class.
SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 cat_l2 cdp_l3 invpcid_single intel_ppin cdp_l2 ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb intel_pt avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local split_lock_detect avx_vnni avx512_bf16 wbnoinvd dtherm ida arat pln pts hfi vnmi avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq la57 rdpid bus_lock_detect cldemote movdiri movdir64b enqcmd fsrm md_clear serialize tsxldtrk pconfig arch_lbr ibt amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities
bogomips	: 4000.00
"""
CASCADE_LAKE = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 cdp_l3 invpcid_single intel_ppin ssbd mba ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm cqm mpx rdt_a avx512f avx512dq rdseed adx smap clflushopt clwb intel_pt avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local dtherm ida arat pln pts pku ospke avx512_vnni md_clear flush_l1d arch_capabilities
"""
ALDER_LAKE = """processor	: 0
vendor_id	: GenuineIntel
model name	: 12th Gen Intel(R) Core(TM) i7-1260P
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb ssbd ibrs ibpb stibp ibrs_enhanced tpr_shadow vnmi flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb intel_pt sha_ni xsaveopt xsavec xgetbv1 xsaves split_lock_detect avx_vnni dtherm ida arat pln pts hwp hwp_notify hwp_act_window hwp_epp hwp_pkg_req hfi umip pku ospke waitpkg gfni vaes vpclmulqdq rdpid movdiri movdir64b fsrm md_clear serialize arch_lbr ibt flush_l1d arch_capabilities
"""
EPYC_ROME = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B12
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip rdpid
"""
SKYLAKE_SP = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 cdp_l3 invpcid_single pti intel_ppin ssbd mba ibrs ibpb stibp tpr_shadow vnmi flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm cqm mpx rdt_a avx512f avx512dq rdseed adx smap clflushopt clwb intel_pt avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local dtherm ida arat pln pts pku ospke md_clear flush_l1d arch_capabilities
"""
GRAVITON2 = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
"""
OLD_XEON = """processor	: 0
model name	: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic popcnt tsc_deadline_timer aes xsave avx lahf_lm
"""


@pytest.mark.parametrize(
    "text,expected",
    [(SAPPHIRE_RAPIDS, "amx"), (CASCADE_LAKE, "avx512-vnni"), (ALDER_LAKE, "avx-vnni"), (EPYC_ROME, "avx2"),
     (SKYLAKE_SP, "avx2"), (GRAVITON2, "other"), (OLD_XEON, "other"), ("", "other")],
    ids=["sapphire-rapids", "cascade-lake", "alder-lake", "epyc-rome", "skylake-sp-no-vnni", "graviton2",
         "sandy-bridge", "empty"],
)
def test_kernel_class_of_real_cpuinfo_texts(text, expected):
    assert kernel_class_of_flags(flags_of_cpuinfo(text)) == expected


def test_kernel_class_of_this_machine_and_of_a_machine_without_cpuinfo(monkeypatch, tmp_path):
    with open("/proc/cpuinfo") as f:
        flags = flags_of_cpuinfo(f.read())
    assert cpu_kernel_class() == kernel_class_of_flags(flags) in KERNEL_CLASSES
    # this session's machine: AMD EPYC family 26 (Zen 5), whose flags include avx512_vnni
    if "avx512_vnni" in flags and "amx_int8" not in flags:
        assert cpu_kernel_class() == "avx512-vnni"
    monkeypatch.setattr(_cpu, "CPUINFO", str(tmp_path / "missing"))
    _cpu.cpu_flags.cache_clear()
    try:
        assert cpu_kernel_class() == "other"
    finally:
        _cpu.cpu_flags.cache_clear()


def test_settings_per_kernel_class():
    for cls in ("amx", "avx512-vnni", "avx-vnni"):
        s = settings_for(cls)
        assert (s.reduce_range, s.activation_type, s.weight_type, s.per_channel, s.quant_format) == (
            False, "uint8", "int8", True, "QDQ")
        assert settings_for(cls, u8s8_exact=False).reduce_range is True  # flags claim VNNI, kernels saturate
    for cls in ("avx2", "other"):
        assert settings_for(cls).reduce_range is True and settings_for(cls).per_channel is True
    assert "saturating int16" in settings_for("avx2").reason
    with pytest.raises(ValueError, match=r"kernel_class must be one of amx, avx512-vnni, avx-vnni, avx2, other; "
                                         r"got kernel_class='sse4'"):
        settings_for("sse4")


def test_u8s8_probe_agrees_with_the_kernel_class():
    # vpdpbusd (VNNI) is exact; AVX2's vpmaddubsw saturates the int16 pair sums the probe makes
    assert u8s8_is_exact() is (cpu_kernel_class() in ("amx", "avx512-vnni", "avx-vnni"))


# ---------------------------------------------------------------------------------------
# real photo crops
# ---------------------------------------------------------------------------------------


def _write_crops(folder, n, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data
    photos = [np.ascontiguousarray(getattr(data, name)()[..., :3])
              for name in ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        s = int(rng.integers(48, 120))
        y, x = rng.integers(0, img.shape[0] - s), rng.integers(0, img.shape[1] - s)
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(img[y : y + s, x : x + s]).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """130 distinct real photo crops plus 6 byte-identical copies under other names."""
    root = tmp_path_factory.mktemp("crops")
    paths = _write_crops(root, 130, seed=0)
    for i in range(6):
        shutil.copy(paths[i], root / f"copy_{i}.jpg")
        paths.append(root / f"copy_{i}.jpg")
    return paths


LENIENT = dict(calibration_size=16, calibration_method="minmax", search_budget_s=0, min_cosine=0.9,
               min_knn_agreement=0.5, min_speedup=0.0, threads=1)


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory, tiny_model, crops):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    card = quantize_model(tiny_model, out, crops, **LENIENT)
    return out, card


def test_quantized_tiny_model_passes_lenient_gates_and_matches_fp32(int8_model, tiny_model, crops):
    path, card = int8_model
    assert card == read_model_card(path)
    assert card.precision == "int8" and card.input_format == "uint8"
    q = card.quantization
    assert q["kernel_class"] == cpu_kernel_class()
    assert q["settings"] == settings_for(cpu_kernel_class(), u8s8_exact=u8s8_is_exact()).to_dict()
    assert (q["calibration_method"], q["calibration_size"], q["nodes_to_exclude"]) == ("minmax", 16, [])
    gates = card.verification["gates"]
    assert gates["held_out"] == 130 - 16 and gates["thresholds"]["min_cosine"] == 0.9
    fig = gates["outputs"]["embedding"]
    assert fig["n"] == 114 and fig["k"] == 10
    assert fig["min_cosine"] <= fig["p1_cosine"] <= fig["median_cosine"] and fig["median_cosine"] >= 0.9
    sp = gates["speed"]
    assert sp["int8_images_per_cpu_s"] > 0 and sp["fp32_images_per_cpu_s"] > 0 and sp["wall_speedup"] > 0
    assert sp["speedup"] == pytest.approx(sp["int8_images_per_cpu_s"] / sp["fp32_images_per_cpu_s"], rel=0.01)

    # the written file, run by the embedder's own session, reproduces the recorded gate figures
    int8, fp32 = open_model(path, device="cpu", threads=1), open_model(tiny_model, device="cpu", threads=1)
    by_key = _paths_by_key(crops)
    held = [by_key[k] for k in card.verification["held_out_keys"]]
    pixels = np.stack([decode_image(p, card, mode="exact") for p in held])
    got = feature_agreement(fp32.run(pixels)["embedding"], int8.run(pixels)["embedding"])
    assert got["median_cosine"] == pytest.approx(fig["median_cosine"], abs=1e-5)
    assert got["knn_agreement"] == pytest.approx(fig["knn_agreement"], abs=0.02)


def _paths_by_key(paths):
    import hashlib

    return {hashlib.sha256(open(p, "rb").read()).hexdigest(): p for p in paths}


def test_calibration_images_are_never_gate_images(int8_model, crops):
    _, card = int8_model
    cal, held = card.verification["calibration_keys"], card.verification["held_out_keys"]
    distinct = set(_paths_by_key(crops))  # the 6 copies share their originals' keys
    assert len(distinct) == 130 and len(cal) == 16 and len(held) == 114
    assert not set(cal) & set(held)
    assert set(cal) | set(held) == distinct
    # the split follows the content and the seed, not the listing order
    keys = sorted(distinct)
    assert split_images(keys, 16) == split_images(keys, 16)
    cal_a, _ = split_images(keys, 16, seed=0)
    cal_b, _ = split_images(keys, 16, seed=1)
    assert {keys[i] for i in cal_a} == set(cal) and {keys[i] for i in cal_a} != {keys[i] for i in cal_b}


def test_prefix_and_head_stay_fp32_and_named_nodes_are_excluded(tiny_model, crops, tmp_path):
    src = onnx.load(str(tiny_model))
    first_conv = next(n.name for n in src.graph.node if n.op_type == "Conv")
    out = tmp_path / "excl.onnx"
    card = quantize_model(tiny_model, out, crops, nodes_to_exclude=[first_conv], **LENIENT)
    assert card.quantization["nodes_to_exclude"] == [first_conv]
    g = onnx.load(str(out)).graph
    inits = {i.name for i in g.initializer}
    nodes = {n.name: n for n in g.node}
    # the uint8 -> float prefix reads the raw uint8 input, unquantized
    assert nodes["featurebank_input/Transpose"].input[0] == "pixels"
    assert not [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "pixels"]
    assert nodes["featurebank_head/GlobalAveragePool"].op_type == "GlobalAveragePool"
    # the excluded convolution keeps its float weights; the others read dequantized int8 ones
    assert nodes[first_conv].input[1] in inits
    producer = {o: n.op_type for n in g.node for o in n.output}
    others = [n for n in g.node if n.op_type == "Conv" and n.name != first_conv]
    assert len(others) == 16 and {producer.get(n.input[1]) for n in others} == {"DequantizeLinear"}
    assert producer.get(nodes[first_conv].input[0]) != "DequantizeLinear"
    with pytest.raises(QuantizationError, match=r"nodes_to_exclude names node 'node_Conv_20', which the graph lacks; "
                                                r"closest: node_Conv_2\d\d, node_Conv_2\d\d"):
        quantize_model(tiny_model, tmp_path / "never.onnx", crops, nodes_to_exclude=["node_Conv_20"], **LENIENT)
    assert not (tmp_path / "never.onnx").exists()


def test_float_input_model_is_calibrated_with_normalised_float_batches(tmp_path, crops):
    fp32 = tmp_path / "float.onnx"
    export_backbone("test_efficientnet", fp32, weights="random", input_format="float")
    card = quantize_model(fp32, tmp_path / "float-int8.onnx", crops, **LENIENT)
    assert card.input_format == "float" and card.verification["gates"]["outputs"]["embedding"]["median_cosine"] >= 0.9
    g = onnx.load(str(tmp_path / "float-int8.onnx")).graph
    assert [i.type.tensor_type.elem_type for i in g.input] == [onnx.TensorProto.FLOAT]
    # the normalised float input feeds the first convolution through its own Q/DQ pair
    assert [n.op_type for n in g.node if "pixels" in n.input] == ["QuantizeLinear"]


def _activation_scales(path):
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    return {i.name: float(numpy_helper.to_array(i)) for i in g.initializer
            if i.name.endswith("_scale") and numpy_helper.to_array(i).size == 1}


@pytest.mark.slow  # entropy: a KL search over 2048 histogram bins per tensor, ~18 s here
def test_entropy_calibration_is_not_minmax_in_disguise(tiny_model, crops, tmp_path):
    # quantize_static's own entropy settings (128 bins for 128 quantized bins) reproduce MinMax exactly
    minmax = quantize_model(tiny_model, tmp_path / "minmax.onnx", crops, **LENIENT)
    entropy = quantize_model(tiny_model, tmp_path / "entropy.onnx", crops,
                             **{**LENIENT, "calibration_method": "entropy", "min_cosine": 0.0,
                                "min_knn_agreement": 0.0})
    a, b = _activation_scales(tmp_path / "minmax.onnx"), _activation_scales(tmp_path / "entropy.onnx")
    assert a.keys() == b.keys() and len(a) > 20
    assert sum(a[k] != b[k] for k in a) > len(a) // 2
    assert entropy.quantization["calibration_method"] == "entropy" != minmax.quantization["calibration_method"]
    assert entropy.outputs[0].fingerprint != minmax.outputs[0].fingerprint


def test_export_missing_a_gate_is_refused_and_writes_nothing(tiny_model, crops, tmp_path):
    out = tmp_path / "strict.onnx"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(QuantizationGateError, match=r"^INT8 model refused, nothing written to .*strict\.onnx': median "
                       r"cosine to fp32 0\.\d{4} < 1 \(short by 0\.\d{4}\); top-10 neighbour agreement 0\.\d{4} < 1 "
                       r"\(short by 0\.\d{4}\), measured on 114 held-out images on a CPU of kernel class ") as info:
        quantize_model(tiny_model, out, crops, **{**LENIENT, "min_cosine": 1.0, "min_knn_agreement": 1.0})
    assert [gate for gate, _, _ in info.value.misses] == ["median cosine to fp32", "top-10 neighbour agreement"]
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file
    with pytest.raises(QuantizationGateError, match=r"speed-up over fp32 \d+\.\d{4} < 1000 \(short by"):
        quantize_model(tiny_model, out, crops, **{**LENIENT, "min_speedup": 1000.0})
    assert sorted(os.listdir(tmp_path)) == before


def test_too_few_images_refused_with_the_count_needed(tiny_model, crops, tmp_path):
    # 40 distinct images (the copies of the first 6 count once)
    few = crops[:40] + crops[130:]
    with pytest.raises(QuantizationError, match=r"^INT8 calibration needs at least 116 distinct images \(16 to "
                       r"calibrate \+ 100 held out for the gates\); got 40: add 76 images or lower the calibration "
                       r"size$"):
        quantize_model(tiny_model, tmp_path / "few.onnx", few, **LENIENT)
    assert not (tmp_path / "few.onnx").exists()


def test_int8_vectors_have_their_own_space(int8_model, tiny_model, crops, tmp_path):
    _, card = int8_model
    fp32 = read_model_card(tiny_model)
    assert card.outputs[0].fingerprint != fp32.outputs[0].fingerprint
    for mode in ("exact", "fast"):
        assert (space_fingerprint(card.outputs[0].fingerprint, mode)
                != space_fingerprint(fp32.outputs[0].fingerprint, mode))
    # the kernel class is part of it: the same export gated for an AVX2 host is another space
    other = "avx2" if cpu_kernel_class() != "avx2" else "avx512-vnni"
    avx2 = quantize_model(tiny_model, tmp_path / "other.onnx", crops, kernel_class=other, **LENIENT)
    assert avx2.quantization["kernel_class"] == other
    assert avx2.quantization["settings"]["reduce_range"] is (other == "avx2")
    assert avx2.outputs[0].fingerprint != card.outputs[0].fingerprint
    # and so is the calibration; the same export again is the same space
    recal = quantize_model(tiny_model, tmp_path / "seed1.onnx", crops, seed=1, **LENIENT)
    assert recal.quantization["calibration_sha256"] != card.quantization["calibration_sha256"]
    assert recal.outputs[0].fingerprint != card.outputs[0].fingerprint
    again = quantize_model(tiny_model, tmp_path / "again.onnx", crops, **LENIENT)
    assert again.outputs[0].fingerprint == card.outputs[0].fingerprint


def test_int8_and_fp32_vectors_never_share_a_store_space(int8_model, tiny_model, crops, tmp_path):
    from featurebank import embed_images, open_store

    path, card = int8_model
    store = tmp_path / "store"
    v8 = embed_images(crops[:12], path, store=store, device="cpu", threads=1, progress=False)
    v32 = embed_images(crops[:12], tiny_model, store=store, device="cpu", threads=1, progress=False)
    spaces = {sp.fingerprint for sp in open_store(store).spaces()}
    assert spaces == {space_fingerprint(card.outputs[0].fingerprint, "fast"),
                      space_fingerprint(read_model_card(tiny_model).outputs[0].fingerprint, "fast")}
    a, b = v8.vectors["embedding"], v32.vectors["embedding"]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert 0.9 < np.median(cos) < 1.0  # close, but other vectors


def test_card_rules_for_int8():
    pre = Preprocessing(input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    common = dict(name="e", layer="l", pooling="avg", normalize=False, dim=3, backbone="b", weights_sha256="0" * 64,
                  weights_source="x", preprocessing=pre)
    fp32 = OutputSpec.make(**common, precision="fp32")
    # a float output's fingerprint is what it was before int8 existed (stores keep their vectors)
    assert fp32.fingerprint == OutputSpec.make(**common, precision="fp32", quantization=None).fingerprint
    with pytest.raises(ModelCardError, match=r"precision 'int8' needs its quantization record"):
        OutputSpec.make(**common, precision="int8")
    with pytest.raises(ModelCardError, match=r"a quantization record is only valid with precision int8; got "
                                             r"precision 'fp32'"):
        ModelCard(backbone="b", weights_source="x", weights_sha256="0" * 64, weights_license="mit", outputs=(fp32,),
                  preprocessing=pre, quantization={"kernel_class": "avx2"})
    old = ModelCard(backbone="b", weights_source="x", weights_sha256="0" * 64, weights_license="mit", outputs=(fp32,),
                    preprocessing=pre)
    assert "featurebank.quantization" not in old.to_metadata()
    assert ModelCard.from_metadata(old.to_metadata()).fingerprint == old.fingerprint


def _with_kernel_class(src, dst, kernel_class):
    proto = onnx.load(str(src))
    card = read_model_card(proto)
    q = {**card.quantization, "kernel_class": kernel_class}
    write_model_card(proto, dataclasses.replace(card, quantization=q, fingerprint=""))
    onnx.save(proto, str(dst))


def test_session_refuses_an_int8_model_of_another_kernel_class(int8_model, tmp_path, monkeypatch, caplog):
    path, _ = int8_model
    assert open_model(path, device="cpu", threads=1).card.precision == "int8"
    other = "avx2" if cpu_kernel_class() != "avx2" else "avx512-vnni"
    moved = tmp_path / "moved.onnx"
    _with_kernel_class(path, moved, other)
    monkeypatch.delenv("FEATUREBANK_ALLOW_KERNEL_MISMATCH", raising=False)
    with pytest.raises(KernelClassError, match=rf"moved\.onnx' is an int8 model quantized and gated on a {other} CPU, "
                       rf"but this CPU is {cpu_kernel_class()}, whose integer kernels give other vectors: re-export it "
                       r"on this machine .* or set FEATUREBANK_ALLOW_KERNEL_MISMATCH=1"):
        open_model(moved, device="cpu", threads=1)
    with caplog.at_level(logging.WARNING, logger="featurebank"):
        runner = open_model(moved, device="cpu", threads=1, allow_kernel_mismatch=True)
    assert runner.card.quantization["kernel_class"] == other
    assert f"gated on a {other} CPU" in caplog.text and "running it anyway" in caplog.text
    monkeypatch.setenv("FEATUREBANK_ALLOW_KERNEL_MISMATCH", "1")
    assert open_model(moved, device="cpu", threads=1).card.precision == "int8"
    with pytest.raises(KernelClassError):
        open_model(moved, device="cpu", threads=1, allow_kernel_mismatch=False)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_int8_needs_calibrate_and_float_paths_refuse_int8_flags(capsys, tmp_path):
    code, _, err = run(capsys, "export", "test_efficientnet", "--weights", "random", "--precision", "int8",
                       "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "--precision int8 needs --calibrate SOURCE" in err
    code, _, err = run(capsys, "export", "test_efficientnet", "--weights", "random", "--calibrate", str(tmp_path),
                       "--min-cosine", "0.5", "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "--calibrate, --min-cosine only apply to --precision int8" in err
    with pytest.raises(ValueError, match=r"precision='int8' needs calibration images of your data: pass calibrate="):
        export_backbone("test_efficientnet", tmp_path / "m.onnx", weights="random", precision="int8")
    with pytest.raises(SystemExit) as info:  # cut writes float graphs only
        main(["cut", str(tmp_path / "x.onnx"), "--precision", "int8", "--at", "t", "-o", "y.onnx"])
    assert info.value.code == 2 and "invalid choice: 'int8' (choose from 'fp32', 'fp16')" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_help_quotes_the_library_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"images to calibrate on (default: {DEFAULT_CALIBRATION_SIZE})" in out
    assert f"(default: {DEFAULT_MIN_COSINE})" in out and f"(default: {DEFAULT_MIN_KNN_AGREEMENT})" in out
    assert "{" + ",".join(CALIBRATION_METHODS) + "}" in out and f"(default: {DEFAULT_CALIBRATION_METHOD})" in out
    assert f"0: no search (default: {DEFAULT_SEARCH_BUDGET_S})" in out and "(default: 1.0)" in out
    assert MIN_HOLDOUT == 100


def test_cli_exports_an_int8_model_from_a_folder(capsys, tmp_path, crops):
    out = tmp_path / "tiny-int8.onnx"
    folder = crops[0].parent
    code, stdout, err = run(capsys, "export", "test_efficientnet", "--weights", "random", "--input", "uint8",
                            # 24 images: batches of 16 + 8 broke onnxruntime's percentile calibrator
                            "--precision", "int8", "--calibrate", str(folder), "--calibration-size", "24",
                            "--calibration-method", "percentile", "--min-cosine", "0.5", "--min-knn-agreement", "0.3",
                            "--min-speedup", "0", "-o", str(out))
    assert code == 0, err
    card = read_model_card(out)
    assert card.precision == "int8" and card.quantization["calibration_method"] == "percentile"
    assert f"int8 for kernel class {cpu_kernel_class()}: uint8 x int8, per-channel" in stdout
    assert "gates embedding on 106 held-out images: cosine to fp32 median 0." in stdout
    assert set(card.verification["search"]["gains"]) == {"bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                                                         "blocks.4", "bn2"}  # the default search ran
    assert "images per CPU second int8 vs" in stdout and "by wall time" in stdout


def test_exclusion_search_measures_each_conv_group_on_calibration_images(tiny_model, crops, tmp_path):
    proto = onnx.load(str(tiny_model))
    groups = conv_groups(proto)
    # whole stages from torch's module scopes: the stem conv (its batch norm folded in) is in bn1
    assert list(groups) == ["bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "bn2"]
    ops = {n.name: n.op_type for n in proto.graph.node}
    assert {ops[n] for n in groups["blocks.3"]} == {"Conv", "Sigmoid", "Mul"}  # convolutions, SiLU, SE gate
    grouped = [n for v in groups.values() for n in v]
    assert sorted(n for n, op in ops.items() if op == "Conv") == sorted(n for n in grouped if ops[n] == "Conv")
    assert not [n for n in grouped if n.startswith(("featurebank_input/", "featurebank_head/"))]
    card = read_model_card(tiny_model)
    pixels = np.stack([decode_image(p, card) for p in crops[:24]])
    nodes, record = search_exclusions(tiny_model, card, pixels, settings=settings_for(cpu_kernel_class()),
                                      calibration_method="minmax", target_cosine=0.99999, budget_s=120, threads=1,
                                      tmp_dir=tmp_path)
    assert record["measured_on"] == "calibration images: ranges from 12, scored on 12"
    with pytest.raises(QuantizationError, match=r"the exclusion search needs at least 22 calibration images \(half "
                                                r"fit the ranges, half score\); got 16: raise the calibration size"):
        search_exclusions(tiny_model, card, pixels[:16], settings=settings_for("avx2"), calibration_method="minmax")
    assert set(record["gains"]) == set(groups) == set(record["costs_cpu_ms_per_image"])
    assert record["base_cpu_ms_per_image"] > 0 and record["fp32_cpu_ms_per_image"] > 0
    # groups of positive gain, or free ones (kept fp32 they run faster) retried beside those kept
    costs = record["costs_cpu_ms_per_image"]
    greedy = record["greedy"]["chosen"]
    assert greedy and all(record["gains"][g] > 0 or costs[g] <= 0 for g in greedy)
    # then prefixes (the first j stages fp32), each measured; the cheaper of the two at the
    # target wins, or the closer one when neither reaches it (0.99999 is out of reach here)
    prefixes = record["prefixes"]
    assert prefixes and [p["groups"] for p in prefixes] == [list(groups)[:j] for j in range(1, len(prefixes) + 1)]
    candidates = [(greedy, record["greedy"]["median_cosine"])] + [(p["groups"], p["median_cosine"]) for p in prefixes]
    assert all(c < 0.99999 for _, c in candidates)
    assert record["median_cosine"] == max(c for _, c in candidates)
    assert record["chosen"] in [g for g, c in candidates if c == record["median_cosine"]]
    # no group is kept that would make the model slower than the speed gate allows
    _, capped = search_exclusions(tiny_model, card, pixels, settings=settings_for(cpu_kernel_class()),
                                  calibration_method="minmax", target_cosine=0.99999, budget_s=120, threads=1,
                                  tmp_dir=tmp_path, min_speedup=1000.0)
    assert capped["chosen"] == [] and capped["median_cosine"] == capped["base_median_cosine"]
    assert nodes == [n for g in record["chosen"] for n in groups[g]]
    assert record["median_cosine"] >= record["base_median_cosine"]
    assert os.listdir(tmp_path) == []  # the range cache and trial models are gone
    # through quantize_model: the search's record and nodes land in the card
    out = tmp_path / "searched.onnx"
    q = quantize_model(tiny_model, out, crops, **{**LENIENT, "calibration_size": 24, "search_budget_s": 120})
    search = q.verification["search"]
    assert search["target_cosine"] == LENIENT["min_cosine"] + 0.005 and set(search["gains"]) == set(groups)
    assert q.quantization["nodes_to_exclude"] == sorted(n for g in search["chosen"] for n in groups[g])


# ---------------------------------------------------------------------------------------
# the model cache: `embed --backbone NAME --precision int8 --calibrate SOURCE`
# ---------------------------------------------------------------------------------------

TINY = dict(weights="random", input_format="uint8")


def _models(cache):
    return sorted(p.name for p in (cache / "models").glob("*.onnx"))


@pytest.mark.slow  # five tiny quantizations: ~12 s
def test_cached_int8_export_is_built_once_per_calibration_set(tmp_path, crops, monkeypatch):
    from featurebank.export.cache import cached_export

    monkeypatch.setenv("FEATUREBANK_CACHE", str(tmp_path / "cache"))
    cal = crops[:130]
    path = cached_export("test_efficientnet", **TINY, precision="int8", calibrate=cal, **LENIENT)
    card = read_model_card(path)
    assert card.precision == "int8" and card.quantization["calibration_method"] == "minmax"
    gates = card.verification["gates"]
    assert gates["held_out"] == 114 and gates["thresholds"]["min_cosine"] == 0.9
    fp32 = cached_export("test_efficientnet", **TINY)  # quantized from the cached fp32 export: one file, shared
    assert len(_models(tmp_path / "cache")) == 2 and fp32 != path
    stamp = path.stat().st_mtime_ns
    # the same images by content (reordered, copied under other names, duplicates added): the cached model
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, p in enumerate(reversed(cal)):
        shutil.copy(p, renamed / f"r{i}.jpg")
    again = cached_export("test_efficientnet", **TINY, precision="int8",
                          calibrate=sorted(renamed.iterdir()) + crops[130:], **LENIENT)
    assert again == path and path.stat().st_mtime_ns == stamp
    # another calibration set, another calibration method: each its own model
    edited = renamed / "r0.jpg"
    Image.open(edited).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited, quality=90)
    other = cached_export("test_efficientnet", **TINY, precision="int8", calibrate=sorted(renamed.iterdir()), **LENIENT)
    pct = cached_export("test_efficientnet", **TINY, precision="int8", calibrate=cal,
                        **{**LENIENT, "calibration_method": "percentile"})
    assert len({path, other, pct}) == 3 and len(_models(tmp_path / "cache")) == 4
    assert read_model_card(other).quantization["calibration_sha256"] != card.quantization["calibration_sha256"]
    assert read_model_card(pct).quantization["calibration_method"] == "percentile"
    # a refused model is not cached (the next call measures again)
    with pytest.raises(QuantizationGateError, match=r"^INT8 model refused, nothing written to .*median cosine "):
        cached_export("test_efficientnet", **TINY, precision="int8", calibrate=cal, **{**LENIENT, "min_cosine": 1.0})
    assert len(_models(tmp_path / "cache")) == 4


def test_cached_int8_export_refuses_before_exporting(tmp_path, crops, monkeypatch):
    from featurebank.export.cache import cached_export

    monkeypatch.setenv("FEATUREBANK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QuantizationError, match=r"^INT8 calibration needs at least 164 distinct images \(64 to "
                                                r"calibrate \+ 100 held out for the gates\); got 40: add 124 images"):
        cached_export("test_efficientnet", **TINY, precision="int8", calibrate=crops[:40])
    assert _models(tmp_path / "cache") == []  # not even the fp32 export ran
    with pytest.raises(ValueError, match=r"^precision='int8' needs calibration images of your data: pass calibrate="):
        cached_export("test_efficientnet", **TINY, precision="int8")
    with pytest.raises(ValueError, match=r"^calibrate, min_cosine only apply to precision='int8'; got precision="):
        cached_export("test_efficientnet", **TINY, precision="fp32", calibrate=crops, min_cosine=0.5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) min_cosin$"):
        cached_export("test_efficientnet", **TINY, precision="int8", calibrate=crops, min_cosin=0.5)
    assert _models(tmp_path / "cache") == []


def test_cli_embed_int8_backbone_into_its_own_store_space(capsys, tmp_path, crops, monkeypatch):
    from featurebank import open_store

    monkeypatch.setenv("FEATUREBANK_CACHE", str(tmp_path / "cache"))
    folder, store = str(crops[0].parent), str(tmp_path / "store")
    lenient = ["--calibration-size", "16", "--calibration-method", "minmax", "--search-budget", "0",
               "--min-cosine", "0.9", "--min-knn-agreement", "0.5", "--min-speedup", "0"]
    tiny = ["--backbone", "test_efficientnet", "--weights", "random", "--no-progress"]
    code, out, err = run(capsys, "embed", folder, "--store", store, *tiny, "--precision", "int8", "--calibrate", folder,
                         *lenient, "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] == 130  # 136 files, 6 of them copies
    (int8_path,) = [p for p in (tmp_path / "cache" / "models").glob("*.onnx")
                    if read_model_card(p).precision == "int8"]
    stamp = int8_path.stat().st_mtime_ns
    code, out, err = run(capsys, "embed", folder, "--store", store, *tiny)  # fp32 of the same images
    assert code == 0, err
    fp32_path = next(p for p in (tmp_path / "cache" / "models").glob("*.onnx") if p != int8_path)
    spaces = {sp.fingerprint for sp in open_store(store).spaces()}
    assert spaces == {space_fingerprint(read_model_card(p).outputs[0].fingerprint, "fast")
                      for p in (int8_path, fp32_path)}
    # again: the cached int8 model, every image already in its space
    code, out, err = run(capsys, "embed", folder, "--store", store, *tiny, "--precision", "int8", "--calibrate", folder,
                         *lenient, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["embedded"], report["cached"]) == (0, 130) and int8_path.stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cache" / "models").glob("*.onnx"))) == 2


def test_cli_embed_int8_errors(capsys, tmp_path, crops, monkeypatch):
    monkeypatch.setenv("FEATUREBANK_CACHE", str(tmp_path / "cache"))
    folder, store = str(crops[0].parent), str(tmp_path / "store")
    tiny = ["--backbone", "test_efficientnet", "--weights", "random"]
    code, _, err = run(capsys, "embed", folder, "--store", store, *tiny, "--calibrate", folder)
    assert code == 2 and "--calibrate only apply to --precision int8" in err
    code, _, err = run(capsys, "embed", folder, "--store", store, *tiny, "--min-cosine", "0.5")
    assert code == 2 and "--min-cosine only apply to --precision int8" in err
    code, _, err = run(capsys, "embed", folder, "--store", store, *tiny, "--precision", "int8")
    assert code == 2 and "--precision int8 needs --calibrate SOURCE" in err
    few = tmp_path / "few"
    few.mkdir()
    for p in crops[:50]:
        shutil.copy(p, few)
    code, _, err = run(capsys, "embed", folder, "--store", store, *tiny, "--precision", "int8", "--calibrate", str(few))
    assert code == 2 and ("INT8 calibration needs at least 164 distinct images (64 to calibrate + 100 held out for the "
                          "gates); got 50: add 114 images") in err
    code, _, err = run(capsys, "embed", folder, "--store", store, "--model", str(tmp_path / "m.onnx"), "--precision",
                       "int8", "--calibrate", folder)
    assert code == 2 and "--precision int8 and --calibrate apply to --backbone" in err
    assert not (tmp_path / "store").exists() and not list((tmp_path / "cache").glob("models/*.onnx"))
