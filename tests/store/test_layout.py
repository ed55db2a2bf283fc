"""The store room's shape: SQL only in catalog.py, each module short enough to read in one sitting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import featurebank.store

ROOM = Path(featurebank.store.__file__).parent

_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|PRAGMA|CREATE\s+TABLE|BEGIN|COMMIT)\b")


def test_sql_is_written_only_in_the_catalog_module():
    offenders = []
    for path in sorted(ROOM.glob("*.py")):
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



def test_each_store_module_reads_in_one_sitting():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ROOM.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 450} == {}
