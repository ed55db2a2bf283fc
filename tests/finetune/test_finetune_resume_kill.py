"""kill -9 in the middle of train_top, run again: the same final weights as an uninterrupted run
(real subprocesses, real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from featurebank.finetune.model import split_backbone

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 40

CHILD = textwrap.dedent(
    f"""
    import sys
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone
    from featurebank.finetune.model import split_backbone
    from featurebank.finetune.train import train_top

    data, ckpt, out = sys.argv[1:4]
    A, y = np.load(data + "/A.npy"), np.load(data + "/y.npy")
    _, top = split_backbone(build_backbone(get_backbone("test_efficientnet"), "random", seed=0).model, "blocks.4")
    torch.manual_seed(1)
    head = torch.nn.Linear(256, 3)
    train_top(A, y, top, head, epochs={EPOCHS}, lr_head=3e-3, batch_size=8, seed=5, patience=None,
              checkpoint_dir=ckpt, progress=False)
    save_file({{**{{"top." + k: v.contiguous() for k, v in top.state_dict().items()}},
               **{{"head." + k: v.contiguous() for k, v in head.state_dict().items()}}}}, out)
    """
)


def _run(script: Path, data: Path, ckpt: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(data), str(ckpt), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_weights_of_an_uninterrupted_run(tiny_backbone, texture_crops, tmp_path):
    X, y = texture_crops
    bottom, _ = split_backbone(tiny_backbone, "blocks.4")
    with torch.no_grad():
        A = bottom(torch.from_numpy(X)).numpy()
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "A.npy", np.concatenate([A] * 8))  # 192 samples: epochs long enough to kill one mid-run
    np.save(data / "y.npy", np.concatenate([y] * 8))
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    straight = _run(script, data, tmp_path / "straight", tmp_path / "straight.safetensors")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]

    killed_dir = tmp_path / "killed"
    child = _run(script, data, killed_dir, tmp_path / "killed.safetensors")
    deadline = time.monotonic() + 120
    while not (killed_dir / "epoch-0003.json").exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before epoch 3"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed.safetensors").exists()
    done = max(int(p.stem.split("-")[1]) for p in killed_dir.glob("epoch-*.json"))
    assert 3 <= done < EPOCHS  # killed in the middle

    rerun = _run(script, data, killed_dir, tmp_path / "killed.safetensors")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()[-2000:]
    want, got = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "killed.safetensors")
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert not [p.name for p in killed_dir.iterdir() if p.name.startswith(".tmp-")]  # the killed writer's leftovers
