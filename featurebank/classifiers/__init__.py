"""featurebank.classifiers: scikit-learn estimators on cached embeddings, their safe
persistence, evaluation, and fusion into the backbone's ONNX graph.

Imports numpy, scikit-learn, FAISS, skops and skl2onnx; never torch, never images.
"""

from featurebank.classifiers.evaluation import evaluate_classifier
from featurebank.classifiers.fusion import fuse_classifier
from featurebank.classifiers.knn import KNNClassifier
from featurebank.classifiers.persistence import SavedClassifier, load_classifier, save_classifier
from featurebank.classifiers.probe import LinearProbe
from featurebank.classifiers.prototype import PrototypeClassifier
from featurebank.classifiers.registry import make_classifier

__all__ = [
    "LinearProbe",
    "KNNClassifier",
    "PrototypeClassifier",
    "make_classifier",
    "save_classifier",
    "load_classifier",
    "SavedClassifier",
    "evaluate_classifier",
    "fuse_classifier",
]
