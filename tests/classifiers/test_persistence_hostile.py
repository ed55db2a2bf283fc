"""A corpus of crafted classifier files: each is refused with a clear message, in a fresh
interpreter that imports nothing the file names, touches nothing on disk and stays within a
bounded amount of memory (issue #11, "loading a classifier file is not safe")."""

from __future__ import annotations

import gc
import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io

import hostile_files as hf
from featurebank.classifiers import PrototypeClassifier, load_classifier, save_classifier
from featurebank.errors import ClassifierFileError

SPACE = "a" * 64
HERE = Path(__file__).parent

# Loads one file in a fresh interpreter; prints what happened as JSON: the error, the modules the
# load imported, stdout written meanwhile, and how much the peak resident memory grew.
_LOADER = textwrap.dedent("""
    import contextlib, gc, io, json, resource, sys
    from featurebank.classifiers import load_classifier
    from featurebank.errors import ClassifierFileError
    before = set(sys.modules)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, error = io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            load_classifier(sys.argv[1], fingerprint=sys.argv[2], max_bytes=int(sys.argv[3]) if sys.argv[3] else None)
        except ClassifierFileError as exc:
            error = str(exc)
        except BaseException as exc:
            error = "UNEXPECTED " + type(exc).__name__ + ": " + str(exc)
    gc.collect()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"error": error, "imported": sorted(set(sys.modules) - before), "stdout": out.getvalue(),
                      "rss_growth_mb": (rss1 - rss0) / 1024}))
""")


def load_in_subprocess(path: Path, max_bytes: int | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(path), SPACE, "" if max_bytes is None else str(max_bytes)],
                          capture_output=True, text=True, timeout=120, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def good(tmp_path, vectors) -> Path:
    X, y = vectors
    return save_classifier(PrototypeClassifier().fit(X, y), tmp_path / "good.fbclf", fingerprint=SPACE)


def test_datasource_gadget_is_refused_and_deletes_nothing(good, tmp_path):
    """numpy's DataSource removes its _destpath in __del__ when _istmpdest is true."""
    for type_name in ("numpy.lib.npyio.DataSource", "numpy.lib._datasource.DataSource"):
        victim = tmp_path / f"victim-{type_name.rsplit('.', 2)[-2]}"
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
        gadget = hf.object_node(type_name, {"_istmpdest": hf.json_node(True), "_destpath": hf.json_node(str(victim))})
        bad = hf.edit_schema(good, tmp_path / "datasource.fbclf", hf.add_attribute("cache_", gadget))
        result = load_in_subprocess(bad)
        assert result["error"] == (
            f"{str(bad)!r} asks to rebuild types featurebank does not load from a classifier file: {type_name}. "
            "A classifier file may hold only featurebank's estimators, the scikit-learn classifiers `featurebank "
            "train` accepts and the numpy arrays they are made of (featurebank.classifiers.persistence."
            "ALLOWED_NODES); do not load this file")
        assert set(result["imported"]) <= {"encodings.cp437"}
        assert (victim / "keep.txt").read_text() == "precious"


def test_the_datasource_gadget_is_real(good, tmp_path):
    """The corpus is not vacuous: skops, told to trust the type, deletes the directory."""
    victim = tmp_path / "victim"
    victim.mkdir()
    gadget = hf.object_node("numpy.lib._datasource.DataSource",
                            {"_istmpdest": hf.json_node(True), "_destpath": hf.json_node(str(victim))})
    _, schema, members = hf.read_parts(good)
    hf.add_attribute("cache_", gadget)(schema, members)
    payload = hf.skops_bytes(schema, members)
    clf = skops.io.loads(payload, trusted=skops.io.get_untrusted_types(data=payload))
    del clf
    gc.collect()
    assert not victim.exists()


@pytest.mark.parametrize("type_name, module", [
    ("numpy.f2py.__main__.main", "numpy.f2py"),
    ("featurebank.__main__.X", "featurebank.__main__"),
    ("featurebank.cli.main", "featurebank.cli"),
])
def test_names_are_checked_before_any_import(good, tmp_path, type_name, module):
    """Checking a name must not import its module (f2py's __main__ runs f2py; ours runs the CLI)."""
    bad = hf.edit_schema(good, tmp_path / "import.fbclf", hf.add_attribute("x_", hf.object_node(type_name, {})))
    result = load_in_subprocess(bad)
    assert result["error"].endswith("do not load this file") and f": {type_name}. " in result["error"]
    assert not [m for m in result["imported"] if m == module or m.startswith(module + ".")]
    assert set(result["imported"]) <= {"encodings.cp437"}  # zipfile's name codec; not even skops
    assert result["stdout"] == ""


# Other gadgets: objects whose __del__, __setstate__, constructor or call does something on load,
# functions in place of classes, allowed names through a loader that would call them.
GADGETS = {
    "npz_file_del": (hf.object_node("numpy.lib.npyio.NpzFile", {}), "numpy.lib.npyio.NpzFile"),
    "memmap_array": ({"__class__": "memmap", "__module__": "numpy", "__loader__": "NdArrayNode", "type": "numpy",
                      "file": "FIRST"}, "numpy.memmap"),
    "netcdf_file_del": (hf.object_node("scipy.io._netcdf.netcdf_file", {"mode": hf.json_node("w")}),
                        "scipy.io._netcdf.netcdf_file"),
    "tempfile_closer_del": (hf.object_node("tempfile._TemporaryFileCloser", {"delete": hf.json_node(True)}),
                            "tempfile._TemporaryFileCloser"),
    "joblib_memory": (hf.object_node("joblib.memory.Memory", {"location": hf.json_node("/")}), "joblib.memory.Memory"),
    "sklearn_function": ({"__class__": "check_array", "__module__": "sklearn.utils.validation",
                          "__loader__": "FunctionNode"}, "sklearn.utils.validation.check_array"),
    "builtin_eval": ({"__class__": "eval", "__module__": "builtins", "__loader__": "FunctionNode"}, "builtins.eval"),
    "numpy_function": ({"__class__": "load", "__module__": "numpy", "__loader__": "FunctionNode"}, "numpy.load"),
    "os_system_as_key_type": ({"__class__": "system", "__module__": "os", "__loader__": "TypeNode"}, "os.system"),
    "dict_called_as_type": ({"__class__": "dict", "__module__": "builtins", "__loader__": "TypeNode"},
                            "builtins.dict (as TypeNode)"),
    "estimator_called_with_args": ({"__class__": "SVC", "__module__": "sklearn.svm._classes",
                                    "__loader__": "ConstructorFromReduceNode", "content": hf.json_node([1])},
                                   "sklearn.svm._classes.SVC (as ConstructorFromReduceNode)"),
    "partial": ({"__class__": "partial", "__module__": "functools", "__loader__": "PartialNode",
                 "content": {}}, "functools.partial"),
    "operator": ({"__class__": "attrgetter", "__module__": "operator", "__loader__": "OperatorFuncNode",
                  "attrs": hf.json_node(["x"])}, "operator.attrgetter"),
    "scipy_sparse_npz": ({"__class__": "csr_matrix", "__module__": "scipy.sparse._csr",
                          "__loader__": "SparseMatrixNode", "type": "scipy", "file": "FIRST"},
                         "scipy.sparse._csr.csr_matrix"),
    "bytes": ({"__class__": "bytes", "__module__": "builtins", "__loader__": "BytesNode", "file": "FIRST"},
              "builtins.bytes"),
    "bit_generator_not_a_bit_generator": (
        {"__class__": "Generator", "__module__": "numpy.random._generator", "__loader__": "RandomGeneratorNode",
         "content": {"bit_generator": hf.dict_node({"bit_generator": hf.json_node("seed")}),
                     "seed_seq": hf.dict_node({})}}, "numpy.random.seed"),
}


@pytest.mark.parametrize("where", ["attribute", "nested_in_list_in_dict"])
@pytest.mark.parametrize("gadget", sorted(GADGETS))
def test_gadgets_are_refused_by_name_even_nested(good, tmp_path, gadget, where):
    node, refused = GADGETS[gadget]
    node = json.loads(json.dumps(node))
    _, _, members = hf.read_parts(good)
    if node.get("file") == "FIRST":
        node["file"] = sorted(members)[0]
    if where == "nested_in_list_in_dict":
        node = hf.dict_node({"a": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode",
                                   "content": [hf.json_node(1), node]}})
    bad = hf.edit_schema(good, tmp_path / "gadget.fbclf", hf.add_attribute("extra_", node))
    with pytest.raises(ClassifierFileError, match=r"asks to rebuild types featurebank does not load from a "
                       rf"classifier file: {__import__('re').escape(refused)}\. "):
        load_classifier(bad, fingerprint=SPACE)


def test_gadget_as_the_root_object_and_as_a_dict_key_type(good, tmp_path):
    def root(schema, members):
        schema.update({"__class__": "DataSource", "__module__": "numpy.lib.npyio"})

    with pytest.raises(ClassifierFileError, match=r"does not load from a classifier file: numpy\.lib\.npyio\.DataSource\. "):
        load_classifier(hf.edit_schema(good, tmp_path / "root.fbclf", root), fingerprint=SPACE)

    def key_type(schema, members):
        schema["content"]["key_types"]["content"][0] = {"__class__": "system", "__module__": "os",
                                                        "__loader__": "TypeNode"}

    with pytest.raises(ClassifierFileError, match=r"does not load from a classifier file: os\.system\. "):
        load_classifier(hf.edit_schema(good, tmp_path / "key.fbclf", key_type), fingerprint=SPACE)


def test_object_arrays_are_refused(good, tmp_path):
    # an array of objects (how skops stores GradientBoosting's trees) is checked item by item
    as_json = {"__class__": "ndarray", "__module__": "numpy", "__loader__": "NdArrayNode", "type": "json",
               "content": [hf.json_node(1), hf.object_node("numpy.lib.npyio.DataSource", {})],
               "shape": hf.json_node([2])}
    bad = hf.edit_schema(good, tmp_path / "json.fbclf", hf.add_attribute("objs_", as_json))
    with pytest.raises(ClassifierFileError, match=r"does not load from a classifier file: numpy\.lib\.npyio\.DataSource\. "):
        load_classifier(bad, fingerprint=SPACE)
    as_json["type"] = "pickle"
    bad = hf.edit_schema(good, tmp_path / "kind.fbclf", hf.add_attribute("objs_", as_json))
    with pytest.raises(ClassifierFileError, match=r"holds an array of unknown kind 'pickle'"):
        load_classifier(bad, fingerprint=SPACE)

    # an .npy member whose header says dtype object (numpy would need pickle to read it)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (2,)})
    payload = buf.getvalue() + bytes(16)

    def npy_object(schema, members):
        name = schema["content"]["content"]["prototypes_"]["file"]
        members[name] = payload

    with pytest.raises(ClassifierFileError, match=r"holds an array of Python objects \('\d+\.npy', dtype object\)"):
        load_classifier(hf.edit_schema(good, tmp_path / "obj.fbclf", npy_object), fingerprint=SPACE)


def test_huge_arrays_are_refused_before_reading(good, tmp_path):
    # the header promises 10^12 floats, the member holds 16 bytes
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    lying = buf.getvalue() + bytes(16)

    def swap(schema, members):
        members[schema["content"]["content"]["prototypes_"]["file"]] = lying

    with pytest.raises(ClassifierFileError, match=r"whose header promises 4000000000128 bytes but which has 144: "
                       r"the file is corrupt or crafted"):
        load_classifier(hf.edit_schema(good, tmp_path / "lying.fbclf", swap), fingerprint=SPACE)

    # an honest 4 MB array is refused under a 1 MB cap, and loads under the default one
    big = io.BytesIO()
    np.save(big, np.zeros((1024, 1024), dtype=np.float32))

    def grow(schema, members):
        members[schema["content"]["content"]["prototypes_"]["file"]] = big.getvalue()

    path = hf.edit_schema(good, tmp_path / "big.fbclf", grow)
    with pytest.raises(ClassifierFileError, match=(
            r"member model.skops is 4\d{6} bytes uncompressed, over the limit of 1000000 bytes; if you trust this "
            r"file, raise the limit \(load_classifier\(\.\.\., max_bytes=N\), or --max-classifier-bytes N\)")):
        load_classifier(path, fingerprint=SPACE, max_bytes=1_000_000)
    assert load_classifier(path, fingerprint=SPACE).estimator.prototypes_.shape == (1024, 1024)


def test_an_array_read_many_times_counts_each_time(good, tmp_path):
    """skops reads a member once per node that names it: 300 references to a 4 MB array are 1.2 GB."""
    big = io.BytesIO()
    np.save(big, np.zeros((1024, 1024), dtype=np.float32))

    def many(schema, members):
        name = schema["content"]["content"]["prototypes_"]["file"]
        members[name] = big.getvalue()
        ref = {"__class__": "ndarray", "__module__": "numpy", "__loader__": "NdArrayNode", "type": "numpy", "file": name}
        hf.add_attribute("copies_", {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode",
                                     "content": [ref] * 300})(schema, members)

    with pytest.raises(ClassifierFileError, match=r"the estimator is 12\d{8} bytes uncompressed, over the limit "
                       r"of 1073741824 bytes"):
        load_classifier(hf.edit_schema(good, tmp_path / "many.fbclf", many), fingerprint=SPACE)


def test_zip_bombs_are_refused_within_bounded_memory(good, tmp_path):
    """A 2 MB file whose model member inflates to 2 GiB, with an honest and with a lying size."""
    header, _, _ = hf.read_parts(good)
    raw_header, header_crc = hf.deflate(header)
    bomb, crc = hf.deflate_zeros(2 << 30)
    assert len(bomb) < 3 << 20
    honest = tmp_path / "honest.fbclf"
    honest.write_bytes(hf.lying_zip([(hf.HEADER, raw_header, len(header), header_crc), (hf.MODEL, bomb, 2 << 30, crc)]))
    lying = tmp_path / "lying.fbclf"
    lying.write_bytes(hf.lying_zip([(hf.HEADER, raw_header, len(header), header_crc), (hf.MODEL, bomb, 1000, crc)]))
    result = load_in_subprocess(honest)
    assert result["error"] == (
        f"{str(honest)!r}: member model.skops is 2147483648 bytes uncompressed, over the limit of 1073741824 bytes; if "
        "you trust this file, raise the limit (load_classifier(..., max_bytes=N), or --max-classifier-bytes N)")
    assert result["rss_growth_mb"] < 300
    result = load_in_subprocess(lying)  # zipfile stops at the declared 1000 bytes; their CRC is wrong
    assert result["error"].startswith(f"{str(lying)!r} is not a featurebank classifier file, or it is truncated/corrupt "
                                      "(BadZipFile: Bad CRC-32")
    assert result["rss_growth_mb"] < 300
    # under a cap above the inflated size, the honest bomb is read (bounded by the caller's choice)
    with pytest.raises(ClassifierFileError, match=r"member model.skops is 2147483648 bytes uncompressed, over the "
                       r"limit of 2000000000 bytes"):
        load_classifier(honest, max_bytes=2_000_000_000)


def test_header_over_its_cap_and_other_compression_methods_are_refused(good, tmp_path):
    header, schema, members = hf.read_parts(good)
    model = hf.skops_bytes(schema, members)
    big_header = json.loads(header)
    big_header["meta"] = {"pad": "x" * (2 << 20)}
    with pytest.raises(ClassifierFileError, match=r"member featurebank-classifier.json is 2097\d{3} bytes "
                       r"uncompressed, over the limit of 1048576 bytes"):
        load_classifier(hf.write_classifier(tmp_path / "h.fbclf", json.dumps(big_header).encode(), model))
    bz = tmp_path / "bz2.fbclf"
    with zipfile.ZipFile(bz, "w") as zf:
        zf.writestr(hf.HEADER, header)
        zf.writestr(hf.MODEL, model, compress_type=zipfile.ZIP_BZIP2)
    with pytest.raises(ClassifierFileError, match=r"member model.skops uses zip compression method 12; featurebank "
                       r"writes stored or deflate members only"):
        load_classifier(bz)
    deflated = hf.write_classifier(tmp_path / "inner.fbclf", header, hf.skops_bytes(schema, members, zipfile.ZIP_DEFLATED))
    with pytest.raises(ClassifierFileError, match=r"holds a compressed skops member 'schema.json'; featurebank writes "
                       r"them uncompressed"):
        load_classifier(deflated)


def test_deep_nesting_and_other_protocols_are_refused(good, tmp_path):
    deep = hf.json_node(1)
    for _ in range(200):
        deep = {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": [deep]}
    with pytest.raises(ClassifierFileError, match=r"nests objects deeper than 64 levels"):
        load_classifier(hf.edit_schema(good, tmp_path / "deep.fbclf", hf.add_attribute("deep_", deep)))

    def old(schema, members):
        schema["protocol"] = 0

    with pytest.raises(ClassifierFileError, match=r"holds a skops payload of protocol 0; featurebank reads protocol 2"):
        load_classifier(hf.edit_schema(good, tmp_path / "old.fbclf", old))


def test_a_good_file_still_loads_in_a_fresh_interpreter(good):
    result = load_in_subprocess(good)
    assert result["error"] is None and result["stdout"] == ""


@pytest.mark.parametrize("damage", ["out_of_range", "backwards", "feature"])
def test_decision_trees_with_wild_node_indices_are_refused(tmp_path, vectors, damage):
    """scikit-learn follows a tree's child and feature indices without bounds checks at predict time."""
    from sklearn.tree import DecisionTreeClassifier

    X, y = vectors
    clf = DecisionTreeClassifier(random_state=0).fit(X, y)
    column = {"out_of_range": "children_left", "backwards": "children_right", "feature": "feature"}[damage]
    getattr(clf.tree_, column)[0] = {"out_of_range": 10**6, "backwards": 0, "feature": 999}[damage]
    path = save_classifier(clf, tmp_path / "tree.fbclf", fingerprint=SPACE)
    with pytest.raises(ClassifierFileError, match=r"holds a decision tree whose nodes point outside the tree or its "
                       r"features: the file is corrupt or crafted; do not load it"):
        load_classifier(path, fingerprint=SPACE)


def _knn_file(tmp_path, vectors, factory: str) -> Path:
    from featurebank.classifiers import KNNClassifier

    X, y = vectors
    return save_classifier(KNNClassifier(n_neighbors=3, index_factory=factory).fit(X, y),
                           tmp_path / f"knn-{factory.replace(',', '-')}.fbclf", fingerprint=SPACE)


def _announce_more(schema: dict, members: dict, offset: int, value: int) -> None:
    """Overwrite the 8-byte field at ``offset`` of the KNN's FAISS blob (inside its .npy)."""
    name = schema["content"]["content"]["index_"]["file"]
    raw = bytearray(members[name])
    header_len = len(raw) - len(np.load(io.BytesIO(bytes(raw))).tobytes())
    raw[header_len + offset : header_len + offset + 8] = int(value).to_bytes(8, "little")
    members[name] = bytes(raw)


@pytest.mark.parametrize("factory, offset", [
    ("Flat", 37),      # IndexFlat: the size of its code vector (fourcc, d, ntotal, 2 dummies, trained, metric)
    ("HNSW8", 37),     # IndexHNSW: the size of the HNSW level-probability vector
])
def test_a_faiss_blob_that_announces_gigabytes_is_refused_in_bounded_memory(tmp_path, vectors, factory, offset):
    """FAISS fills the buffers a blob announces before it reads them: 2^31 announced elements in
    a 1 KB blob drove a plain load to 8 GB. The blob is now read first in a memory-capped child."""
    good_knn = _knn_file(tmp_path, vectors, factory)
    assert load_in_subprocess(good_knn)["error"] is None  # the legitimate file loads through the check
    bad = hf.edit_schema(good_knn, tmp_path / "bad-knn.fbclf", lambda s, m: _announce_more(s, m, offset, 2**31))
    result = load_in_subprocess(bad)
    assert result["error"].startswith(
        f"{str(bad)!r} holds an estimator that cannot be rebuilt (ValueError: the FAISS index of this KNNClassifier ("
    ), result
    assert "bytes of memory: it is corrupt or crafted to exhaust memory" in result["error"]
    assert result["rss_growth_mb"] < 300


def test_a_loaded_knn_predicts_as_saved(tmp_path, vectors):
    X, y = vectors
    saved = _knn_file(tmp_path, vectors, "IVF2,Flat")
    est = load_classifier(saved, fingerprint=SPACE).estimator
    assert (est.predict(X) == est.__class__(n_neighbors=3, index_factory="IVF2,Flat").fit(X, y).predict(X)).all()
