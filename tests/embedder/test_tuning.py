"""Pipeline settings chosen by measurement: the cache key, the cache beside the model, a copied
cache, explicit settings, and the embed run that uses them; a real tiny model, real photos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from featurebank.embed_into_store import embed_images
from featurebank.embedder.session import open_model
from featurebank.embedder.sources import list_images
from featurebank.embedder.tuning import (
    MEASURE_MIN_IMAGES,
    cgroup_cpu_quota,
    cpu_model_name,
    machine_facts,
    tune_pipeline,
    tuning_file,
    tuning_key,
    usable_cores,
)
from featurebank.errors import NotOnnxModelError

CPU = "CPUExecutionProvider"


@pytest.fixture()
def model(tmp_path, tiny_model):
    """The tiny model in a folder of its own, so its tuning cache is this test's alone."""
    path = tmp_path / "m" / "tiny.onnx"
    path.parent.mkdir()
    shutil.copyfile(tiny_model, path)
    return path


def _write_cache(model, key, points):
    tuning_file(model).write_text(json.dumps({"format": 1, "entries": [{"key": key, "points": points}]}))


POINTS = [
    {"threads": 1, "workers": 1, "batch_size": 8, "images_per_s": 100.0},
    {"threads": 2, "workers": 2, "batch_size": 32, "images_per_s": 50.0},
]


def test_the_key_changes_with_each_input(tmp_path, model, tiny_model):
    facts = machine_facts()
    key = tuning_key(model, CPU, "fast", facts)
    assert tuning_key(model, CPU, "fast", dict(facts)) == key
    for name, other in (("cpu", "Another CPU 9000"), ("cores", facts["cores"] + 1), ("cpu_quota", 0.5),
                        ("onnxruntime", "0.0.1")):
        changed = tuning_key(model, CPU, "fast", {**facts, name: other})
        assert changed != key and changed[name] == other
    assert tuning_key(model, "CUDAExecutionProvider", "fast", facts) != key
    assert tuning_key(model, CPU, "exact", facts) != key
    # the model: a byte-identical copy is the same model, other bytes are not
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(model, copy)
    assert tuning_key(copy, CPU, "fast", facts) == key
    data = bytearray(model.read_bytes())
    data[-100] ^= 1  # inside the model card (metadata_props are at the end of an ONNX file)
    copy.write_bytes(bytes(data))
    assert tuning_key(copy, CPU, "fast", facts)["model"] != key["model"]
    with pytest.raises(ValueError, match="decode_mode must be one of exact, fast"):
        tuning_key(model, CPU, "slow", facts)


def test_cpu_quota_and_model_are_read_from_the_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None
    assert usable_cores(4, 1.5) == 2 and usable_cores(4, None) == 4 and usable_cores(2, 8.0) == 2
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 7B13\nflags\t\t: avx2\n")
    assert cpu_model_name(info) == "AMD EPYC 7B13"


def test_measured_once_with_progress_then_reused(model, capsys):
    first = tune_pipeline(model, device="cpu", progress=True)
    assert first.origin == "measured"
    err = capsys.readouterr().err
    assert "measuring the batch size and thread split for test_efficientnet (fast decoding)" in err
    assert f"chose batch {first.batch_size}, {first.threads} onnxruntime threads, {first.workers} decode threads" in err
    cached = json.loads(tuning_file(model).read_text())
    [entry] = cached["entries"]
    assert entry["key"] == tuning_key(model, CPU, "fast")
    assert {(p["threads"], p["workers"], p["batch_size"]) for p in entry["points"]} >= {
        (first.threads, first.workers, first.batch_size)}
    again = tune_pipeline(model, device="cpu", progress=True)
    assert (again.batch_size, again.threads, again.workers, again.origin) == (
        first.batch_size, first.threads, first.workers, "cached")
    assert capsys.readouterr().err == ""  # nothing measured, nothing said
    assert json.loads(tuning_file(model).read_text()) == cached


def test_a_cached_choice_is_used_as_it_is(model):
    _write_cache(model, tuning_key(model, CPU, "fast"), POINTS)
    got = tune_pipeline(model, device="cpu")
    assert (got.batch_size, got.threads, got.workers, got.lower_priority, got.origin) == (8, 1, 1, True, "cached")
    same_priority = [{**POINTS[0], "lower_priority": False, "images_per_s": 120.0}, *POINTS]
    _write_cache(model, tuning_key(model, CPU, "fast"), same_priority)
    assert tune_pipeline(model, device="cpu").lower_priority is False
    # another decode mode is another key: not measured when told not to, the defaults instead
    cores = usable_cores()
    got = tune_pipeline(model, device="cpu", decode_mode="exact", measure=False)
    assert (got.batch_size, got.threads, got.workers, got.origin) == (16, cores, cores, "default")


def test_a_cache_copied_from_another_machine_is_measured_again(model):
    foreign = {**tuning_key(model, CPU, "fast"), "cpu": "Another CPU 9000", "cores": 64}
    _write_cache(model, foreign, [{"threads": 64, "workers": 64, "batch_size": 999, "images_per_s": 1e6}])
    assert tune_pipeline(model, device="cpu", measure=False).origin == "default"
    got = tune_pipeline(model, device="cpu", progress=False)
    assert got.origin == "measured" and got.batch_size != 999 and got.threads <= usable_cores()
    keys = [e["key"] for e in json.loads(tuning_file(model).read_text())["entries"]]
    assert keys == [foreign, tuning_key(model, CPU, "fast")]  # the other machine's entry is kept


def test_explicit_settings_win(model):
    got = tune_pipeline(model, device="cpu", batch_size=5, threads=3, workers=7)
    assert (got.batch_size, got.threads, got.workers, got.origin) == (5, 3, 7, "explicit")
    assert not tuning_file(model).exists()  # nothing measured
    _write_cache(model, tuning_key(model, CPU, "fast"), POINTS)
    # the ones left open come from the measurement under the ones given
    got = tune_pipeline(model, device="cpu", threads=2)
    assert (got.batch_size, got.threads, got.workers, got.origin) == (32, 2, 2, "cached")
    got = tune_pipeline(model, device="cpu", batch_size=5)
    assert (got.batch_size, got.threads, got.workers) == (5, 1, 1)
    runner = open_model(model, device="cpu", threads=2)
    got = tune_pipeline(runner)  # an open session keeps its threads
    assert (got.batch_size, got.threads, got.workers) == (32, 2, 2)
    with pytest.raises(ValueError, match="threads=1 contradicts the open model, whose session runs 2 intra-op"):
        tune_pipeline(runner, threads=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None; got batch_size=0"):
        tune_pipeline(model, batch_size=0)
    with pytest.raises(NotOnnxModelError, match="no model file at"):
        tune_pipeline(model.parent / "missing.onnx")


def test_embed_images_runs_with_the_cached_choice_and_explicit_settings_win(tmp_path, model, photo_dir):
    _write_cache(model, tuning_key(model, CPU, "fast"), POINTS)
    emb = embed_images(photo_dir, model, device="cpu", progress=False)
    assert emb.report.settings == {"batch_size": 8, "threads": 1, "workers": 1, "lower_priority": True,
                                   "origin": "cached"}
    assert emb.ok.all() and emb.report.embedded == len(emb.paths)
    emb = embed_images(photo_dir, model, device="cpu", batch_size=3, progress=False)
    assert emb.report.settings == {"batch_size": 3, "threads": 1, "workers": 1, "lower_priority": True,
                                   "origin": "cached"}
    emb = embed_images(photo_dir, model, device="cpu", batch_size=3, threads=2, workers=2, progress=False)
    assert emb.report.settings == {"batch_size": 3, "threads": 2, "workers": 2, "lower_priority": True,
                                   "origin": "explicit"}


def test_a_small_run_does_not_measure(model, photo_dir):
    emb = embed_images(photo_dir, model, device="cpu", progress=False)
    assert len(emb.paths) < MEASURE_MIN_IMAGES
    cores = usable_cores()
    assert emb.report.settings == {"batch_size": 16, "threads": cores, "workers": cores, "lower_priority": True,
                                   "origin": "default"}
    assert not tuning_file(model).exists()


def test_image_embedder_uses_the_measured_batch_and_decodes_ahead(model, photo_dir):
    from featurebank.image_embedder import ImageEmbedder

    _write_cache(model, tuning_key(model, CPU, "fast"), POINTS)
    paths = sorted(str(p) for p in photo_dir.iterdir())
    tuned = ImageEmbedder(model, device="cpu").fit()
    X = tuned.transform(paths)
    assert tuned._runner().threads == 1  # the cached choice (batch 8, 1 thread, 1 decode thread)
    Y = ImageEmbedder(model, device="cpu", batch_size=2).fit().transform(paths)
    assert X.shape == (len(paths), tuned.n_features_out_)
    np.testing.assert_allclose(X, Y, rtol=1e-4, atol=1e-5)


def test_the_embed_command_uses_the_cached_choice_and_its_flag_wins(tmp_path, model, photo_dir, capsys):
    """`featurebank embed` without --batch-size embeds in the measured batch size (each batch is
    one store shard); --batch-size wins."""
    import pyarrow.ipc as ipc

    from featurebank.cli import main
    from featurebank.embedder.session import physical_cores

    _write_cache(model, tuning_key(model, CPU, "fast"),
                 [{"threads": physical_cores(), "workers": 1, "batch_size": 5, "images_per_s": 100.0}])

    def shard_rows(store):
        return sorted(ipc.open_file(str(p)).read_all().num_rows for p in store.rglob("*.arrow"))

    n = len(list_images(photo_dir).paths)
    assert n > 5
    for args, batch in (([], 5), (["--batch-size", "4"], 4)):
        store = tmp_path / f"store{batch}"
        assert main(["embed", str(photo_dir), "--model", str(model), "--store", str(store), "--device", "cpu",
                     "--no-progress", *args]) == 0
        rows = shard_rows(store)
        assert sum(rows) == n and max(rows) == batch, rows
    capsys.readouterr()
