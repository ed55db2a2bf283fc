"""The runtime rooms import and run where torch is not installed (torch blocked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK = '''
import sys, importlib.abc
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
'''


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_blocker_really_blocks():
    r = run_blocked("import torch")
    assert r.returncode != 0 and "blocked by the test" in r.stderr


def test_embedder_store_classifiers_search_work_without_torch(tiny_model, texture_dir, tmp_path):
    code = f'''
import numpy as np
import featurebank
from featurebank.embed_into_store import embed_images
from featurebank.image_embedder import ImageEmbedder
from featurebank.classifiers import LinearProbe, KNNClassifier, PrototypeClassifier
import featurebank.search
from featurebank.store import open_store
emb = embed_images({str(texture_dir)!r}, {str(tiny_model)!r}, store={str(tmp_path / "store")!r}, progress=False)
assert emb.ok.all() and emb.X.shape[0] == 30
y = np.array(emb.labels)
for clf in (LinearProbe(), KNNClassifier(n_neighbors=3), PrototypeClassifier()):
    assert clf.fit(emb.X, y).score(emb.X, y) > 0.3
assert ImageEmbedder({str(tiny_model)!r}).fit().transform(emb.paths[:2]).shape[0] == 2
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision")]
print("OK")
'''
    r = run_blocked(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_cli_without_torch_says_what_to_install(tmp_path):
    r = run_blocked("from featurebank.cli import main; sys.exit(main(['export', '-o', " + repr(str(tmp_path / "m.onnx")) + "]))")
    assert r.returncode == 2
    assert "pip install" in r.stderr and "featurebank[export]" in r.stderr and "Traceback" not in r.stderr
