"""verify() on truncated and bit-flipped shards, quarantine, and the `featurebank store` commands."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from store_helpers import FP_A, FP_B, make_keys, make_vectors

from featurebank.cli import main
from featurebank.errors import StoreError
from featurebank.store import open_store


def _two_shards(store, dim=16):
    space = store.space(FP_A, dim=dim)
    keys, X = make_keys(40), make_vectors(40, dim)
    space.add(keys[:20], X[:20])
    space.add(keys[20:], X[20:])
    return space, keys, X


def test_verify_passes_on_a_healthy_store(store):
    _two_shards(store)
    rep = store.verify()
    assert rep.ok and (rep.n_spaces, rep.n_shards, rep.n_vectors, rep.n_rows) == (1, 2, 40, 40)


def test_truncated_shard_is_reported_refused_on_read_and_quarantined(store):
    space, keys, X = _two_shards(store)
    broken = space.shards()[1]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    fresh = open_store(store.root).space(FP_A)
    with pytest.raises(StoreError, match="truncated or corrupt.*store verify .* --quarantine"):
        fresh.get(keys)
    rep = store.verify()
    assert not rep.ok and len(rep.problems) == 1 and broken.name in rep.problems[0]
    rep = store.verify(quarantine=True)
    assert rep.quarantined == [str(store.root / "quarantine" / FP_A / broken.name)]
    assert store.verify().ok
    Y, found = fresh.get(keys)  # the rows of the broken shard are simply missing now: embed again
    np.testing.assert_array_equal(found, [True] * 20 + [False] * 20)
    np.testing.assert_array_equal(Y[:20], X[:20])
    fresh.store.close()


def test_flipped_vector_byte_fails_the_checksum(store):
    space, keys, _ = _two_shards(store)
    shard = space.shards()[0]
    data = bytearray(shard.read_bytes())
    # flip a byte inside the vector buffer: find the float bytes of the first stored vector
    first = make_vectors(40, 16)[0].tobytes()
    at = bytes(data).index(first)
    data[at + 5] ^= 0x40
    shard.write_bytes(bytes(data))
    rep = store.verify()
    assert any("checksum mismatch" in p and shard.name in p for p in rep.problems), rep.problems


def test_nan_vector_written_behind_our_back_is_found(store):
    space, _, _ = _two_shards(store)
    shard = space.shards()[0]
    data = bytearray(shard.read_bytes())
    at = bytes(data).index(make_vectors(40, 16)[3].tobytes())
    data[at : at + 4] = np.array([np.nan], np.float32).tobytes()
    shard.write_bytes(bytes(data))
    problems = store.verify().problems
    assert any("1 vectors contain NaN or inf" in p for p in problems), problems


def test_shard_of_the_wrong_dim_is_refused(store):
    a = store.space(FP_A, dim=4)
    b = store.space(FP_B, dim=8)
    b.add(make_keys(2), make_vectors(2, 8))
    b.shards()[0].rename(a.shard_dir / b.shards()[0].name)
    problems = store.verify().problems
    assert len(problems) == 1 and "does not match the space" in problems[0]


# ----------------------------------------------------------------------------- CLI
def test_cli_info_verify_failures_compact_export(store, tmp_path, capsys):
    space, keys, X = _two_shards(store, dim=8)
    store.record_failures(FP_A, [{"path": tmp_path / "bad.jpg", "reason": "cannot identify image file"}])
    root = str(store.root)

    assert main(["store", "info", root]) == 0
    out = capsys.readouterr().out
    assert FP_A in out and "dim 8 float32, 40 vectors in 2 shards" in out
    assert main(["store", "info", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spaces"][0]["n_vectors"] == 40

    assert main(["store", "verify", root]) == 0
    assert capsys.readouterr().out.startswith("OK: 1 spaces, 2 shards, 40 vectors")

    assert main(["store", "failures", root]) == 0
    out = capsys.readouterr().out
    assert "bad.jpg" in out and "cannot identify image file" in out and "1 failures" in out
    assert main(["store", "failures", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["reason"] == "cannot identify image file"

    assert main(["store", "compact", root]) == 0
    assert "2 -> 1 shards" in capsys.readouterr().out

    out_file = tmp_path / "out.parquet"
    assert main(["store", "export", root, "--space", FP_A, "-o", str(out_file)]) == 0
    assert "wrote 40 vectors (dim 8)" in capsys.readouterr().out
    assert pq.read_table(out_file).num_rows == 40
    assert main(["store", "export", root, "--space", FP_A, "-o", str(tmp_path / "npy"), "--format", "npy"]) == 0
    capsys.readouterr()
    assert np.load(tmp_path / "npy" / "vectors.npy").shape == (40, 8)


def test_cli_verify_exits_1_on_problems_and_errors_are_one_line(store, tmp_path, capsys):
    space, _, _ = _two_shards(store)
    space.shards()[0].write_bytes(b"garbage")
    assert main(["store", "verify", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("PROBLEMS") and "--quarantine" in out

    assert main(["store", "info", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["store", "export", str(store.root), "--space", FP_B, "-o", str(tmp_path / "x.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_export_by_model_finds_the_space(store, tmp_path, capsys):
    """--model resolves the space through the model card and artifact.space_fingerprint."""
    import onnx
    from onnx import TensorProto, helper

    from featurebank.artifact import Preprocessing, space_fingerprint, write_model_card

    pre = Preprocessing(input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    card = _tiny_card(pre)
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["embedding"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 3])])
    model = write_model_card(helper.make_model(graph), card)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))

    fp = space_fingerprint(card.output().fingerprint, "exact")
    sp = store.space(fp, dim=3)
    sp.add(make_keys(4), make_vectors(4, 3))
    root = str(store.root)
    assert main(["store", "export", root, "--model", str(path), "-o", str(tmp_path / "m.parquet")]) == 0
    assert "wrote 4 vectors (dim 3)" in capsys.readouterr().out
    assert main(["store", "export", root, "--model", str(path), "--decode-mode", "fast",
                 "-o", str(tmp_path / "f.parquet")]) == 2
    assert "holds no vectors of" in capsys.readouterr().err


def _tiny_card(pre):
    from featurebank.artifact import ModelCard, OutputSpec

    out = OutputSpec.make(name="embedding", layer="stem", pooling="avg", normalize=False, dim=3,
                          backbone="tiny", weights_sha256="ab" * 32, weights_source="test",
                          preprocessing=pre, precision="fp32")
    return ModelCard(backbone="tiny", weights_source="test", weights_sha256="ab" * 32, weights_license="MIT",
                     outputs=(out,), preprocessing=pre, input_name="x")
