"""featurebank.finetune.curve: one training run per draw, on activations computed once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from featurebank.errors import FineTuneError, UnknownLayerError
from featurebank.finetune.curve import VAL_MIN_SHOTS, _fixed_c_head, curve_network, finetune_point

TEXTURES = ("grass", "gravel", "brick")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """16 seeded 96x96 JPEG crops of each of three real texture photos: (paths, y)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data

    root = tmp_path_factory.mktemp("curve-crops")
    rng = np.random.default_rng(0)
    paths, y = [], []
    for label, name in enumerate(TEXTURES):
        img = getattr(data, name)()
        for i in range(16):
            r, c = rng.integers(0, img.shape[0] - 96), rng.integers(0, img.shape[1] - 96)
            p = root / f"{name}{i:02d}.jpg"
            Image.fromarray(img[r : r + 96, c : c + 96]).convert("RGB").save(p, quality=90)
            paths.append(str(p))
            y.append(label)
    return paths, np.asarray(y, np.int64)


@pytest.fixture(scope="module")
def pretrained(crops):
    net = curve_network("test_efficientnet", weights="random", seed=0)
    return net, net.activations(crops[0])


def _rows(y, per_class, offset=0):
    return np.concatenate([np.flatnonzero(y == c)[offset : offset + per_class] for c in np.unique(y)])


def test_network_is_cut_at_the_last_stage_and_scratch_trains_every_layer(crops, pretrained):
    net, A = pretrained
    assert (net.unfreeze, net.scratch, net.weights_source) == ("blocks.4", False, "random:seed=0")
    assert A.dtype == np.float32 and A.shape[0] == 48 and A.ndim == 4
    scratch = curve_network("test_efficientnet", scratch=True, seed=3)
    assert (scratch.unfreeze, scratch.weights_source) == ("conv_stem", "random:seed=3")
    P = scratch.activations(crops[0][:2])
    # nothing is frozen: the 'activations' are the preprocessed pixels, in float16
    from featurebank.decoding import decode_image, to_model_input

    want = to_model_input(np.stack([decode_image(p, scratch.preprocessing, mode="fast") for p in crops[0][:2]]),
                          scratch.preprocessing, "float")
    assert P.dtype == np.float16 and P.shape == want.shape
    np.testing.assert_allclose(P.astype(np.float32), want, atol=2e-3)
    with pytest.raises(FineTuneError, match="a network from random weights trains every layer"):
        curve_network("test_efficientnet", scratch=True, unfreeze="blocks.4")
    with pytest.raises(UnknownLayerError, match="cannot unfreeze from 'blocks.9'"):
        curve_network("test_efficientnet", weights="random", unfreeze="blocks.9")


def test_a_point_trains_a_copy_and_holds_out_a_fifth_from_ten_per_class(crops, pretrained):
    net, A = pretrained
    y = crops[1]
    start = {k: v.clone() for k, v in net.top.state_dict().items()}
    tr, te = _rows(y, VAL_MIN_SHOTS), _rows(y, 6, offset=VAL_MIN_SHOTS)
    p = finetune_point(net, A[tr], y[tr], A[te], y[te], epochs=2, seed=0)
    # 20% of 30, stratified: two of each class choose the epoch, 24 train
    assert len(p.val_index) == 6 and len(p.train_index) == 24
    assert sorted(p.train_index + p.val_index) == list(range(30))
    assert np.bincount(y[tr][p.val_index]).tolist() == [2, 2, 2]
    # patience 3 cannot stop a 2-epoch run: both epochs run; the best is one of the start and the two epochs
    assert p.head_init == "linear probe (LP-FT)" and p.epochs_run == 2 and p.best_epoch in (0, 1, 2)
    assert abs(p.accuracy * 18 - round(p.accuracy * 18)) < 1e-9 and p.accuracy > 1 / 3
    # the network's own top keeps its starting weights: every point starts from the same place
    assert all(torch.equal(v, start[k]) for k, v in net.top.state_dict().items())
    again = finetune_point(net, A[tr], y[tr], A[te], y[te], epochs=2, seed=0)
    assert (again.accuracy, again.start_accuracy, again.best_epoch) == (p.accuracy, p.start_accuracy, p.best_epoch)


def test_below_ten_per_class_every_epoch_trains_on_the_whole_draw(crops, pretrained):
    net, A = pretrained
    y = crops[1]
    tr, te = _rows(y, 2), _rows(y, 6, offset=10)
    p = finetune_point(net, A[tr], y[tr], A[te], y[te], epochs=3, seed=0)
    assert p.val_index == [] and p.train_index == list(range(6))
    assert (p.best_epoch, p.epochs_run) == (3, 3) and p.head_init == "linear probe (LP-FT)"


def test_a_scratch_point_holds_out_nothing_keeps_its_last_epoch_and_trains_batch_norm(crops):
    scratch = curve_network("test_efficientnet", scratch=True, seed=3)
    y = crops[1]
    tr, te = _rows(y, VAL_MIN_SHOTS), _rows(y, 6, offset=VAL_MIN_SHOTS)
    P = scratch.activations([crops[0][i] for i in np.concatenate([tr, te])])
    bn = next(m for m in scratch.top.modules() if isinstance(m, torch.nn.BatchNorm2d))
    p = finetune_point(scratch, P[: len(tr)], y[tr], P[len(tr):], y[te], epochs=2, seed=0)
    # epoch 0 would be a probe on random features: no hold-out, every epoch, the last one kept
    assert p.val_index == [] and p.train_index == list(range(30))
    assert (p.best_epoch, p.epochs_run, p.head_init) == (2, 2, "random")
    # a copy trained (its batch norm in train mode): the network's own statistics are still the initial ones
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_one_image_per_class_starts_from_a_fixed_c_logistic_regression(crops, pretrained):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featurebank.finetune.job import _pooled

    net, A = pretrained
    y = crops[1]
    tr, te = _rows(y, 1), _rows(y, 6, offset=10)
    features = _pooled(net.top, A[tr])
    head = _fixed_c_head(features, y[tr])
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(features.astype(np.float64), y[tr])
    test_features = _pooled(net.top, A[te])
    with torch.no_grad():
        logits = head(torch.from_numpy(test_features)).numpy()
    np.testing.assert_allclose(logits - logits.mean(1, keepdims=True),
                               ref.decision_function(test_features.astype(np.float64)), rtol=1e-3, atol=1e-3)
    p = finetune_point(net, A[tr], y[tr], A[te], y[te], epochs=2, seed=0)
    assert p.head_init == "logistic regression, C=1" and p.train_index == [0, 1, 2]
    assert p.start_accuracy == pytest.approx(np.mean(ref.predict(test_features.astype(np.float64)) == y[te]))
    # two classes: sklearn's single logit becomes two outputs whose difference it is
    two = _rows(y, 1)[:2]
    head2 = _fixed_c_head(features[:2], y[two])
    ref2 = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(features[:2].astype(np.float64), y[two])
    with torch.no_grad():
        z = head2(torch.from_numpy(test_features)).numpy()
    np.testing.assert_allclose(z[:, 1] - z[:, 0], ref2.decision_function(test_features.astype(np.float64)), rtol=1e-3,
                               atol=1e-3)


def test_a_point_refuses_labels_that_miss_a_class(crops, pretrained):
    net, A = pretrained
    y = crops[1]
    tr = _rows(y, 2)
    with pytest.raises(FineTuneError, match=r"needs every class 0..n_classes-1 in y_train; got counts \[2, 0, 4\]"):
        finetune_point(net, A[tr], np.array([0, 0, 2, 2, 2, 2]), A[tr], y[tr])
