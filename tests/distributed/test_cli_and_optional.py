"""Ray stays optional; the --ray options are checked before anything runs (no cluster here)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from featurebank.cli import main
from featurebank.distributed import embed_images_ray
from featurebank.errors import ClusterError


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-actors", "2"], r"--num-actors needs --ray"),
        (["--cpus-per-actor", "2", "--gpus-per-actor", "1"], r"--cpus-per-actor, --gpus-per-actor need --ray"),
        (["--ray", "--workers", "2"], r"--workers sets the local embedder's decode threads"),
        (["--ray", "local", "--device", "cpu", "--gpus-per-actor", "1"], r"--device cpu contradicts --gpus-per-actor 1"),
        (["--ray", "--device", "cuda", "--gpus-per-actor", "0"], r"--device cuda contradicts --gpus-per-actor 0"),
    ],
)
def test_contradictory_options_are_usage_errors(extra, message, photo_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(photo_dir), "--model", "m.onnx", "--store", str(tmp_path / "s"), *extra])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, r"batch_size must be a positive integer; got batch_size=0"),
        ({"num_actors": 0}, r"num_actors must be a positive integer or None \(auto\); got num_actors=0"),
        ({"num_cpus_per_actor": 0}, r"num_cpus_per_actor must be a positive number of CPUs"),
        ({"num_gpus_per_actor": -1}, r"num_gpus_per_actor must be >= 0 or None"),
        ({"decode_mode": "pil"}, r"decode_mode must be one of exact, fast; got decode_mode='pil'"),
    ],
)
def test_bad_arguments(kwargs, message, photo_dir, tiny_model, tmp_path):
    with pytest.raises(ValueError, match=message):
        embed_images_ray(photo_dir, tiny_model, store=tmp_path / "s", **kwargs)


_NO_RAY = """
import sys
sys.modules["ray"] = None  # as if Ray were not installed: `import ray` raises ImportError
import featurebank, featurebank.distributed, featurebank.cli.embed_cmds
from featurebank.cli import build_parser
build_parser()
from featurebank.errors import ClusterError
try:
    featurebank.embed_images_ray(sys.argv[1], sys.argv[2], store=sys.argv[3], address=None)
except ClusterError as exc:
    print("ClusterError:", exc)
"""


def test_featurebank_runs_without_ray_and_says_how_to_install_it(photo_dir, tiny_model, tmp_path):
    out = subprocess.run([sys.executable, "-c", _NO_RAY, str(photo_dir), tiny_model, str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ClusterError: embedding on a cluster needs Ray Data" in out.stdout
    assert "pip install 'featurebank[ray]'" in out.stdout


def test_unreachable_cluster_is_a_cluster_error(photo_dir, tiny_model, tmp_path):
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("this process is connected to a Ray cluster (an address would be ignored)")
    with pytest.raises(ClusterError, match=r"cannot reach a Ray cluster at address='127\.0\.0\.1:1'.*ray start --head"):
        embed_images_ray(photo_dir, tiny_model, store=tmp_path / "s", address="127.0.0.1:1")
