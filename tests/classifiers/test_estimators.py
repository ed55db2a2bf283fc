"""Behaviour of LinearProbe, KNNClassifier and PrototypeClassifier beyond sklearn's checks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featurebank.classifiers import KNNClassifier, LinearProbe, PrototypeClassifier, make_classifier

ALL = [
    pytest.param(lambda: LinearProbe(cv=3), id="probe"),
    pytest.param(lambda: KNNClassifier(n_neighbors=3), id="knn-flat"),
    pytest.param(lambda: KNNClassifier(n_neighbors=3, metric="l2", weights="distance",
                                       index_factory="IVF4,Flat", search_params="nprobe=4"), id="knn-ivf"),
    pytest.param(lambda: PrototypeClassifier(), id="prototype"),
]


@pytest.mark.parametrize("build", ALL)
def test_learns_separable_classes(build, vectors):
    X, y = vectors
    clf = build().fit(X[:45], y[:45])
    assert clf.score(X[45:], y[45:]) >= 0.9
    proba = clf.predict_proba(X[45:])
    assert proba.shape == (15, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X[45:]))


@pytest.mark.parametrize("build", ALL)
def test_pickle_round_trip_gives_identical_predictions(build, vectors):
    X, y = vectors
    clf = build().fit(X, y)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(again.predict(X), clf.predict(X))


def test_knn_pickle_stores_faiss_bytes_not_the_index(vectors):
    X, y = vectors
    clf = KNNClassifier().fit(X, y)
    state = clf.__getstate__()
    assert isinstance(state["index_"], np.ndarray) and state["index_"].dtype == np.uint8
    assert clf.index_.ntotal == len(X)  # the live estimator keeps its index


@pytest.mark.parametrize("build", ALL)
def test_in_pipeline_and_grid_search(build, vectors):
    X, y = vectors
    pipe = make_pipeline(StandardScaler(), build())
    assert pipe.fit(X, y).score(X, y) >= 0.9
    step = pipe.steps[-1][0]
    grid = {
        "linearprobe": {"linearprobe__Cs": [3, 5]},
        "knnclassifier": {"knnclassifier__n_neighbors": [1, 3]},
        "prototypeclassifier": {"prototypeclassifier__temperature": [0.05, 0.5]},
    }[step]
    search = GridSearchCV(pipe, grid, cv=3).fit(X, y)
    assert search.best_score_ >= 0.9


@pytest.mark.parametrize("build", ALL)
def test_nan_vectors_refused_naming_rows(build, vectors):
    X, y = vectors
    X = X.copy()
    X[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"^X has NaN or inf in 2 of 60 rows \(rows 3, 7\); these embeddings are "
                                         r"broken: re-embed those images"):
        build().fit(X, y)
    clf = build().fit(np.nan_to_num(X), y)
    with pytest.raises(ValueError, match=r"^X has NaN or inf in 2 of 60 rows \(rows 3, 7\)"):
        clf.predict(X)


@pytest.mark.parametrize("build", ALL)
def test_one_class_only_refused(build, vectors):
    X, _ = vectors
    with pytest.raises(ValueError, match=r"at least 2 classes.*only one class: 'grass'"):
        build().fit(X, np.full(len(X), "grass"))


def test_probe_refuses_class_with_fewer_members_than_folds(make_vectors):
    X, y = make_vectors(n_per_class=(20, 20, 1))
    with pytest.raises(ValueError, match=r"at least 5 samples per class for 5-fold.*'gravel' \(1\).*lower cv"):
        LinearProbe().fit(X, y)
    with pytest.raises(ValueError, match=r"at least 2 samples per class for a validation split.*'gravel' \(1\)"):
        LinearProbe(cv=0.2).fit(X, y)


def test_a_class_with_one_image_is_fine_for_knn_and_prototype(make_vectors):
    X, y = make_vectors(n_per_class=(20, 20, 1))
    lone = X[y == "gravel"]
    assert PrototypeClassifier().fit(X, y).predict(lone)[0] == "gravel"
    assert KNNClassifier(n_neighbors=1).fit(X, y).predict(lone)[0] == "gravel"


def test_knn_more_neighbours_than_samples(vectors):
    X, y = vectors
    with pytest.raises(ValueError, match=r"n_neighbors=61 is larger than n_samples=60"):
        KNNClassifier(n_neighbors=61).fit(X, y)


def test_knn_faiss_training_error_names_n_samples(vectors):
    X, y = vectors
    # FAISS's RuntimeError (C++ signature, file and line) becomes a ValueError with its sentence only
    with pytest.raises(ValueError, match=rf"^FAISS could not train/fill index 'IVF256,Flat' with n_samples=60 vectors "
                                         rf"of {X.shape[1]} features: Number of training points \(60\) should be at "
                                         r"least as large as number of clusters \(256\)\. Use a smaller index \(fewer "
                                         r"IVF lists, e\.g\. 'IVF1,Flat', or 'Flat'\) or more samples$"):
        KNNClassifier(index_factory="IVF256,Flat").fit(X, y)
    with pytest.raises(ValueError, match=rf"^index_factory='NoSuchIndex' is not a FAISS factory string FAISS can build "
                                         rf"for {X.shape[1]} features \(could not parse index string NoSuchIndex\); "
                                         "see the FAISS wiki 'The index factory'$"):
        KNNClassifier(index_factory="NoSuchIndex").fit(X, y)


def test_knn_distance_weights_give_exact_matches_the_vote(vectors):
    X, y = vectors
    clf = KNNClassifier(n_neighbors=7, weights="distance", metric="l2").fit(X, y)
    proba = clf.predict_proba(X[:5])
    np.testing.assert_array_equal(proba.max(axis=1), 1.0)
    np.testing.assert_array_equal(clf.predict(X[:5]), y[:5])


def test_knn_matches_sklearn_kneighbors(vectors):
    from sklearn.neighbors import KNeighborsClassifier

    X, y = vectors
    ours = KNNClassifier(n_neighbors=5, metric="l2").fit(X[:40], y[:40])
    ref = KNeighborsClassifier(n_neighbors=5).fit(X[:40], y[:40])
    np.testing.assert_allclose(ours.predict_proba(X[40:]), ref.predict_proba(X[40:]))


def test_probe_chooses_C_on_the_grid_and_matches_logistic_regression(vectors):
    X, y = vectors
    probe = LinearProbe(Cs=[1e-3, 1e-1, 1e1], cv=3, patience=None).fit(X, y)
    # seeded data: C=1e-3 misses one validation image, 0.1 and 10 are both 100% accurate, and the
    # tie goes to the lower validation log-loss, the weaker regularisation (sharper probabilities)
    np.testing.assert_allclose(probe.cv_scores_.mean(axis=0), [59 / 60, 1.0, 1.0])
    assert probe.cv_log_loss_.mean(axis=0)[2] < probe.cv_log_loss_.mean(axis=0)[1]
    assert probe.C_ == 10.0
    ref = LogisticRegression(C=probe.C_, tol=1e-8, max_iter=1000).fit(probe.scaler_.transform(X), y)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(probe.scaler_.transform(X)), atol=2e-3)


def test_probe_patience_skips_the_rest_of_the_path(make_vectors):
    X, y = make_vectors(spread=3.0, seed=1)  # noisy: weak regularisation stops paying
    probe = LinearProbe(Cs=9, cv=3, patience=1).fit(X, y)
    scored = ~np.isnan(probe.cv_scores_[0])
    assert scored[0] and not scored.all()
    # scored Cs are a prefix of the ascending grid
    assert scored.tolist() == sorted(scored.tolist(), reverse=True)


def test_probe_to_sklearn_pipeline_is_equivalent(vectors):
    X, y = vectors
    for labels in (y, y == "grass"):  # three classes and two
        probe = LinearProbe(cv=3).fit(X, labels)
        np.testing.assert_allclose(probe.to_sklearn().predict_proba(X), probe.predict_proba(X), atol=1e-6)


def test_prototype_to_sklearn_pipeline_is_equivalent(vectors):
    X, y = vectors
    for labels in (y, y == "grass"):
        proto = PrototypeClassifier(temperature=0.2).fit(X, labels)
        np.testing.assert_allclose(proto.to_sklearn().predict_proba(X), proto.predict_proba(X), atol=1e-6)


def test_make_classifier_names():
    assert isinstance(make_classifier("probe", cv=3), LinearProbe)
    assert isinstance(make_classifier("knn"), KNNClassifier)
    assert make_classifier("SVC", C=2.0).C == 2.0
    assert type(make_classifier("sklearn.ensemble.RandomForestClassifier")).__name__ == "RandomForestClassifier"
    with pytest.raises(ValueError, match=r"unknown classifier 'SCV'; did you mean 'SVC'.*options: probe, knn"):
        make_classifier("SCV")
    with pytest.raises(ValueError, match=r"not from scikit-learn"):
        make_classifier("os.system")
    with pytest.raises(ValueError, match=r"not a scikit-learn classifier class"):
        make_classifier("sklearn.preprocessing.StandardScaler")
    with pytest.raises(ValueError, match=r"KNNClassifier has no parameter 'n_neighbours' \(did you mean 'n_neighbors'\?\)"):
        make_classifier("knn", n_neighbours=3)


def test_probe_breaks_accuracy_ties_by_validation_log_loss():
    # well separated classes: every C is 100% accurate, and the strongest regularisation
    # would give flat probabilities; the tie-break picks a confident, calibrated C
    from featurebank.classifiers import LinearProbe

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(6, 1, (30, 8))]).astype(np.float32)
    y = np.array([0] * 30 + [1] * 30)
    probe = LinearProbe(cv=3).fit(X, y)
    assert np.nanmax(probe.cv_scores_.mean(0)) == 1.0
    assert probe.C_ > probe.Cs_[0]
    assert probe.predict_proba(X).max(axis=1).min() > 0.9
