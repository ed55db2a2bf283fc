"""embed_images_ray on a real local Ray cluster (2 CPUs), against the local embedder.

Slow: every run starts Ray Data executors and actors (about 10 s each on the shared machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featurebank.distributed import embed_images_ray
from featurebank.embed_into_store import embed_images
from featurebank.store import open_store

pytestmark = pytest.mark.slow


def _spaces(store_dir) -> dict[str, object]:
    return {s.fingerprint: s for s in open_store(store_dir).spaces()}


def assert_same_store(ray_store, local_store, *, atol=1e-5) -> int:
    """Same spaces, same keys, vectors within atol, no duplicate rows; returns the key count."""
    got, want = _spaces(ray_store), _spaces(local_store)
    assert sorted(got) == sorted(want)
    n = None
    for fp, w in want.items():
        keys = w.keys()
        assert list(got[fp].keys()) == list(keys)
        Xg, found = got[fp].get(keys)
        assert found.all()
        np.testing.assert_allclose(Xg, w.get(keys)[0], atol=atol, rtol=0)
        n = len(keys)
    rep = open_store(ray_store).verify()
    assert rep.ok, rep.problems
    assert rep.n_rows == rep.n_vectors, "a retried or resumed batch was written twice"
    return n


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("broken")
    (d / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header and nothing else")
    return d


def test_same_vectors_keys_items_and_failures_as_local(ray_cluster, tiny_model, texture_dir, photo_dir, broken_dir, tmp_path):
    sources = [f"file://{texture_dir}", str(photo_dir), str(broken_dir)]
    report = embed_images_ray(sources, tiny_model, store=tmp_path / "ray", batch_size=8, num_actors=1, progress=False)
    local = embed_images(sources[1:] + [str(texture_dir)], tiny_model, store=tmp_path / "local", batch_size=8,
                         progress=False, return_vectors=False)
    assert (report.total, report.embedded, report.failed, report.cached) == (40, 39, 1, 0)
    assert report.failures == [(str(broken_dir / "cut.jpg"), local.report.failures[0][1])]
    assert set(report.timings) == {"read", "decode", "infer", "write"} and report.timings["infer"] > 0
    assert assert_same_store(tmp_path / "ray", tmp_path / "local") == 39
    ray_st, local_st = open_store(tmp_path / "ray"), open_store(tmp_path / "local")
    assert sorted((i.path, i.key, i.label) for i in ray_st.items()) == sorted((i.path, i.key, i.label) for i in local_st.items())
    assert [(f.path, f.key, f.reason) for f in ray_st.failures()] == [(f.path, f.key, f.reason) for f in local_st.failures()]

    again = embed_images_ray(sources, tiny_model, store=tmp_path / "ray", progress=False)
    assert (again.embedded, again.cached, again.skipped_failed, again.failed) == (0, 39, 1, 0)
    retried = embed_images_ray(sources, tiny_model, store=tmp_path / "ray", retry_failed=True, progress=False)
    assert (retried.embedded, retried.failed) == (0, 1)
    assert open_store(tmp_path / "ray").failures()[0].attempts == 2


# The fault is injected from here, not from the package: this driver's Ray job runs a setup
# hook in each of its workers that wraps Space.add so that the first commit on the node (of
# one space's shard, of a model with two outputs) is followed by the worker's death, before
# its batch returns -- as an OOM kill or a lost node would look to Ray. Ray restarts the
# actor and retries the batch, which then finds one space already holding its keys.
_CRASHING_DRIVER = """
import json, sys, ray

def die_after_the_first_commit():
    import os
    from featurebank.store import Space

    add = Space.add

    def add_then_die(self, *args, **kwargs):
        n = add(self, *args, **kwargs)
        try:
            fd = os.open(os.environ["FB_TEST_CRASH_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return n
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)

    Space.add = add_then_die

ray.init(address=sys.argv[1], logging_level="WARNING",
         runtime_env={"worker_process_setup_hook": die_after_the_first_commit,
                      "env_vars": {"FB_TEST_CRASH_MARKER": sys.argv[2]}})
from featurebank.distributed import embed_images_ray
r = embed_images_ray(sys.argv[3], sys.argv[4], store=sys.argv[5], batch_size=4, num_actors=1, progress=False)
print(json.dumps({"embedded": r.embedded, "failed": r.failed, "driver": __import__("os").getpid()}))
"""


def test_a_worker_dying_after_its_write_is_restarted_without_duplicates(ray_cluster, tiny_model, texture_dir, tmp_path):
    marker = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", _CRASHING_DRIVER, ray_cluster, str(marker), str(texture_dir), tiny_model,
                           str(tmp_path / "ray")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray's log monitor also writes to the driver's stdout, at its own pace (after the report under load)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"embedded": ')]
    assert len(lines) == 1, proc.stdout[-3000:]
    report = json.loads(lines[0])
    assert marker.exists(), "no actor died: the fault was not injected"
    assert int(marker.read_text()) != report["driver"]  # a worker died, the driver did not
    assert (report["embedded"], report["failed"]) == (30, 0)
    embed_images(texture_dir, tiny_model, store=tmp_path / "local", progress=False, return_vectors=False)
    assert assert_same_store(tmp_path / "ray", tmp_path / "local") == 30


_DRIVER = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="WARNING")
from featurebank.distributed import embed_images_ray
embed_images_ray(sys.argv[2:4], sys.argv[4], store=sys.argv[5], batch_size=1, num_actors=1, progress=False)
print("FINISHED", flush=True)
"""


def test_resume_after_the_driver_is_killed_midway(ray_cluster, tiny_model, texture_dir, photo_dir, tmp_path):
    store = tmp_path / "ray"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, ray_cluster, str(texture_dir), str(photo_dir), tiny_model,
                             str(store)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        from featurebank.artifact import read_model_card

        # the kill comes once every space (one per model output) holds a shard: a kill between a batch's
        # shards in its two spaces would leave no image with a vector in every space (seen under load)
        n_spaces = len(read_model_card(tiny_model).outputs)
        deadline = time.monotonic() + 240
        while len({p.parent.parent for p in store.glob("spaces/*/shards/*.arrow")}) < n_spaces:
            assert proc.poll() is None, "the driver ended before writing a shard"
            assert time.monotonic() < deadline, "no shard after 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and "FINISHED" not in out
    rep = open_store(store).verify()
    assert rep.ok, rep.problems
    written = min(len(s) for s in _spaces(store).values())  # images with a vector in every space
    assert 1 <= written < 39, f"the kill came too late to test resuming ({written} vectors)"

    report = embed_images_ray([texture_dir, photo_dir], tiny_model, store=store, batch_size=4, progress=False)
    assert report.cached >= written and report.cached + report.embedded == 39 and report.failed == 0
    embed_images([texture_dir, photo_dir], tiny_model, store=tmp_path / "local", progress=False, return_vectors=False)
    assert assert_same_store(store, tmp_path / "local") == 39
    # vectors written before the kill but never catalogued get their items on the rerun
    items = {(i.path, i.key, i.label) for i in open_store(store).items()}
    assert items == {(i.path, i.key, i.label) for i in open_store(tmp_path / "local").items()}


def test_cli_embed_with_ray(ray_cluster, tiny_model, photo_dir, tmp_path, capsys):
    from featurebank.cli import main

    rc = main(["embed", str(photo_dir), "--model", tiny_model, "--store", str(tmp_path / "s"), "--ray", "--batch-size", "4",
               "--num-actors", "1", "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["total"], out["embedded"], out["failed"]) == (9, 9, 0)
    assert len(open_store(tmp_path / "s").items()) == 9


def test_a_space_that_already_holds_a_key_does_not_get_it_twice(ray_cluster, tiny_model, tiny_features_model, photo_dir,
                                                                  tmp_path):
    # the state a multi-output batch leaves when its worker dies between its two spaces' shards
    store = tmp_path / "ray"
    embed_images(photo_dir, tiny_features_model, store=store, progress=False, return_vectors=False)
    report = embed_images_ray(photo_dir, tiny_model, store=store, batch_size=4, progress=False)
    assert (report.cached, report.embedded) == (0, 9)
    embed_images(photo_dir, tiny_model, store=tmp_path / "local", progress=False, return_vectors=False)
    assert assert_same_store(store, tmp_path / "local") == 9


def test_a_node_that_cannot_see_the_store_fails_with_a_clear_error(ray_cluster, tiny_model, photo_dir, tmp_path):
    # what an actor on a node without the shared store meets: the driver's space is not there
    from featurebank.artifact import read_model_card
    from featurebank.distributed.ray_embed import _run_on_cluster
    from featurebank.errors import ClusterError

    open_store(tmp_path / "s")
    rows = [{"key": "0" * 64, "path": str(photo_dir / "coffee.jpg"), "label": "", "has_label": False}]
    with pytest.raises(ClusterError, match=r"cannot use the store at .*every node mounts at the same path"):
        list(_run_on_cluster(rows, tiny_model, str(tmp_path / "s"), {"features": "1" * 64}, read_model_card(tiny_model),
                             address="auto", decode_mode="fast", batch_size=2, num_actors=1, num_cpus_per_actor=1.0,
                             num_gpus_per_actor=None, num_cpus_per_decode_task=1.0, ray_remote_args={}, progress=False))


def test_images_inside_a_zip_url_get_the_same_vectors(ray_cluster, tiny_model, texture_dir, tmp_path):
    import zipfile

    archive = tmp_path / "textures.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(texture_dir.rglob("*.jpg")):
            z.write(p, f"textures/{p.parent.name}/{p.name}")
    report = embed_images_ray(f"zip://textures::file://{archive}", tiny_model, store=tmp_path / "ray", batch_size=8,
                              progress=False)
    assert (report.total, report.embedded, report.failed) == (30, 30, 0)
    embed_images(texture_dir, tiny_model, store=tmp_path / "local", progress=False, return_vectors=False)
    assert assert_same_store(tmp_path / "ray", tmp_path / "local") == 30
    assert open_store(tmp_path / "ray").items() == []  # the store keeps local paths only
