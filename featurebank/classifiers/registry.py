"""One way to name a classifier: ``make_classifier("probe")``, ``make_classifier("SVC",
probability=True)``, ``make_classifier("sklearn.ensemble.RandomForestClassifier")``."""

from __future__ import annotations

import difflib
import importlib
import inspect

from sklearn.base import BaseEstimator, ClassifierMixin

__all__ = ["make_classifier", "list_classifiers"]

_OURS = {
    "probe": "featurebank.classifiers.probe.LinearProbe",
    "knn": "featurebank.classifiers.knn.KNNClassifier",
    "prototype": "featurebank.classifiers.prototype.PrototypeClassifier",
}


def _sklearn_classifiers() -> dict[str, type]:
    from sklearn.utils import all_estimators

    return dict(all_estimators(type_filter="classifier"))


def list_classifiers() -> list[str]:
    """Names ``make_classifier`` accepts: ours first, then scikit-learn's classifiers."""
    return [*_OURS, *sorted(_sklearn_classifiers())]


def _resolve(name: str) -> type:
    if name in _OURS:
        module, _, attr = _OURS[name].rpartition(".")
        return getattr(importlib.import_module(module), attr)
    if "." in name:
        module, _, attr = name.rpartition(".")
        if not (module == "sklearn" or module.startswith("sklearn.")):
            raise ValueError(
                f"classifier {name!r} is not from scikit-learn; dotted names must start with 'sklearn.' "
                "(e.g. 'sklearn.svm.SVC'), or use 'probe', 'knn' or 'prototype'"
            )
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        if not (inspect.isclass(cls) and issubclass(cls, BaseEstimator) and issubclass(cls, ClassifierMixin)):
            raise ValueError(f"{name!r} is not a scikit-learn classifier class; {_options_hint(attr)}")
        return cls
    known = _sklearn_classifiers()
    if name in known:
        return known[name]
    raise ValueError(f"unknown classifier {name!r}; {_options_hint(name)}")


def _options_hint(name: str) -> str:
    options = list_classifiers()
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return hint + "options: " + ", ".join(options)


def make_classifier(name: str, **params) -> BaseEstimator:
    """An unfitted classifier by short name, scikit-learn class name or dotted path.

    Parameters
    ----------
    name : str
        "probe" (:class:`LinearProbe`), "knn" (:class:`KNNClassifier`), "prototype"
        (:class:`PrototypeClassifier`), a scikit-learn classifier class name ("SVC",
        "RandomForestClassifier") or its dotted path ("sklearn.svm.SVC"). Only scikit-learn
        modules are imported from dotted paths.
    **params
        Constructor parameters, checked against the class's signature.

    Examples
    --------
    >>> make_classifier("SVC", probability=True)
    SVC(probability=True)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"classifier name must be a non-empty string; got {name!r}")
    cls = _resolve(name)
    valid = sorted(cls().get_params(deep=False))
    unknown = [p for p in params if p not in valid]
    if unknown:
        hints = []
        for p in unknown:
            close = difflib.get_close_matches(p, valid, n=1)
            hints.append(f"{p!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{cls.__name__} has no parameter {', '.join(hints)}; its parameters are: {', '.join(valid)}"
        )
    return cls(**params)
