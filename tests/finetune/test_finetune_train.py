"""train_top on cached activations of timm's tiny EfficientNet over real texture crops."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from featurebank.classifiers.probe import LinearProbe
from featurebank.errors import FineTuneError, TrainingDivergedError
from featurebank.finetune.head import fit_probe_head
from featurebank.finetune.model import split_backbone
from featurebank.finetune.train import train_top


@pytest.fixture()
def cached(tiny_backbone, texture_crops):
    """(A_train, y_train, A_val, y_val, make): activations of blocks.3 (the input of blocks.4),
    and make() -> a fresh (top, head) with the same starting weights each call."""
    X, y = texture_crops
    bottom, _ = split_backbone(tiny_backbone, "blocks.4")
    with torch.no_grad():
        A = bottom(torch.from_numpy(X)).numpy()
    val = np.arange(len(y)) % 4 == 0
    start = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}

    def make():
        tiny_backbone.load_state_dict(start)
        _, top = split_backbone(tiny_backbone, "blocks.4")
        torch.manual_seed(1)
        return top, torch.nn.Linear(256, 3)

    return A[~val], y[~val], A[val], y[val], make


def _weights(top, head) -> dict[str, torch.Tensor]:
    return {**{f"top.{k}": v.clone() for k, v in top.state_dict().items()},
            **{f"head.{k}": v.clone() for k, v in head.state_dict().items()}}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert unequal == []


KW = dict(epochs=4, lr_head=3e-3, batch_size=6, seed=3, patience=None, progress=False)


def test_resuming_from_epoch_two_ends_with_the_weights_of_a_straight_run(cached, tmp_path):
    A, y, Av, yv, make = cached
    top, head = make()
    straight = train_top(A, y, top, head, val=(Av, yv), checkpoint_dir=tmp_path / "a", keep_last=4, **KW)
    want = _weights(top, head)
    assert [r["epoch"] for r in straight.history] == [0, 1, 2, 3, 4]
    assert straight.stopped == "completed"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        f"epoch-{e:04d}.{ext}" for e in range(1, 5) for ext in ("json", "safetensors")]
    # a run killed after epoch 2: its folder holds epochs 1 and 2 only
    (tmp_path / "b").mkdir()
    for e in (1, 2):
        for ext in ("json", "safetensors"):
            shutil.copy(tmp_path / "a" / f"epoch-{e:04d}.{ext}", tmp_path / "b")
    top2, head2 = make()
    resumed = train_top(A, y, top2, head2, val=(Av, yv), checkpoint_dir=tmp_path / "b", keep_last=4, **KW)
    assert resumed.resumed_from == 2
    _assert_equal(_weights(top2, head2), want)
    assert [r["val_accuracy"] for r in resumed.history] == [r["val_accuracy"] for r in straight.history]
    assert (resumed.best_epoch, resumed.stopped) == (straight.best_epoch, "completed")
    # a finished folder: calling again trains nothing and returns the same weights
    top3, head3 = make()
    again = train_top(A, y, top3, head3, val=(Av, yv), checkpoint_dir=tmp_path / "b", keep_last=4, **KW)
    assert again.resumed_from == 4
    _assert_equal(_weights(top3, head3), want)


def test_same_seed_same_weights_and_the_loss_falls(cached):
    A, y, _, _, make = cached
    top, head = make()
    r1 = train_top(A, y, top, head, **KW)
    w1 = _weights(top, head)
    top, head = make()
    train_top(A, y, top, head, **KW)
    _assert_equal(_weights(top, head), w1)
    losses = [r["train_loss"] for r in r1.history]
    assert losses[-1] < losses[0]
    assert r1.best_epoch == 4 and r1.best_val_accuracy is None  # no validation: the last epoch
    top, head = make()
    train_top(A, y, top, head, **{**KW, "seed": 4})
    assert not torch.equal(_weights(top, head)["head.weight"], w1["head.weight"])


def test_train_bn_decides_whether_running_statistics_move(cached):
    A, y, _, _, make = cached
    for train_bn in (False, True):
        top, head = make()
        before = top.state_dict()["2.running_mean"].clone()  # top = blocks.4.0, conv_head, bn2, global_pool
        train_top(A, y, top, head, train_bn=train_bn, **{**KW, "epochs": 1})
        after = top.state_dict()["2.running_mean"]
        assert torch.equal(before, after) is (not train_bn)


def test_early_stopping_keeps_the_best_epochs_weights(cached):
    A, y, Av, yv, make = cached
    top, _ = make()
    with torch.no_grad():
        head, _ = fit_probe_head(top.eval()(torch.from_numpy(A)).numpy(), y, probe=LinearProbe(cv=2))
    start = _weights(top, head)
    r = train_top(A, y, top, head, val=(Av, yv), **{**KW, "epochs": 12, "lr_head": 0.01, "patience": 2})
    accs = [h["val_accuracy"] for h in r.history]
    assert r.best_epoch == int(np.argmax(accs)) and r.best_val_accuracy == max(accs)
    assert r.stopped == "early_stopping" and len(accs) - 1 == r.best_epoch + 2  # two epochs without progress
    with torch.no_grad():
        acc = (head(top.eval()(torch.from_numpy(Av))).argmax(1).numpy() == yv).mean()
    assert acc == r.best_val_accuracy
    # on 18 images fine-tuning does not beat the probe's head here (4/6 -> 3/6): epoch 0 comes back
    assert accs == [4 / 6, 3 / 6, 3 / 6] and r.best_epoch == 0
    _assert_equal(_weights(top, head), start)
    # patience running out on the last epoch is not an early stop
    one = train_top(A, y, top, head, val=(Av, yv), **{**KW, "epochs": 1, "lr_head": 0.01, "patience": 1})
    assert [h["val_accuracy"] for h in one.history] == [4 / 6, 3 / 6] and one.stopped == "completed"


def test_a_diverging_learning_rate_stops_with_a_clear_error(cached, tmp_path):
    A, y, _, _, make = cached
    top, head = make()
    start = _weights(top, head)
    with pytest.raises(TrainingDivergedError, match=r"training diverged: the loss became (nan|inf) at epoch 1, step "
                       r"\d+ \(lr_head=1e\+30, lr_backbone=1e\+29\): the learning rate is too high; lower it"):
        train_top(A, y, top, head, checkpoint_dir=tmp_path, **{**KW, "lr_head": 1e30})
    _assert_equal(_weights(top, head), start)  # put back to the last good weights
    assert not list(tmp_path.glob("epoch-*"))


def test_divergence_after_good_epochs_keeps_their_checkpoints(cached, tmp_path):
    # a warm-up over all epochs raises the learning rate step by step: the first epochs stay
    # finite, a later one overflows (with these seeds: epoch 3)
    A, y, _, _, make = cached
    top, head = make()
    with pytest.raises(TrainingDivergedError) as info:
        train_top(A, y, top, head, checkpoint_dir=tmp_path, keep_last=4,
                  **{**KW, "lr_head": 1e4, "warmup_epochs": 4})
    message = str(info.value)
    epoch = int(re.search(r"at epoch (\d+), step", message).group(1))
    assert epoch >= 2
    assert message.endswith(f"the last good checkpoint (epoch {epoch - 1}) is kept in {tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"epoch-{e:04d}.{ext}" for e in range(1, epoch) for ext in ("json", "safetensors")]
    last_good = load_file(tmp_path / f"epoch-{epoch - 1:04d}.safetensors")
    _assert_equal(_weights(top, head), {k[6:]: v for k, v in last_good.items() if k.startswith("model.")})


def test_a_folder_of_another_recipe_is_refused(cached, tmp_path):
    A, y, _, _, make = cached
    top, head = make()
    train_top(A, y, top, head, checkpoint_dir=tmp_path, **{**KW, "epochs": 1})
    meta = json.loads((tmp_path / "epoch-0001.json").read_text())
    assert meta["epoch"] == 1 and meta["recipe"]["lr_backbone"] == 3e-3 / 10 and meta["stopped"] == "completed"
    top, head = make()
    with pytest.raises(FineTuneError, match=r"holds checkpoints of another run \(different epochs, lr_backbone, "
                       r"lr_head\); pass a new checkpoint folder"):
        train_top(A, y, top, head, checkpoint_dir=tmp_path, **{**KW, "epochs": 2, "lr_head": 1e-2})
    with pytest.raises(FineTuneError, match=r"different train_labels_sha256"):
        train_top(A, y[::-1].copy(), top, head, checkpoint_dir=tmp_path, **{**KW, "epochs": 1})


def test_bad_arguments_are_refused(cached):
    A, y, _, _, make = cached
    top, head = make()
    with pytest.raises(FineTuneError, match=r"labels of activations must be integer class indices in 0..2 \(the head "
                       r"has 3 outputs\); got dtype int64, range 0..3"):
        train_top(A, np.where(y == 2, 3, y), top, head, **KW)
    with pytest.raises(FineTuneError, match=r"activations must be float32 or float16; got float64"):
        train_top(A.astype(np.float64), y, top, head, **KW)
    with pytest.raises(FineTuneError, match=r"one label per sample \(18\); got shape \(17,\)"):
        train_top(A, y[:17], top, head, **KW)
    with pytest.raises(FineTuneError, match=r"lr_head must be a positive number; got -1"):
        train_top(A, y, top, head, **{**KW, "lr_head": -1})
    with pytest.raises(FineTuneError, match=r"val activations have shape \(48, 2, 2\) per sample, the training ones "
                       r"\(48, 4, 4\)"):
        train_top(A, y, top, head, val=(A[:, :, :2, :2].copy(), y), **KW)


def test_float16_activations_train(cached):
    A, y, _, _, make = cached
    top, head = make()
    r = train_top(A.astype(np.float16), y, top, head, **{**KW, "epochs": 1})
    assert np.isfinite(r.history[-1]["train_loss"])


def test_a_tie_in_validation_accuracy_goes_to_the_lower_validation_loss(cached):
    """Accuracy saturates on easy data while the model keeps getting better calibrated: the best
    epoch is the most accurate one, and among equally accurate ones the lowest validation loss."""
    A, y, _, _, make = cached
    top, _ = make()
    with torch.no_grad():
        head, _ = fit_probe_head(top.eval()(torch.from_numpy(A)).numpy(), y, probe=LinearProbe(cv=2))
    r = train_top(A, y, top, head, val=(A, y), **{**KW, "epochs": 4, "lr_head": 0.01, "patience": 4})
    key = [(h["val_accuracy"], -h["val_loss"]) for h in r.history]
    assert r.best_epoch == max(range(len(key)), key=key.__getitem__)
    ties = [e for e, h in enumerate(r.history) if h["val_accuracy"] == r.best_val_accuracy]
    assert len(ties) > 1 and r.best_epoch > 0  # the tie the rule is for
    assert r.history[r.best_epoch]["val_loss"] == min(r.history[e]["val_loss"] for e in ties)


def test_label_smoothing_and_dropout_change_training_not_evaluation(cached):
    from featurebank.finetune.train import batch_loss

    A, y, _, _, make = cached
    top, head = make()
    a, t = torch.from_numpy(A[:6]), torch.from_numpy(y[:6].astype(np.int64))
    top.eval(), head.eval()
    with torch.no_grad():
        plain, logits = batch_loss(top, head, a, t)
        smooth, _ = batch_loss(top, head, a, t, label_smoothing=0.1)
        dropped_eval, same = batch_loss(top, head, a, t, drop_rate=0.5)
        # smoothing: (1 - e) * CE + e * mean over classes of -log p
        logp = torch.log_softmax(logits, 1)
        expected = 0.9 * plain + 0.1 * (-logp.mean(1)).mean()
        assert torch.allclose(smooth, expected, atol=1e-6)
        assert torch.equal(dropped_eval, plain) and torch.equal(same, logits)  # dropout is off in eval mode
        head.train()
        torch.manual_seed(0)
        _, dropped = batch_loss(top, head, a, t, drop_rate=0.5)
    assert not torch.equal(dropped, logits)
    r1 = train_top(A, y, *make(), **{**KW, "epochs": 1})
    r2 = train_top(A, y, *make(), **{**KW, "epochs": 1, "label_smoothing": 0.1, "drop_rate": 0.2})
    assert r1.history[-1]["train_loss"] != r2.history[-1]["train_loss"]
    for name in ("label_smoothing", "drop_rate"):
        with pytest.raises(FineTuneError, match=rf"{name} must be a number in \[0, 1\); got 1"):
            train_top(A, y, *make(), **{**KW, name: 1})
