"""Training the top of a network and its head on cached activations.

The bottom of the network is frozen, so its output for an image never changes: the caller
computes it once (the store caches it) and :func:`train_top` trains only ``top`` (the layers
from the cut point to the pooling) and ``head`` on those arrays. An epoch costs the top alone.

The recipe: AdamW with two learning rates (``lr_backbone`` for the top, lower than ``lr_head``),
weight decay on weights but not on biases and norms, linear warm-up then cosine decay per step,
early stopping on validation accuracy (ties broken by the lower validation loss) keeping the
best weights (the starting weights, epoch 0,
count: if training never beats the LP-initialised head, that head is what comes back).

Checkpoints (``checkpoint_dir``): after each epoch ``epoch-NNNN.safetensors`` (weights, best
weights, optimizer tensors, torch RNG state) then ``epoch-NNNN.json`` (recipe, epoch, step,
history, early-stopping state), each written atomically; the JSON is written last, so a
checkpoint exists once its JSON does. No pickle anywhere. Calling :func:`train_top` again with
the same folder and recipe continues after the last completed epoch and ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from featurebank._atomic import remove_stale_temps, write_bytes_atomic
from featurebank.errors import FineTuneError, TrainingDivergedError

__all__ = ["TrainResult", "batch_loss", "set_train_modes", "train_top"]

CHECKPOINT_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^epoch-(\d{4,})\.json$")


@dataclass
class TrainResult:
    """What :func:`train_top` did.

    history : one dict per epoch: ``epoch`` (0 = the starting weights, evaluated only),
        ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy`` (None without
        validation), ``lr_head`` (at the epoch's last step), ``seconds``, ``images_per_s``.
    best_epoch : the epoch whose weights ``top`` and ``head`` now hold.
    best_val_accuracy : its validation accuracy (None without validation).
    stopped : ``"completed"`` (all epochs ran) or ``"early_stopping"``.
    resumed_from : the epoch a checkpoint was resumed from (0: a fresh start).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    stopped: str = "completed"
    resumed_from: int = 0


def batch_loss(top: nn.Module, head: nn.Module, activations: torch.Tensor, y: torch.Tensor, *,
               label_smoothing: float = 0.0, drop_rate: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``head(top(activations))`` against ``y``: (loss, logits).

    activations : (N, C, H, W) float32; y : (N,) int64 class indices. One training step of
    :func:`train_top` is this loss, backward, optimizer step. ``drop_rate``: dropout on the
    pooled features before the head (timm's ``drop_rate``), applied when ``head`` is in train
    mode; ``label_smoothing``: as :func:`torch.nn.functional.cross_entropy`'s.
    """
    features = top(activations)
    if drop_rate > 0:
        features = nn.functional.dropout(features, drop_rate, training=head.training)
    logits = head(features)
    return nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing), logits


# -- argument checks ---------------------------------------------------------------------------


def _check_arrays(name: str, A: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(A, np.ndarray) or A.ndim != 4:
        raise FineTuneError(f"{name} must be an ndarray of shape (n_samples, C, H, W); got "
                            f"{getattr(A, 'shape', type(A).__name__)}")
    if A.dtype not in (np.float32, np.float16):
        raise FineTuneError(f"{name} must be float32 or float16; got {A.dtype}")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(A):
        raise FineTuneError(f"the labels of {name} must be 1-d with one label per sample ({len(A)}); got shape {y.shape}")
    if len(y) == 0:
        raise FineTuneError(f"{name} holds no samples")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes:
        raise FineTuneError(f"the labels of {name} must be integer class indices in 0..{n_classes - 1} (the head has "
                            f"{n_classes} outputs); got dtype {y.dtype}, range {y.min()}..{y.max()}")
    return A, y.astype(np.int64)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise FineTuneError(f"{name} must be a positive number; got {value!r}")


# -- schedule, optimizer -----------------------------------------------------------------------


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(top: nn.Module, head: nn.Module, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict]:
    groups = []
    for module, lr in ((top, lr_backbone), (head, lr_head)):
        params = [p for p in module.parameters() if p.requires_grad]
        # as timm's param_groups_weight_decay: no decay on biases and norm scales (1-d tensors)
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"params": decay, "weight_decay": weight_decay, "base_lr": lr})
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": lr})
    return groups


def set_train_modes(top: nn.Module, head: nn.Module, train_bn: bool) -> None:
    """Put ``top`` and ``head`` in train mode, except the top's batch-norm layers when
    ``train_bn`` is False (they then use, and keep, their running statistics)."""
    top.train()
    head.train()
    if not train_bn:  # Keras's guide: batch norm in inference mode (running statistics, not updated)
        for m in top.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# -- state <-> files ---------------------------------------------------------------------------


def _model_state(top: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"top.{k}": v for k, v in top.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _load_model_state(top: nn.Module, head: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    want = set(_model_state(top, head))
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise FineTuneError(f"{origin} holds weights of another network (missing {missing}, unexpected {extra}); "
                            "use a new checkpoint folder for this network")
    top.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("top.")})
    head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _labels_sha256(A: np.ndarray, y: np.ndarray) -> str:
    # the labels and the array's shape and dtype: hashing the activations themselves would read
    # them all; which images and which bottom they come from is the store space's fingerprint
    h = hashlib.sha256(repr((A.shape, str(A.dtype))).encode())
    h.update(y.tobytes())
    return h.hexdigest()


def _latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    found = [(int(m.group(1)), folder / m.group(0)) for m in map(_CHECKPOINT_RE.match, os.listdir(folder)) if m]
    return max(found) if found else None


def _write_checkpoint(folder: Path, epoch: int, tensors: dict[str, torch.Tensor], meta: dict, keep_last: int) -> None:
    weights = folder / f"epoch-{epoch:04d}.safetensors"
    write_bytes_atomic(weights, save_safetensors(tensors))
    meta = {**meta, "weights_file": weights.name}
    write_bytes_atomic(folder / f"epoch-{epoch:04d}.json", json.dumps(meta, indent=1, sort_keys=True).encode())
    for old in range(epoch - keep_last, 0, -1):  # the marker first, then the weights it names
        marker = folder / f"epoch-{old:04d}.json"
        if not marker.exists() and not (folder / f"epoch-{old:04d}.safetensors").exists():
            break
        marker.unlink(missing_ok=True)
        (folder / f"epoch-{old:04d}.safetensors").unlink(missing_ok=True)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{idx}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _gather(views: list[np.ndarray], idx: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
    """Rows ``idx`` of the training activations, each from its view ``pick[i]`` (view 0 without views)."""
    if pick is None:
        return np.ascontiguousarray(views[0][idx])
    out = np.empty((len(idx), *views[0].shape[1:]), views[0].dtype)
    for j, i in enumerate(idx):
        out[j] = views[pick[i]][i]
    return out


def _evaluate(top: nn.Module, head: nn.Module, A: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    top.eval()
    head.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(A), batch_size):
            a = torch.from_numpy(np.ascontiguousarray(A[s : s + batch_size])).float()
            t = torch.from_numpy(y[s : s + batch_size])
            logits = head(top(a))
            loss_sum += float(nn.functional.cross_entropy(logits, t, reduction="sum"))
            correct += int((logits.argmax(1) == t).sum())
    return loss_sum / len(A), correct / len(A)


# -- the loop ----------------------------------------------------------------------------------


def train_top(
    activations: np.ndarray,
    y: np.ndarray,
    top: nn.Module,
    head: nn.Linear,
    *,
    epochs: int = 10,
    lr_head: float = 1e-3,
    lr_backbone: float | None = None,
    weight_decay: float = 0.01,
    batch_size: int = 32,
    seed: int = 0,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    train_bn: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    patience: int | None = 3,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    drop_rate: float = 0.0,
    keep_last: int = 2,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``top`` and ``head`` in place on cached activations; they end with the best weights.

    Parameters
    ----------
    activations : ndarray of shape (n_samples, C, H, W), float32 or float16
        The frozen bottom's output for each training image (a memmap works); or a list of
        such arrays of one shape, the **views** of each image (view 0 the plain image, the
        others augmented: :mod:`featurebank.finetune.augment`): each epoch, each image trains
        on one of its views drawn at random (seeded by ``seed`` and the epoch).
    y : ndarray of shape (n_samples,), integer class indices 0..head.out_features-1.
    top, head : the trainable part (from :func:`~featurebank.finetune.model.split_backbone`) and
        the linear head (from :func:`~featurebank.finetune.head.fit_probe_head`).
    epochs : the most epochs to run; the cosine schedule spans all of them.
    lr_head, lr_backbone : AdamW learning rates of the head and of the top (default lr_head / 10).
    weight_decay : AdamW's decoupled weight decay, on weights (not on biases and norms).
    batch_size, seed : the seed fixes the initial RNG and each epoch's shuffle.
    val : (activations, labels) of the validation split; early stopping and the choice of the
        best epoch use its accuracy. None: no early stopping, the last epoch's weights are kept.
    train_bn : batch-norm layers of the top in train mode (batch statistics, running statistics
        updated: fastai) or, False, in eval mode (Keras's guide). Their scale and shift train
        either way.
    checkpoint_dir : a folder for per-epoch checkpoints; if it holds one of the same recipe,
        training continues after it. None: no checkpoints.
    patience : stop after this many epochs without a better validation accuracy (None: never).
    warmup_epochs : linear warm-up length, in epochs (fractions allowed).
    label_smoothing, drop_rate : regularisation of the training loss (:func:`batch_loss`).
    keep_last : how many epoch checkpoints to keep.
    run_info : JSON-able facts that identify the run beyond these arguments (the data's content
        fingerprint, the augmentation recipe): recorded in the checkpoints, and a checkpoint
        whose facts differ is not resumed.
    progress : show a tqdm bar (epoch, loss, validation accuracy, images/s) on stderr.

    Raises FineTuneError on bad arguments or a checkpoint of another recipe, network or data;
    TrainingDivergedError when the loss becomes NaN or infinite (``top``/``head`` are put back to
    the last completed epoch, whose checkpoint stays on disk).
    """
    if not isinstance(head, nn.Linear):
        raise FineTuneError(f"head must be a torch.nn.Linear; got {type(head).__name__}")
    n_classes = head.out_features
    views = list(activations) if isinstance(activations, (list, tuple)) else [activations]
    if not views:
        raise FineTuneError("activations is an empty list; give one array, or one per view")
    A, y = _check_arrays("activations", views[0], y, n_classes)
    for v, Av in enumerate(views[1:], start=1):
        if getattr(Av, "shape", None) != A.shape or Av.dtype != A.dtype:
            raise FineTuneError(f"view {v} has activations of shape {getattr(Av, 'shape', None)} "
                                f"{getattr(Av, 'dtype', type(Av).__name__)}, view 0 {A.shape} {A.dtype}: every view "
                                "must hold the same images from the same bottom")
    lr_backbone = lr_head / 10 if lr_backbone is None else lr_backbone
    _check_positive(lr_head=lr_head, lr_backbone=lr_backbone)
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("keep_last", keep_last, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FineTuneError(f"{name} must be an integer >= {low}; got {value!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise FineTuneError(f"patience must be an integer >= 1 or None; got {patience!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise FineTuneError(f"weight_decay must be >= 0; got {weight_decay!r}")
    if not (isinstance(warmup_epochs, (int, float)) and 0 <= warmup_epochs <= epochs):
        raise FineTuneError(f"warmup_epochs must be between 0 and epochs ({epochs}); got {warmup_epochs!r}")
    for name, value in (("label_smoothing", label_smoothing), ("drop_rate", drop_rate)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise FineTuneError(f"{name} must be a number in [0, 1); got {value!r}")
    if val is not None:
        A_val, y_val = _check_arrays("val activations", val[0], val[1], n_classes)
        if A_val.shape[1:] != A.shape[1:]:
            raise FineTuneError(f"val activations have shape {A_val.shape[1:]} per sample, the training ones "
                                f"{A.shape[1:]}: they must come from the same bottom")

    n = len(A)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total_steps)
    recipe = {
        "epochs": epochs, "lr_head": float(lr_head), "lr_backbone": float(lr_backbone),
        "weight_decay": float(weight_decay), "batch_size": batch_size, "seed": seed, "train_bn": bool(train_bn),
        "patience": patience, "warmup_epochs": float(warmup_epochs),
        "label_smoothing": float(label_smoothing), "drop_rate": float(drop_rate),
        "train_labels_sha256": _labels_sha256(A, y), "views": len(views),
        "val_labels_sha256": _labels_sha256(A_val, y_val) if val is not None else None,
        "start_weights_sha256": _state_sha256(_model_state(top, head)),
        "run_info": json.loads(json.dumps(dict(run_info or {}), sort_keys=True)),
    }

    opt = torch.optim.AdamW(_param_groups(top, head, lr_backbone, lr_head, weight_decay), lr=lr_head)
    result = TrainResult()
    best_state = _model_state(top, head)
    epochs_since_best = 0
    start_epoch, step = 0, 0
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    torch.manual_seed(seed)

    latest = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        latest = _latest_checkpoint(folder)
    if latest is not None:
        epoch_done, marker = latest
        meta = json.loads(marker.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise FineTuneError(f"{marker} has checkpoint format {meta.get('format')!r}, not {CHECKPOINT_FORMAT}")
        if meta["recipe"] != recipe:
            diff = sorted(k for k in recipe if meta["recipe"].get(k) != recipe[k])
            raise FineTuneError(f"{folder} holds checkpoints of another run (different {', '.join(diff)}); "
                                "pass a new checkpoint folder, or the same settings and data to resume")
        tensors = load_safetensors((folder / meta["weights_file"]).read_bytes())
        _load_model_state(top, head, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(marker))
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        _load_optimizer(opt, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        start_epoch, step = epoch_done, meta["step"]
        result.history = meta["history"]
        result.best_epoch, result.best_val_accuracy = meta["best_epoch"], meta["best_val_accuracy"]
        epochs_since_best, result.resumed_from = meta["epochs_since_best"], epoch_done
        if meta["stopped"] is not None:
            result.stopped = meta["stopped"]
            _load_model_state(top, head, best_state, str(marker))
            return result
    elif val is not None:  # epoch 0: the starting (LP-initialised) weights are a candidate too
        val_loss, val_acc = _evaluate(top, head, A_val, y_val, batch_size)
        result.history.append({"epoch": 0, "train_loss": None, "train_accuracy": None, "val_loss": val_loss,
                               "val_accuracy": val_acc, "lr_head": 0.0, "seconds": 0.0, "images_per_s": None})
        result.best_epoch, result.best_val_accuracy = 0, val_acc

    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * n, initial=start_epoch * n, unit="img", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        with _deterministic():
            for epoch in range(start_epoch + 1, epochs + 1):
                good_state = _model_state(top, head)
                bar.set_description(f"epoch {epoch}/{epochs}")
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()
                # which view of each image this epoch (a generator of its own: one view draws nothing)
                pick = (np.random.default_rng([seed, epoch]).integers(0, len(views), n) if len(views) > 1 else None)
                set_train_modes(top, head, train_bn)
                t0 = time.perf_counter()
                loss_sum, correct = 0.0, 0
                for s in range(0, n, batch_size):
                    idx = order[s : s + batch_size]
                    a = torch.from_numpy(_gather(views, idx, pick)).float()
                    t = torch.from_numpy(y[idx])
                    factor = _lr_factor(step, total_steps, warmup)
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * factor
                    loss, logits = batch_loss(top, head, a, t, label_smoothing=label_smoothing, drop_rate=drop_rate)
                    if not torch.isfinite(loss):
                        _load_model_state(top, head, good_state, "the last completed epoch")
                        kept = (f"; the last good checkpoint (epoch {epoch - 1}) is kept in {folder}"
                                if folder is not None and epoch > 1 else "")
                        raise TrainingDivergedError(
                            f"training diverged: the loss became {loss.item()} at epoch {epoch}, step {step + 1} "
                            f"(lr_head={lr_head:g}, lr_backbone={lr_backbone:g}): the learning rate is too high; "
                            f"lower it (e.g. 10x) and start again in a new checkpoint folder{kept}"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    loss_sum += loss.item() * len(idx)
                    correct += int((logits.argmax(1) == t).sum())
                    bar.update(len(idx))
                    last_val = result.history[-1]["val_accuracy"] if result.history else None
                    bar.set_postfix(loss=f"{loss_sum / (s + len(idx)):.4f}", val_acc=_fmt(last_val), refresh=False)
                seconds = time.perf_counter() - t0
                record = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": correct / n,
                          "val_loss": None, "val_accuracy": None, "lr_head": opt.param_groups[-1]["lr"],
                          "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None}
                stop = None
                if val is not None:
                    record["val_loss"], record["val_accuracy"] = _evaluate(top, head, A_val, y_val, batch_size)
                    # accuracy first; a tie goes to the lower validation loss (accuracy saturates
                    # on easy data while the model still gets better calibrated)
                    best = result.history[result.best_epoch] if result.best_val_accuracy is not None else None
                    if best is None or (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"],
                                                                                      -best["val_loss"]):
                        result.best_epoch, result.best_val_accuracy = epoch, record["val_accuracy"]
                        best_state, epochs_since_best = _model_state(top, head), 0
                    else:
                        epochs_since_best += 1
                        if patience is not None and epochs_since_best >= patience:
                            stop = "early_stopping"
                else:
                    result.best_epoch, best_state = epoch, _model_state(top, head)
                if epoch == epochs:  # ran every epoch: not an early stop, even if patience ran out too
                    stop = "completed"
                result.history.append(record)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_acc=_fmt(record["val_accuracy"]),
                                img_s=f"{record['images_per_s'] or 0:.0f}")
                if folder is not None:
                    tensors = {f"model.{k}": v for k, v in _model_state(top, head).items()}
                    tensors.update({f"best.{k}": v for k, v in best_state.items()})
                    tensors.update(_optimizer_tensors(opt))
                    tensors["rng.torch"] = torch.get_rng_state()
                    meta = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "recipe": recipe,
                            "history": result.history, "best_epoch": result.best_epoch,
                            "best_val_accuracy": result.best_val_accuracy, "epochs_since_best": epochs_since_best,
                            "stopped": stop}
                    _write_checkpoint(folder, epoch, tensors, meta, keep_last)
                if stop is not None:
                    result.stopped = stop
                    break
    finally:
        bar.close()
    _load_model_state(top, head, best_state, "the best epoch")
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
