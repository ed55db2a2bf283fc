"""One-call workflows that join the embedder, the store and the classifiers.

``train_classifier`` / ``evaluate_on_images`` / ``predict_images`` take image SOURCES and a
model: images not embedded yet are embedded into the store first, then the classical model
works on the cached vectors. A saved classifier records the vector space it was trained in
(model output fingerprint + decode mode) and refuses vectors from any other.

This module sits downstream of embedder/, store/ and classifiers/ (the CLI and the service
call it); it holds no image or model logic of its own.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from featurebank.artifact import DEFAULT_DECODE_MODE, read_model_card
from featurebank.artifact import resolve_space as _resolve
from featurebank.classifiers import evaluate_classifier, load_classifier, make_classifier, save_classifier
from featurebank.embed_into_store import embed_images, load_embeddings, space_of
from featurebank.embedder.devices import DEFAULT_DEVICE
from featurebank.embedder.session import ModelRunner, open_model
from featurebank.errors import ImageSourceError, ModelCardError

__all__ = ["train_classifier", "evaluate_on_images", "predict_images", "labelled_vectors", "resolve_space",
           "search_images", "ModelClassifier"]


class ModelClassifier:
    """The classifying end of a model with its own ``probabilities`` output (a fused or a
    fine-tuned model, whose card lists ``classes``): the graph's nodes from the embedding
    output it reads to ``probabilities``, cut out of the model file and run on CPU, so that
    vectors (cached in a store, or computed by the service) classify exactly as the whole
    graph would.

    Attributes: ``output`` (the card's OutputSpec the head reads), ``classes`` (list of str),
    ``predict_proba(X)`` -> ndarray of shape (n_samples, n_classes), float32.

    Raises ModelCardError when the card lists no classes (the model only embeds) or the
    graph's ``probabilities`` is not computed from one of the card's outputs.
    """

    def __init__(self, model: str | os.PathLike[str] | ModelRunner) -> None:
        import onnx
        import onnxruntime as ort

        from featurebank.artifact import CLASS_OUTPUTS

        path = model.path if isinstance(model, ModelRunner) else model
        card = model.card if isinstance(model, ModelRunner) else read_model_card(model)
        if not card.classifies:
            raise ModelCardError(
                f"model {str(path)!r} has no {' / '.join(CLASS_OUTPUTS)} outputs (its card lists no classes), so it "
                "cannot classify by itself; give a classifier (--classifier FILE from `featurebank train`), or fuse "
                "one into the model (`featurebank fuse`)"
            )
        proto = onnx.load(os.fspath(path))
        probabilities = CLASS_OUTPUTS[0]
        stops = {o.name for o in card.outputs}
        producer = {t: n for n in proto.graph.node for t in n.output}
        reached, todo, seen = set(), [probabilities], set()
        while todo:  # walk back from probabilities to the embedding outputs it reads
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in stops:
                reached.add(t)
            elif t in producer:
                todo.extend(i for i in producer[t].input if i)
        graph_inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
        if len(reached) != 1 or seen & graph_inputs:
            raise ModelCardError(
                f"the {probabilities!r} output of model {str(path)!r} is not computed from exactly one of its "
                f"embedding outputs ({', '.join(sorted(stops))}); re-export it with `featurebank fuse` or "
                "`featurebank finetune`"
            )
        self.output = card.output(reached.pop())
        self.classes = list(card.classes)
        head = onnx.utils.Extractor(proto).extract_model([self.output.name], [probabilities])
        self._session = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if len(X) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self._session.run(None, {self.output.name: X})[0]


def _runner(model: str | os.PathLike[str] | ModelRunner, device: str = DEFAULT_DEVICE) -> ModelRunner:
    return model if isinstance(model, ModelRunner) else open_model(model, device=device)


def labelled_vectors(
    source: Any, model: str | os.PathLike[str] | ModelRunner, store: Any, *, output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE, progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(X, y, paths)`` of the labelled images of ``source`` (embedded first if needed).

    Raises ImageSourceError if some images have no label (train needs one per image), or if
    fewer than two classes are present; ActivationSpaceError if ``output`` is an unpooled
    activation map (a fine-tuning cache, not an embedding).
    """
    runner = _runner(model)
    out = runner.card.output(output)
    out.check_embedding(space_of(runner, out.name, decode_mode))
    X, _, labels, paths = load_embeddings(source, runner, store, output=output, decode_mode=decode_mode, progress=progress)
    missing = [p for p, lab in zip(paths, labels) if lab is None]
    if missing:
        raise ImageSourceError(
            f"{len(missing)} of {len(paths)} images have no label (first: {missing[0]}); put images in class "
            "subfolders (SOURCE/<class>/image.jpg) or give a CSV/Parquet list with a `label` column"
        )
    if len(set(labels)) < 2:
        raise ImageSourceError(
            f"only one class ({labels[0]!r}) in {len(paths)} images; a classifier needs at least two classes"
        )
    return X, np.asarray(labels, dtype=object), paths


def train_classifier(
    source: Any,
    model: str | os.PathLike[str] | ModelRunner,
    output_path: str | os.PathLike[str],
    *,
    store: Any,
    classifier: str = "probe",
    params: Mapping[str, Any] | None = None,
    output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``classifier`` on the labelled images of ``source`` and save it.

    Parameters
    ----------
    classifier : ``probe`` | ``knn`` | ``prototype`` | a scikit-learn classifier name
    params : its constructor parameters
    output_path : where the classifier file goes (written atomically)

    Returns a dict: ``path``, ``n_samples``, ``classes``, ``train_accuracy``, ``space``.
    """
    runner = _runner(model)
    out = runner.card.output(output)
    X, y, paths = labelled_vectors(source, runner, store, output=out.name, decode_mode=decode_mode, progress=progress)
    clf = make_classifier(classifier, **dict(params or {}))
    clf.fit(X, y)
    space = space_of(runner, out.name, decode_mode)
    path = save_classifier(
        clf, output_path, fingerprint=space,
        meta={"backbone": runner.card.backbone, "layer": out.layer, "output": out.name, "decode_mode": decode_mode,
              "model_fingerprint": runner.card.fingerprint, "classifier": classifier, "params": dict(params or {}),
              "n_features": int(X.shape[1])},
    )
    return {"path": str(path), "n_samples": int(len(y)), "classes": sorted(set(y.tolist())),
            "train_accuracy": float(clf.score(X, y)), "space": space}


def evaluate_on_images(
    source: Any,
    model: str | os.PathLike[str] | ModelRunner,
    *,
    store: Any,
    classifier: str = "probe",
    params: Mapping[str, Any] | None = None,
    cv: int | None = None,
    test_size: float = 0.25,
    random_state: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Held-out (or k-fold) evaluation of ``classifier`` on the labelled images of ``source``;
    writes ``report.json`` and ``confusion_matrix.png`` to ``out_dir`` when given."""
    runner = _runner(model)
    X, y, _ = labelled_vectors(source, runner, store, output=output, decode_mode=decode_mode, progress=progress)
    report = evaluate_classifier(make_classifier(classifier, **dict(params or {})), X, y, cv=cv, test_size=test_size,
                                 random_state=random_state)
    report["model"] = {"backbone": runner.card.backbone, "layer": runner.card.output(output).layer,
                       "decode_mode": decode_mode, "fingerprint": runner.card.fingerprint}
    if out_dir is not None:
        from featurebank.classifiers.evaluation import save_evaluation

        save_evaluation(report, out_dir)  # once, with the model: report.json is written whole or not at all
    return report


def predict_images(
    images: Any,
    classifier_path: str | os.PathLike[str] | None,
    model: str | os.PathLike[str] | ModelRunner,
    *,
    store: Any = None,
    top_k: int = 3,
    progress: bool | None = None,
    max_classifier_bytes: int | None = None,
    decode_mode: str | None = None,
) -> list[dict[str, Any]]:
    """Labels and probabilities for ``images`` (paths, folders or lists).

    With a classifier file, the decode mode and output are those the classifier was trained
    with; a model that does not produce the classifier's vector space is refused
    (FingerprintMismatchError). ``max_classifier_bytes`` is ``load_classifier``'s ``max_bytes``.
    With ``classifier_path=None`` the model classifies by itself (a fused or fine-tuned model:
    its ``probabilities`` output, :class:`ModelClassifier`), decoding with ``decode_mode``
    (default :data:`DEFAULT_DECODE_MODE`); a model without such outputs raises ModelCardError.

    Returns one dict per image: ``path``, ``label``, ``probability``, ``top`` (list of
    (label, probability), best first), or ``error`` for an image that failed.
    """
    runner = _runner(model)
    if classifier_path is None:
        head = ModelClassifier(runner)
        estimator, names = head, head.classes
        chosen = _resolve(runner.card, output=head.output.name, decode_mode=decode_mode)
    else:
        saved = load_classifier(classifier_path, max_bytes=max_classifier_bytes)
        meta = dict(saved.meta)
        trained = ", ".join(f"{word} {meta[k]}" for k, word in (("backbone", "backbone"), ("layer", "layer"),
                                                                 ("decode_mode", "decode mode")) if meta.get(k))
        what = f"classifier {str(classifier_path)!r}" + (f" (trained on {trained})" if trained else "")
        # its fingerprint picks the output and, for a space fingerprint, the decode mode
        chosen = _resolve(runner.card, decode_mode=decode_mode or meta.get("decode_mode"),
                          recorded={what: saved.fingerprint})
        estimator, names = saved.estimator, list(saved.classes)
    out = chosen.output
    emb = embed_images(images, runner, store=store, decode_mode=chosen.decode_mode, progress=progress)
    X = emb.vectors[out.name]
    rows: list[dict[str, Any]] = []
    failures = dict(emb.report.failures)
    ok_idx = np.flatnonzero(emb.ok)
    proba = estimator.predict_proba(X[ok_idx]) if len(ok_idx) else np.zeros((0, len(names)))
    by_row = dict(zip(ok_idx.tolist(), proba))
    for i, path in enumerate(emb.paths):
        if i not in by_row:
            rows.append({"path": path, "error": failures.get(path, "no vector (see `featurebank store failures`)")})
            continue
        p = by_row[i]
        order = np.argsort(p)[::-1][: max(1, top_k)]
        rows.append({"path": path, "label": str(names[order[0]]), "probability": float(p[order[0]]),
                     "top": [(str(names[j]), float(p[j])) for j in order]})
    return rows


def resolve_space(store: Any, *, space: str | None = None, model: Any = None, output: str | None = None,
                  decode_mode: str | None = None) -> str:
    """The fingerprint of the store space to work on: ``space`` as given (checked against
    ``model`` when both are given), the one ``model``'s ``output`` writes under
    ``decode_mode`` (None: the one the store holds), or the store's only space.

    The rule is :func:`featurebank.artifact.resolve_space`; this joins it to the store.
    Raises StoreError naming the store's spaces when none or several fit, and
    FingerprintMismatchError when ``space`` is not one ``model`` writes.
    """
    if space and model is None:
        return space
    from featurebank.store import open_store

    if model is None:
        card = None
    else:  # a path: the card is read from the file's metadata, no session is built for it
        card = model.card if isinstance(model, ModelRunner) else read_model_card(model)
    if hasattr(store, "spaces"):
        available = {s.fingerprint: len(s) for s in store.spaces()}
    else:
        with open_store(store, create=False) as st:
            available = {s.fingerprint: len(s) for s in st.spaces()}
    return _resolve(card, output=output, decode_mode=decode_mode, space=space, available=available,
                    model_name=str(model) if isinstance(model, (str, os.PathLike)) else None,
                    store_name=str(getattr(store, "root", store))).fingerprint


def search_images(
    images: Any,
    index: Any,
    model: str | os.PathLike[str] | ModelRunner,
    *,
    k: int = 10,
    clip: bool = False,
    output: str | None = None,
) -> tuple[list[str], list[list[Any]], list[tuple[str, str]]]:
    """Nearest indexed images of query image files:
    ``(query paths, [[Neighbour, ...], ...], [(failed query path, reason), ...])``.

    The query vectors come from ``model`` in the decode mode the index's space was built
    with; a model that does not produce that space is refused (FingerprintMismatchError).
    A query that cannot be read or decoded does not cost the others: it is left out of the
    first two lists and listed with its reason in the third. Raises ImageSourceError when no
    query at all could be embedded.
    """
    from featurebank.search import open_index, query_index

    idx = index if hasattr(index, "search") else open_index(index)
    runner = _runner(model)
    chosen = _resolve(runner.card, output=output, recorded={"index": idx.space})
    out = chosen.output
    out.check_embedding(chosen.fingerprint)
    emb = embed_images(images, runner, decode_mode=chosen.decode_mode, progress=False)
    reasons = dict(emb.report.failures)
    failures = [(p, reasons.get(p, "no vector")) for p, ok in zip(emb.paths, emb.ok) if not ok]
    if not emb.ok.any():
        p, why = failures[0]
        raise ImageSourceError(f"query image could not be embedded: {why if p in why else f'{p}: {why}'}")
    hits = query_index(idx, emb.vectors[out.name][emb.ok], k=k, clip=clip, space=idx.space or None)
    return [p for p, ok in zip(emb.paths, emb.ok) if ok], hits, failures
