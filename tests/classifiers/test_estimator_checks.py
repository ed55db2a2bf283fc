"""scikit-learn's own contract checks, run on every featurebank estimator."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from featurebank.classifiers.knn import KNNClassifier
from featurebank.classifiers.probe import LinearProbe
from featurebank.classifiers.prototype import PrototypeClassifier

ESTIMATORS = [
    # cv=2 and 3 Cs, as sklearn's own suite sets LogisticRegressionCV(cv=2): the checks use
    # 10-20 samples whose classes may have fewer than 5 members, which the default cv=5
    # refuses by design.
    LinearProbe(Cs=3, cv=2),
    KNNClassifier(),
    KNNClassifier(metric="l2", weights="distance"),
    PrototypeClassifier(),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_contract(estimator, check):
    check(estimator)
