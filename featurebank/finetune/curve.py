"""Fine-tuning curves: one training run per (labels per class, draw), on fixed images.

The few-shot study (:func:`~featurebank.studies.fewshot_study`) draws ``k`` images per class
many times from one training pool and scores every model on one fixed test split. A
fine-tuned point is a whole training run, so the work that does not depend on the draw is
done once: :func:`curve_network` builds the network and cuts it where training starts, and
:meth:`CurveNetwork.activations` runs the frozen bottom once over every image any draw uses
and over the test split. :func:`finetune_point` then trains a copy of the top on one draw's
rows of those arrays (the recipe of :func:`~featurebank.finetune.job.finetune`) and scores it
on the test rows.

Two networks make two curves: the pretrained one (``scratch=False``: the registry's weights,
trained from ``unfreeze``, the last stage by default) and the same architecture from seeded
random weights (``scratch=True``), which trains every layer (``unfreeze="conv_stem"``: its
"activations" are the preprocessed pixels, kept in float16 to halve their memory) with the
same recipe, except batch norm: in train mode for the random network (it has no statistics to
keep: in inference mode its batch norm would divide by its initial running variance, 1, and
never normalise), in inference mode for the pretrained one, as the job's default; and, for
the random network, a seeded random head and no early stopping: a probe on random features is
neither a start for a network whose every layer trains nor a trained network (early stopping
kept that probe on Fashion-MNIST, 0.66 at 100 labels per class, and with the probe's head the
first epochs' loss was in the tens).

>>> net = curve_network("efficientnet_lite0")                 # doctest: +SKIP
>>> A, A_test = net.activations(paths), net.activations(test_paths)  # doctest: +SKIP
>>> finetune_point(net, A[:10], y[:10], A_test, y_test).accuracy     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from featurebank.errors import FineTuneError
from featurebank.finetune.job import DECODE_MODE

__all__ = ["CurveNetwork", "PointResult", "curve_network", "finetune_point", "DECODE_MODE", "LR_HEAD", "VAL_FRACTION",
           "VAL_MIN_SHOTS"]

#: From this many images per class on, 20% of a draw (stratified, seeded) is held out to
#: choose the best epoch (early stopping, patience 3). Below it a held-out part would be one
#: image per class, whose accuracy moves in steps of 1/n_classes: too coarse to choose an
#: epoch, and a fifth of very few labels lost to training. Those runs train every epoch on
#: the whole draw and keep the last weights.
VAL_MIN_SHOTS = 10
VAL_FRACTION = 0.2
LR_HEAD = 1e-3  # the job's default; the layers below the head train at a tenth of it
_CHUNK = 256  # images per call of the bottom: bounds the float32 transient of the pixel arrays


@dataclass
class CurveNetwork:
    """A network cut for fine-tuning curves: ``bottom`` frozen, ``top`` the layers that train
    (every point trains a deep copy; this one keeps its starting weights)."""

    backbone: str
    weights_source: str
    unfreeze: str
    scratch: bool
    bottom: nn.Module
    top: nn.Module
    preprocessing: Any

    def activations(self, paths: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """The frozen bottom's output for each image: ndarray (n_images, C, H, W), float32
        (float16 for a from-scratch network, whose 'activations' are the preprocessed pixels).
        Images are decoded as the fine-tuning job decodes them (:data:`DECODE_MODE`)."""
        from featurebank.finetune.job import _bottom_activations

        dtype = np.float16 if self.scratch else np.float32
        paths = list(paths)
        parts = [_bottom_activations(self.bottom, paths[s : s + _CHUNK], self.preprocessing, progress)[0].astype(dtype)
                 for s in range(0, len(paths), _CHUNK)]
        if not parts:
            raise FineTuneError("no images to compute activations for")
        return np.concatenate(parts)


def curve_network(backbone: str = "efficientnet_lite0", *, weights: str | os.PathLike[str] | None = None,
                  unfreeze: str | None = None, scratch: bool = False, seed: int = 0) -> CurveNetwork:
    """Build ``backbone`` and cut it where training starts.

    weights : the registry's by default (None), a path, ``"hub"`` or ``"random"``; ignored
        with ``scratch=True`` (seeded random weights, ``seed``).
    unfreeze : the first layer that trains (default: the last stage,
        :func:`~featurebank.finetune.job.default_unfreeze`); ``scratch=True`` always trains every
        layer (``"conv_stem"``) and refuses another value.
    """
    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone
    from featurebank.finetune.job import default_unfreeze
    from featurebank.finetune.model import split_backbone

    spec = get_backbone(backbone)
    if scratch and unfreeze not in (None, "conv_stem"):
        raise FineTuneError(f"a network from random weights trains every layer (unfreeze='conv_stem'); "
                            f"got unfreeze={unfreeze!r}")
    loaded = build_backbone(spec, "random" if scratch else weights, seed=seed)
    unfreeze = "conv_stem" if scratch else (default_unfreeze(loaded.model) if unfreeze is None else unfreeze)
    bottom, top = split_backbone(loaded.model, unfreeze)
    return CurveNetwork(backbone=spec.name, weights_source=loaded.weights_source, unfreeze=unfreeze, scratch=scratch,
                        bottom=bottom, top=top, preprocessing=spec.preprocessing)


@dataclass
class PointResult:
    """One training run.

    accuracy : the trained network's accuracy on the test rows
    start_accuracy : the starting head's (before any training step) on the test rows
    head_init : how the head started: ``"linear probe (LP-FT)"``, or with one image per class
        (no held-out data to choose C) ``"logistic regression, C=1"``
    train_index, val_index : positions (into the rows given) that trained / chose the epoch
    best_epoch, epochs_run : the epoch whose weights were scored; epochs trained
    seconds : wall time of the run (head fit, training, scoring)
    """

    accuracy: float
    start_accuracy: float
    head_init: str
    train_index: list[int]
    val_index: list[int]
    best_epoch: int
    epochs_run: int
    seconds: float


def _fixed_c_head(features: np.ndarray, y: np.ndarray) -> nn.Linear:
    """A linear head from a logistic regression with C fixed at 1 on standardised features,
    folded like :func:`~featurebank.finetune.head.probe_to_linear`: with one image per class
    there is nothing to choose C on, so the probe cannot be fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, np.float64)
    scaler = StandardScaler().fit(X)
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(X), y)
    W, b = lr.coef_, lr.intercept_
    if W.shape[0] == 1:  # two classes: sklearn's one logit is the second class's minus the first's
        W, b = np.vstack([np.zeros_like(W), W]), np.concatenate([[0.0], b])
    W_folded = W / scaler.scale_
    b_folded = b - W_folded @ scaler.mean_
    head = nn.Linear(X.shape[1], W.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W_folded.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(b_folded.astype(np.float32)))
    return head


def _split_val(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    n_classes = len(np.unique(y))
    n_val = max(n_classes, int(round(VAL_FRACTION * len(y))))
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=y)
    return np.sort(tr), np.sort(va)


def finetune_point(net: CurveNetwork, A_train: np.ndarray, y_train: np.ndarray, A_test: np.ndarray,
                   y_test: np.ndarray, *, epochs: int = 10, lr: float = LR_HEAD, seed: int = 0) -> PointResult:
    """Train a copy of ``net.top`` and a head on one draw and score it on the test rows.

    A_train : (n, C, H, W) the draw's activations (from :meth:`CurveNetwork.activations`);
        y_train : (n,) int class indices 0..n_classes-1, every class present
    A_test, y_test : the fixed test split, the same for every point
    epochs, lr : the job's recipe: at most ``epochs`` epochs, AdamW at ``lr`` for the head and
        ``lr / 10`` for the top, warm-up then cosine decay, batch norm in inference mode

    The head starts from a linear probe on the draw's pooled features (LP-FT); with one image
    per class, from a logistic regression with C fixed at 1; for a from-scratch network, from
    seeded random weights. With :data:`VAL_MIN_SHOTS` or
    more images per class, 20% of the draw is held out (stratified, seeded) to choose the best
    epoch; otherwise, and always for a from-scratch network (whose epoch 0, a probe on random
    features, is not a trained network), every epoch trains on the whole draw and the last one
    is scored.
    """
    from featurebank.finetune.head import fit_probe_head
    from featurebank.finetune.job import _pooled
    from featurebank.finetune.train import _evaluate, train_top

    t0 = time.perf_counter()
    y_train = np.asarray(y_train, np.int64)
    y_test = np.asarray(y_test, np.int64)
    counts = np.bincount(y_train)
    if len(counts) < 2 or counts.min() < 1:
        raise FineTuneError(f"a training run needs every class 0..n_classes-1 in y_train; got counts {counts.tolist()}")
    if y_test.max() >= len(counts):
        raise FineTuneError(f"y_test has class {int(y_test.max())}, which y_train lacks")
    if counts.min() >= VAL_MIN_SHOTS and not net.scratch:
        tr, va = _split_val(y_train, seed)
    else:
        tr, va = np.arange(len(y_train)), np.zeros(0, np.int64)
    top = copy.deepcopy(net.top)
    features = _pooled(top, np.ascontiguousarray(A_train[tr], np.float32))
    if net.scratch:  # every layer trains: a probe on random features is no start for it
        torch.manual_seed(seed)
        head = nn.Linear(features.shape[1], len(counts))
        head_init = "random"
    elif np.bincount(y_train[tr]).min() >= 2:
        from featurebank.classifiers.probe import LinearProbe

        head, _ = fit_probe_head(features, y_train[tr], probe=LinearProbe(cv=min(5, int(np.bincount(y_train[tr]).min())),
                                                                          random_state=seed))
        head_init = "linear probe (LP-FT)"
    else:
        head = _fixed_c_head(features, y_train[tr])
        head_init = "logistic regression, C=1"
    _, start_accuracy = _evaluate(top, head, A_test, y_test, 32)
    val = (A_train[va], y_train[va]) if len(va) else None
    from featurebank.finetune.job import DROP_RATE, LABEL_SMOOTHING

    trained = train_top(A_train[tr], y_train[tr], top, head, epochs=epochs, lr_head=lr, lr_backbone=lr / 10, seed=seed,
                        val=val, train_bn=net.scratch, progress=False, label_smoothing=LABEL_SMOOTHING,
                        drop_rate=DROP_RATE)
    _, accuracy = _evaluate(top, head, A_test, y_test, 32)
    return PointResult(accuracy=float(accuracy), start_accuracy=float(start_accuracy), head_init=head_init,
                       train_index=tr.tolist(), val_index=va.tolist(), best_epoch=int(trained.best_epoch),
                       epochs_run=int(max(h["epoch"] for h in trained.history)), seconds=time.perf_counter() - t0)
