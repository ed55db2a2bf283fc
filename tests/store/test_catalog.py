"""The catalog is the only place that speaks SQL; its health and counts through the store's API."""

from __future__ import annotations

import ast
import re
import sqlite3
from pathlib import Path

from store_helpers import FP_A, make_keys

import featurebank.store
from featurebank.store import open_store

_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|PRAGMA|CREATE\s+TABLE|BEGIN|COMMIT)\b")


def test_sql_is_written_only_in_the_catalog_module():
    room = Path(featurebank.store.__file__).parent
    offenders = []
    for path in sorted(room.glob("*.py")):
        if path.name == "catalog.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if _SQL.search(node.value):
                    offenders.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
            if isinstance(node, ast.Attribute) and node.attr in ("execute", "executemany", "query", "query_in"):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}(...)")
    assert offenders == []


def test_info_counts_catalog_rows(store, tmp_path):
    store.record_items([tmp_path / "a.jpg", tmp_path / "b.jpg"], make_keys(2), ["x", None])
    store.record_failures(FP_A, [{"path": tmp_path / "c.jpg", "reason": "truncated"}])
    store.hash_files([Path(featurebank.store.__file__)])
    info = store.info()
    assert (info["n_stat_cache"], info["n_items"], info["n_failures"]) == (1, 2, 1)
    assert [(f.path, f.reason, f.attempts) for f in store.failures(FP_A)] == [(str(tmp_path / "c.jpg"), "truncated", 1)]
    assert [(i.path, i.label) for i in store.items()] == [(str(tmp_path / "a.jpg"), "x"), (str(tmp_path / "b.jpg"), None)]


def test_verify_reports_a_damaged_catalog(tmp_path):
    s = open_store(tmp_path / "s")
    s.record_items([f"/photos/{i}.jpg" for i in range(2000)], make_keys(2000))
    s.close()
    path = tmp_path / "s" / "catalog.sqlite"
    con = sqlite3.connect(path)
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    data[9 * page : 9 * page + 8] = b"\xab" * 8  # the header of a b-tree page of the items table
    path.write_bytes(bytes(data))
    rep = open_store(tmp_path / "s").verify()
    assert rep.problems == [f"{path}: database disk image is malformed"]
