"""``finetune``: labelled images in, one fine-tuned ONNX model (embeds and classifies) out.

The steps, each a function of this room or upstream: list the labelled images, split them
(seeded, stratified) unless a validation source is given, build the backbone, cut it where
training starts (:func:`~featurebank.finetune.model.split_backbone`), run the frozen bottom once
over every image (its activations are kept in memory, or, with ``store=DIR``, exported as an
ONNX model with no pooling and cached in the store's activation space, so a re-run or a new
image costs only what is new: :func:`bottom_layer`), fit a linear probe on the pooled
features and start the head from it (LP-FT), train the top and head
(:func:`~featurebank.finetune.train.train_top`, per-epoch checkpoints, resumable), export one
ONNX graph (:func:`~featurebank.export.finetuned.export_finetuned`) and plot the curves.

>>> r = finetune("photos/", out="model.onnx")          # doctest: +SKIP
>>> r.probe_cv_accuracy, r.val_accuracy, r.beat_probe  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from featurebank.errors import FineTuneError

__all__ = ["FinetuneResult", "finetune", "default_unfreeze", "bottom_layer", "UNFREEZE_MORE_AT"]

#: Regularisation defaults of :func:`finetune` (timm's training recipe for EfficientNet-Lite).
LABEL_SMOOTHING = 0.1
DROP_RATE = 0.2

DECODE_MODE = "fast"  # as the embedder decodes by default
_BATCH = 32


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    probe_cv_accuracy : the linear probe's cross-validated accuracy on the training split
        (mean over its folds at the chosen C), before fine-tuning.
    probe_val_accuracy : the probe's accuracy on the validation split.
    val_accuracy : the fine-tuned model's accuracy on the validation split (its best epoch).
    beat_probe : ``val_accuracy > probe_val_accuracy``; when False, prefer the probe.
    history : per-epoch figures (:attr:`TrainResult.history <featurebank.finetune.train.TrainResult>`).
    best_epoch : the epoch whose weights the model holds (0: the probe-initialised start).
    model_path, curves_path, checkpoint_dir : what was written.
    classes : class names, in the order of the model's outputs.
    val_paths, val_predictions : the validation images and the fine-tuned model's labels for them.
    embedded, cached : with a store, the images (times views, with ``augment``) whose frozen activations were computed in this
        run and those read from the store (None without a store).
    """

    probe_cv_accuracy: float
    probe_val_accuracy: float
    val_accuracy: float
    beat_probe: bool
    history: list[dict[str, Any]]
    best_epoch: int
    model_path: Path
    curves_path: Path
    checkpoint_dir: Path
    classes: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    val_predictions: list[str] = field(default_factory=list)
    embedded: int | None = None
    cached: int | None = None


#: Labelled training images from which the default unfreeze point moves down one stage, then two
#: (:func:`default_unfreeze`).
UNFREEZE_MORE_AT = (2_000, 5_000)


def default_unfreeze(model: torch.nn.Module, n_train: int | None = None) -> str:
    """The default first layer that trains: the last stage of the network (``"blocks.6"`` for
    efficientnet_lite0) and, the more labelled images there are, more of the network (the more
    data, the more layers it can adapt without overfitting; fastai's ``fine_tune`` and Keras's
    guide tune the whole network, which a cached bottom rules out here): from
    ``UNFREEZE_MORE_AT[0]`` training images the second-last stage, from ``UNFREEZE_MORE_AT[1]``
    the third-last (``"blocks.4"``). ``n_train`` None: the last stage."""
    from featurebank.finetune.model import list_cut_points

    stages = [c for c in list_cut_points(model) if c.startswith("blocks.") and c.count(".") == 1]
    down = 0 if n_train is None else sum(n_train >= t for t in UNFREEZE_MORE_AT)
    return stages[max(0, len(stages) - 1 - down)]


def bottom_layer(model: torch.nn.Module, unfreeze: str) -> str:
    """The export room's name of the layer whose output feeds ``unfreeze`` (the frozen
    bottom's output): ``blocks.6`` -> ``blocks.5.3`` (the last block of the stage before, for
    efficientnet_lite0), ``blocks.5.2`` -> ``blocks.5.1``, ``blocks.0`` -> ``bn1`` (the stem's
    output, after its batch norm and activation), ``conv_head`` -> the last block.

    Raises UnknownLayerError (as :func:`split_backbone`) for a name that is not a cut point,
    FineTuneError for ``conv_stem`` (nothing is frozen, so nothing to cache).
    """
    from featurebank.finetune.model import _cut_index, _sequence, split_backbone

    split_backbone(model, unfreeze)  # the one check of the name (UnknownLayerError listing the valid ones)
    seq = _sequence(model)
    k = _cut_index(seq)[unfreeze]
    if k == 0:
        raise FineTuneError(f"--unfreeze {unfreeze} trains the whole network: nothing is frozen, so there is nothing "
                            "to cache in a store; drop --store or unfreeze from a later layer")
    return seq[k - 1][0]


def _store_activations(spec, loaded, weights, unfreeze: str, seed: int, store, parts, progress: bool,
                       augment: tuple[Sequence[str], dict, int] | None = None):
    """Export the frozen bottom (cut at :func:`bottom_layer`, no pooling, uint8 input) through
    the model cache, embed each (paths, labels) part into the store's activation space and read
    the maps back; with ``augment`` = (content keys of the first part, recipe, views), also
    the augmented views of the first part (:func:`_store_views`). Returns ([A (N, C, H, W) per
    part], embedded, cached, [A per augmented view]); embedded and cached count images x views."""
    from featurebank.artifact import read_model_card
    from featurebank.embed_into_store import load_activations
    from featurebank.embedder.session import open_model
    from featurebank.embedder.sources import ImageList
    from featurebank.export.cache import cached_export
    from featurebank.export.layers import list_layers
    from featurebank.store import open_store

    layer = bottom_layer(loaded.model, unfreeze)
    if layer not in {i.name for i in list_layers(spec, loaded.model)}:
        raise FineTuneError(f"cannot cache the frozen layers below {unfreeze}: the export cannot cut {spec.name} at "
                            f"{layer}; drop --store or choose another --unfreeze")
    # the seed makes the weights only of a random-weight network: pretrained ones share one export whatever the seed
    random_weights = loaded.weights_source.startswith("random:")
    path = cached_export(spec.name, layers=[layer], pool="none", weights=weights, input_format="uint8",
                         seed=seed if random_weights else None)
    card = read_model_card(path)
    if card.weights_sha256 != loaded.weights_sha256:  # e.g. weights changed on disk since the export was cached
        raise FineTuneError(f"the cached export {path} holds other weights than the network being fine-tuned; "
                            "delete it and run again")
    runner = open_model(path, device="cpu")
    st = open_store(store)
    out, embedded, cached = [], 0, 0
    for paths, labels in parts:
        A, _, _, got, report = load_activations(ImageList(list(paths), list(labels)), runner, st,
                                                decode_mode=DECODE_MODE, progress=progress)
        if report.failures:
            p, why = report.failures[0]
            raise FineTuneError(f"{report.failed} image(s) could not be read (e.g. {p}: {why}); remove or fix them")
        if got != list(paths):
            missing = sorted(set(paths) - set(got))
            raise FineTuneError(f"{len(missing)} image(s) have no cached activations (e.g. {missing[0]}); "
                                "run again, or check `featurebank store failures`")
        out.append(A)
        embedded += report.embedded
        cached += report.cached
    views: list[np.ndarray] = []
    if augment is not None:
        keys, rec, n_views = augment
        views, computed, hit = _store_views(runner, st, parts[0][0], keys, rec, n_views, progress)
        embedded += computed
        cached += hit
    return out, embedded, cached, views


def _labelled(source: Any, what: str) -> tuple[list[str], list[str]]:
    from featurebank.embedder.sources import list_images

    images = list_images(source)
    unlabelled = [p for p, lab in zip(images.paths, images.labels) if lab is None]
    if unlabelled:
        raise FineTuneError(
            f"{what} has {len(unlabelled)} image(s) without a label (e.g. {unlabelled[0]}); fine-tuning needs "
            "labels: put each class in its own subfolder, or give a .csv/.parquet list with a label column"
        )
    return images.paths, [str(lab) for lab in images.labels]


def _check_counts(labels: Sequence[str], what: str, minimum: int, fix: str) -> None:
    names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    classes = [str(c) for c in names]
    if len(classes) < 2:
        raise FineTuneError(f"{what} holds a single class ({classes[0]!r}); fine-tuning needs at least two: "
                            "put each class in its own subfolder")
    few = [f"{c!r} ({n})" for c, n in zip(classes, counts) if n < minimum]
    if few:
        raise FineTuneError(f"{what}: classes {', '.join(few)} have fewer than {minimum} images; {fix}")


def _content_keys(paths: Sequence[str]) -> list[str]:
    """The store's key (sha256 of the bytes) of each file."""
    from featurebank.store.hashing import hash_one

    keys = []
    for path in paths:
        key, _, error = hash_one(path)
        if error is not None:
            raise FineTuneError(f"cannot read {path}: {error}")
        keys.append(key)
    return keys


def _fingerprint(keys: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 over the sorted (content key, label) pairs."""
    rows = [f"{key}\t{label}\n" for key, label in zip(keys, labels)]
    return hashlib.sha256("".join(sorted(rows)).encode()).hexdigest()


def _bottom_activations(bottom: torch.nn.Module, paths: Sequence[str], pre, progress: bool,
                        keep_pixels: int = 0, view: tuple[Sequence[str], int, dict] | None = None,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(activations (N, C, h, w) float32, the first ``keep_pixels`` decoded images (uint8 NHWC)).

    view : (content keys of ``paths``, view index >= 1, augmentation recipe): the activations
        of that augmented view of each image instead of the plain image."""
    from tqdm.auto import tqdm

    from featurebank.decoding import to_model_input

    out, kept = [], []
    decode = _decoder(pre, view)
    bottom.eval()
    desc = "frozen layers" if view is None else f"frozen layers, view {view[1]}"
    with torch.no_grad(), tqdm(total=len(paths), unit="img", desc=desc, disable=not progress,
                               leave=False) as bar:
        for s in range(0, len(paths), _BATCH):
            batch = np.stack([decode(i, paths[i]) for i in range(s, min(s + _BATCH, len(paths)))])
            if len(kept) < keep_pixels:
                kept.extend(batch[: keep_pixels - len(kept)])
            x = torch.from_numpy(to_model_input(batch, pre, "float"))
            out.append(bottom(x).numpy())
            bar.update(len(batch))
    c, h, w = pre.input_size
    return np.concatenate(out), (np.stack(kept) if kept else np.zeros((0, h, w, c), np.uint8))


def _decoder(pre, view: tuple[Sequence[str], int, dict] | None):
    """``(i, path) -> uint8 pixels``: the plain decode, or view ``view[1]`` of image ``i``."""
    from featurebank.decoding import decode_image

    if view is None:
        return lambda i, path: decode_image(path, pre, mode=DECODE_MODE)
    from featurebank.finetune.augment import augmented_view

    keys, index, rec = view
    return lambda i, path: augmented_view(path, pre, keys[i], index, rec, mode=DECODE_MODE)


def _store_views(runner, st, paths: Sequence[str], keys: Sequence[str], rec: dict, n_views: int,
                 progress: bool) -> tuple[list[np.ndarray], int, int]:
    """The augmented views 1..n_views of ``paths`` through the exported bottom ``runner``, each
    cached in a store space of its own (the plain space's output and decode mode plus the
    recipe and view index in its fingerprint and info). Returns ([A (N, C, H, W) per view],
    computed, cached) counted in images x views."""
    from tqdm.auto import tqdm

    from featurebank.artifact import space_fingerprint
    from featurebank.embedder.batches import infer_batch

    card = runner.card
    o = card.outputs[0]
    out, computed, cached = [], 0, 0
    for v in range(1, n_views + 1):
        view = {"augment": rec, "view": v}
        sp = st.space(space_fingerprint(o.fingerprint, DECODE_MODE, view=view), dim=o.dim,
                      info={"model_card_fingerprint": card.fingerprint, "output": o.to_dict(),
                            "backbone": card.backbone, "decode_mode": DECODE_MODE,
                            "preprocessing": card.preprocessing.to_dict(), **view})
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = list(first)
        todo = [k for k, have in zip(unique, sp.contains(unique)) if not have]
        decode = _decoder(card.preprocessing, (keys, v, rec))
        with tqdm(total=len(todo), unit="img", desc=f"frozen layers, view {v}", disable=not progress or not todo,
                  leave=False) as bar:
            for s in range(0, len(todo), _BATCH):
                chunk = todo[s : s + _BATCH]
                pixels = np.stack([decode(first[k], paths[first[k]]) for k in chunk])
                sp.add(chunk, infer_batch(runner, pixels)[o.name])
                bar.update(len(chunk))
        computed += len(todo)
        cached += len(unique) - len(todo)
        rows, found = sp.get(list(keys))
        if not found.all():  # pragma: no cover - another process removed rows between add and get
            raise FineTuneError(f"{int((~found).sum())} image(s) lost their view {v} activations while reading; run again")
        out.append(rows.reshape((len(rows), *o.shape)))
    return out, computed, cached


def _pooled(top: torch.nn.Module, A: np.ndarray) -> np.ndarray:
    top.eval()
    with torch.no_grad():
        return np.concatenate([top(torch.from_numpy(A[s : s + _BATCH])).numpy() for s in range(0, len(A), _BATCH)])


def finetune(
    sources: Any,
    *,
    out: str | os.PathLike[str],
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike[str] | None = None,
    unfreeze: str | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    val_split: float = 0.2,
    val: Any = None,
    seed: int = 0,
    train_bn: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    store: Any = None,
    augment: str = "none",
    views: int | None = None,
    label_smoothing: float = LABEL_SMOOTHING,
    drop_rate: float = DROP_RATE,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the top of ``backbone`` on labelled images and write one ONNX model.

    Parameters
    ----------
    sources : labelled images: folder(s) of class subfolders, or .csv/.parquet lists with labels
    out : the ONNX file to write (outputs features, probabilities, label); the learning curves
        go next to it (``<out stem>.curves.png``)
    backbone, weights : registry name and weights source (None: the registry's; a path,
        ``"hub"`` or ``"random"``)
    unfreeze : the first layer that trains (see ``list_cut_points``); default by the number of
        training images (:func:`default_unfreeze`: the last stage, more with thousands of images)
    epochs : the most epochs (early stopping on validation accuracy, patience 3)
    lr : learning rate of the head; the unfrozen layers train at ``lr / 10``
    val_split : fraction of ``sources`` held out (seeded, stratified) when ``val`` is None
    val : labelled validation images (same classes); then all of ``sources`` trains
    seed : seeds the split, the shuffles and the export's parity inputs
    train_bn : batch norm of the unfrozen layers in train mode (fastai) rather than inference
        mode (Keras's guide, the default)
    checkpoint_dir : per-epoch checkpoints (default ``<out>.ckpt``); a second call with the same
        folder, data and settings resumes (or, finished, trains nothing)
    store : a store directory: the frozen bottom is exported as ONNX (no pooling, through the
        model cache) and each image's activation map is cached in the store's activation space
        of its own, so a re-run or a new image computes only what is new; None (the default)
        computes them with torch in memory, each run
    augment : ``"none"`` or ``"light"`` (:mod:`featurebank.finetune.augment`): each training
        image also gets ``views`` augmented views, each run once through the frozen bottom (and
        cached in a store space of its own with ``store``); each epoch trains every image on one
        of its views (the plain one included) drawn at random
    views : augmented views per training image (default
        :data:`~featurebank.finetune.augment.DEFAULT_VIEWS`; only with ``augment``)
    label_smoothing, drop_rate : label smoothing of the loss and dropout on the pooled features
        before the head (timm's training recipe for EfficientNet-Lite: 0.1 and 0.2)
    log : called with a line of news as the run goes (the cache's work, the probe's accuracy
        before training starts); None: silent
    progress : progress bars on stderr

    Raises FineTuneError (one class, classes with too few images, images without labels, a
    validation set with other classes; with ``store``, ``unfreeze="conv_stem"`` (nothing frozen
    to cache) or images whose activations cannot be computed), UnknownLayerError (``unfreeze`` not a cut point; the
    message lists the valid ones), TrainingDivergedError (NaN loss; the last good checkpoint is
    kept). Nothing is written at ``out`` unless the whole run succeeds.
    """
    from featurebank.export.finetuned import export_finetuned
    from featurebank.export.registry import get_backbone
    from featurebank.export.weights import build_backbone, state_dict_sha256
    from featurebank.finetune.head import fit_probe_head
    from featurebank.finetune.model import FineTunedNet, split_backbone
    from featurebank.finetune.report import plot_curves
    from featurebank.finetune.train import train_top

    from featurebank.export.onnx_export import _check_output_path

    from featurebank.finetune.augment import DEFAULT_VIEWS, recipe

    out = _check_output_path(out)  # before hours of training: the export's own rule for its output path
    rec = recipe(augment)
    if rec is None and views is not None:
        raise FineTuneError(f"views={views} needs an augmentation: pass augment='light' (--augment light) or drop views")
    n_views = 0 if rec is None else (DEFAULT_VIEWS if views is None else views)
    if rec is not None and (isinstance(n_views, bool) or not isinstance(n_views, int) or not 1 <= n_views <= 64):
        raise FineTuneError(f"views must be an integer from 1 to 64; got {views!r}")
    if val is None and not (isinstance(val_split, (int, float)) and 0 < val_split < 1):
        raise FineTuneError(f"val_split must be between 0 and 1 (exclusive); got {val_split!r}")

    paths, labels = _labelled(sources, "the training source")
    if val is None:
        _check_counts(labels, "the training source", 2, "each class needs at least two images (one to train, "
                      "one to validate); add images or drop the class")
        from sklearn.model_selection import train_test_split

        try:
            tr_paths, va_paths, tr_labels, va_labels = train_test_split(
                paths, labels, test_size=val_split, random_state=seed, stratify=labels)
        except ValueError as exc:  # the split is too small to hold every class on both sides
            raise FineTuneError(f"cannot split {len(paths)} images with val_split={val_split}: {exc}; "
                                "change --val-split or pass --val") from None
        fix = "add images, raise the share that trains (--val-split), or pass a validation source with --val"
    else:
        tr_paths, tr_labels = paths, labels
        va_paths, va_labels = _labelled(val, "the validation source")
        fix = "each class needs two images to fit the probe; add images"
    _check_counts(tr_labels, "the training split", 2, fix)
    classes = sorted(set(tr_labels))
    if set(va_labels) - set(classes):
        raise FineTuneError(f"the validation images have classes the training images lack: "
                            f"{sorted(set(va_labels) - set(classes))}")
    index = {c: i for i, c in enumerate(classes)}
    y_tr = np.asarray([index[c] for c in tr_labels], np.int64)
    y_va = np.asarray([index[c] for c in va_labels], np.int64)

    spec = get_backbone(backbone)
    loaded = build_backbone(spec, weights, seed=seed)
    model = loaded.model
    unfreeze = default_unfreeze(model, len(tr_paths)) if unfreeze is None else unfreeze
    bottom, top = split_backbone(model, unfreeze)
    pre = spec.preprocessing

    tr_keys, va_keys = _content_keys(tr_paths), _content_keys(va_paths)
    train_fp, val_fp = _fingerprint(tr_keys, tr_labels), _fingerprint(va_keys, va_labels)
    embedded = cached = None
    if store is None:
        A_tr, _ = _bottom_activations(bottom, tr_paths, pre, progress)
        A_va, verify_pixels = _bottom_activations(bottom, va_paths, pre, progress, keep_pixels=4)
        A_views = [_bottom_activations(bottom, tr_paths, pre, progress, view=(tr_keys, v, rec))[0]
                   for v in range(1, n_views + 1)]
    else:
        from featurebank.decoding import decode_image

        (A_tr, A_va), embedded, cached, A_views = _store_activations(
            spec, loaded, weights, unfreeze, seed, store, [(tr_paths, tr_labels), (va_paths, va_labels)], progress,
            augment=(tr_keys, rec, n_views) if rec is not None else None)
        verify_pixels = np.stack([decode_image(p, pre, mode=DECODE_MODE) for p in va_paths[:4]])
    head, probe = fit_probe_head(_pooled(top, A_tr), y_tr)
    j = int(np.flatnonzero(probe.Cs_ == probe.C_)[0])
    probe_cv_accuracy = float(np.mean(probe.cv_scores_[:, j]))
    probe_val_accuracy = float(np.mean(probe.predict(_pooled(top, A_va).astype(np.float32)) == y_va))
    if log is not None:
        if embedded is not None:
            log(f"frozen layers: {embedded} images embedded, {cached} from the store {store}"
                + (f" (counting each of the {n_views} augmented views)" if n_views else ""))
        log(f"linear probe: cross-validated accuracy {probe_cv_accuracy:.4f}, validation accuracy "
            f"{probe_val_accuracy:.4f}; fine-tuning from {unfreeze} (up to {epochs} epochs)")

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".ckpt")
    lr_backbone = lr / 10
    trained = train_top([A_tr, *A_views] if A_views else A_tr, y_tr, top, head, epochs=epochs, lr_head=lr, lr_backbone=lr_backbone, seed=seed,
                        val=(A_va, y_va), train_bn=train_bn, checkpoint_dir=ckpt, progress=progress,
                        label_smoothing=label_smoothing, drop_rate=drop_rate,
                        run_info={"train": train_fp, "val": val_fp, "augment": rec, "unfreeze": unfreeze,
                                  "backbone": spec.name, "weights_sha256": loaded.weights_sha256})

    net = FineTunedNet(bottom, top, head).eval()
    with torch.no_grad():
        logits = torch.cat([head(top(torch.from_numpy(A_va[s : s + _BATCH]))) for s in range(0, len(A_va), _BATCH)])
    predicted = logits.argmax(1).numpy()
    val_accuracy = float(np.mean(predicted == y_va))

    provenance = {
        "parent_backbone": spec.name,
        "parent_weights_sha256": loaded.weights_sha256,
        "parent_weights_source": loaded.weights_source,
        "finetuned_weights_sha256": state_dict_sha256(net.state_dict()),
        "recipe": {"unfreeze": unfreeze, "epochs": epochs, "lr_head": lr, "lr_backbone": lr_backbone,
                   "seed": seed, "train_bn": bool(train_bn), "val_split": None if val is not None else val_split,
                   "decode_mode": DECODE_MODE, "init": "linear probe (LP-FT)", "augment": rec, "views": n_views,
                   "label_smoothing": float(label_smoothing), "drop_rate": float(drop_rate),
                   "best_epoch": trained.best_epoch, "stopped": trained.stopped},
        "data_fingerprint": {"train": train_fp, "val": val_fp,
                             "n_train": len(tr_paths), "n_val": len(va_paths)},
        "validation": {"accuracy": val_accuracy, "probe_accuracy": probe_val_accuracy,
                       "probe_cv_accuracy": probe_cv_accuracy},
    }
    export_finetuned(net, out, classes=classes, card=provenance, preprocessing=pre, weights_license=spec.license,
                     verify_pixels=verify_pixels, seed=seed)
    curves = plot_curves(trained.history, out.with_name(out.stem + ".curves.png"),
                         title=f"{spec.name} from {unfreeze}")
    return FinetuneResult(
        probe_cv_accuracy=probe_cv_accuracy, probe_val_accuracy=probe_val_accuracy, val_accuracy=val_accuracy,
        beat_probe=val_accuracy > probe_val_accuracy, history=trained.history, best_epoch=trained.best_epoch,
        model_path=out, curves_path=curves, checkpoint_dir=ckpt, classes=classes, val_paths=list(va_paths),
        val_predictions=[classes[i] for i in predicted], embedded=embedded, cached=cached,
    )
