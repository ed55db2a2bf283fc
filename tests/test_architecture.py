"""The room table of STYLE.md holds for every import in featurebank/ (an AST walk, no imports run).

Each module belongs to one room; a room imports only the rooms upstream of it listed in
ROOM_MAY_IMPORT, never the external packages listed in MUST_NEVER_IMPORT, and no two rooms
import each other (directly or through others). Every ``import`` counts: module level and inside
functions, absolute and relative. A failure names the file, the line and the rule.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "featurebank"

#: Room of each module, by the first part of its name below featurebank. Modules whose
#: name starts with "_" (errors.py, _atomic.py, _files.py, _validation.py ...) are the shared
#: leaves. ``featurebank/__init__.py`` is the lazy map of public names: it may name anything.
JOINS = ("workflow", "embed_into_store", "image_embedder")
ROOMS = ("leaf", "artifact", "decoding", "export", "embedder", "store", "classifiers", "search", "joins",
         "curation", "finetune", "studies", "distributed", "cli", "service")

#: Data flows one way (STYLE.md): artifact -> decoding -> export / embedder -> store ->
#: classifiers / search -> joins -> studies -> CLI / service, distributed beside the joins.
#: The "may import" column of the table, in rooms.
ROOM_MAY_IMPORT: dict[str, set[str]] = {
    "leaf": {"leaf"},
    "artifact": {"leaf"},
    "decoding": {"leaf", "artifact"},
    "export": {"leaf", "artifact", "decoding"},
    "embedder": {"leaf", "artifact", "decoding"},
    "store": {"leaf", "artifact"},
    "classifiers": {"leaf", "artifact", "store"},
    "search": {"leaf", "artifact", "store"},
    "joins": {"leaf", "artifact", "decoding", "export", "embedder", "store", "classifiers", "search"},
    # fine-tuning is a join of its own (the one join that may import torch)
    "finetune": {"leaf", "artifact", "decoding", "export", "embedder", "store", "classifiers", "search", "joins"},
    # the data tools (audit, select, map) are a join of their own, beside fine-tuning
    "curation": {"leaf", "artifact", "decoding", "embedder", "store", "classifiers", "search", "joins"},
    "studies": {"leaf", "artifact", "decoding", "export", "embedder", "store", "classifiers", "search", "joins",
                "finetune"},
    "distributed": {"leaf", "artifact", "decoding", "embedder", "store", "joins"},
    "service": {"leaf", "artifact", "decoding", "export", "embedder", "store", "classifiers", "search", "joins",
                "curation", "finetune", "studies"},
    "cli": {"leaf", "artifact", "decoding", "export", "embedder", "store", "classifiers", "search", "joins",
            "curation", "finetune", "studies", "distributed", "service"},
}

TORCH = {"torch", "timm", "torchvision"}
HTTP = {"fastapi", "starlette", "uvicorn", "httpx", "requests", "aiohttp"}
#: External packages each room must never import (the table's last column, and the one home
#: of each heavy dependency: torch in export and fine-tuning, argparse in the CLI, HTTP in the service, Ray in
#: distributed).
MUST_NEVER_IMPORT: dict[str, set[str]] = {
    room: ({"argparse"} if room != "cli" else set())
    | (HTTP if room != "service" else set())
    | ({"ray"} if room != "distributed" else set())
    | (TORCH if room not in ("export", "finetune") else set())
    for room in ROOMS
}
MUST_NEVER_IMPORT["decoding"] |= {"onnxruntime"}
MUST_NEVER_IMPORT["store"] |= {"onnxruntime"}
MUST_NEVER_IMPORT["classifiers"] |= {"PIL"}  # no images in the classifiers room
#: The shared leaves and the artifact may import only these outside the standard library.
ONLY_EXTERNAL = {"leaf": {"numpy"}, "artifact": {"onnx"}}
#: The embedder may import torch for an optional GPU decode, lazily (inside a function) only.
LAZY_ALLOWED = {("embedder", "torch"), ("embedder", "torchvision")}


def room_of(module: str) -> str | None:
    """The room of a featurebank module name, "top" for the package itself, None outside."""
    parts = module.split(".")
    if parts[0] != "featurebank":
        return None
    if len(parts) == 1:
        return "top"
    first = parts[1]
    if first == "__main__":
        return "cli"
    if first == "errors" or first.startswith("_"):
        return "leaf"
    if first in JOINS:
        return "joins"
    if first in ROOMS:
        return first
    raise AssertionError(f"featurebank.{first} is in no room of the table: add it to tests/test_architecture.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


@dataclass(frozen=True)
class Import:
    path: str  # featurebank/x/y.py
    line: int
    importer: str  # module name
    target: str  # imported module name, absolute
    names: tuple[str, ...]  # for `from target import names`
    in_function: bool


class _Collector(ast.NodeVisitor):
    def __init__(self, path: str, module: str, is_package: bool) -> None:
        self.path, self.module, self.is_package = path, module, is_package
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, node: ast.AST, target: str, names: tuple[str, ...] = ()) -> None:
        self.found.append(Import(self.path, node.lineno, self.module, target, names, self.depth > 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        plain = []
        for alias in node.names:  # `from featurebank import errors`: the submodule is what is imported
            sub = f"{target}.{alias.name}"
            if target.split(".")[0] == "featurebank" and _is_module(sub):
                self._add(node, sub)
            else:
                plain.append(alias.name)
        if plain:
            self._add(node, target, tuple(plain))


def imports_of(source: str, path: str, module: str, is_package: bool = False) -> list[Import]:
    collector = _Collector(path, module, is_package)
    collector.visit(ast.parse(source, path))
    return collector.found


def all_imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += imports_of(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)),
                            _module_name(path), path.name == "__init__.py")
    return found


def violations(imports: list[Import]) -> list[str]:
    """One line per import that breaks the table: "path:line: rule"."""
    out = []
    for imp in imports:
        src = room_of(imp.importer)
        if src == "top":
            continue  # the lazy map of public names
        dst = room_of(imp.target)
        where = f"{imp.path}:{imp.line}"
        if dst == "top":
            # `from featurebank import __version__` is fine; a public name through the lazy map would
            # hide which room is imported
            for name in set(imp.names) - {"__version__"}:
                out.append(f"{where}: {src} imports featurebank.{name} through the top-level lazy map; import it "
                           "from its room")
        elif dst is not None:
            if dst != src and dst not in ROOM_MAY_IMPORT[src]:
                out.append(f"{where}: {src} must not import {dst} ({imp.target}): "
                           f"{src} may import only {', '.join(sorted(ROOM_MAY_IMPORT[src]))}")
        else:
            top = imp.target.split(".")[0]
            if top in MUST_NEVER_IMPORT[src] and not ((src, top) in LAZY_ALLOWED and imp.in_function):
                lazy = " at module level (only lazily, inside a function)" if (src, top) in LAZY_ALLOWED else ""
                out.append(f"{where}: {src} must never import {top}{lazy}")
            elif src in ONLY_EXTERNAL and top not in sys.stdlib_module_names and top not in ONLY_EXTERNAL[src]:
                out.append(f"{where}: {src} imports {top}: it may import only the standard library and "
                           f"{', '.join(sorted(ONLY_EXTERNAL[src]))}")
    return out


def room_cycles(imports: list[Import]) -> list[str]:
    """Cycles in the graph of rooms (Tarjan's strongly connected components), each with one
    import per edge as evidence."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        src, dst = room_of(imp.importer), room_of(imp.target)
        if src not in (None, "top") and dst not in (None, "top") and src != dst:
            edges.setdefault(src, {}).setdefault(dst, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for room in sorted(edges):
        if room not in index:
            connect(room)
    out = []
    for component in components:
        if len(component) > 1:
            members = set(component)
            evidence = [f"{imp.path}:{imp.line} ({src} -> {dst})" for src in sorted(members)
                        for dst, imp in sorted(edges.get(src, {}).items()) if dst in members]
            out.append(f"import cycle between rooms {', '.join(sorted(members))}: {'; '.join(evidence)}")
    return out


def _found() -> list[str]:
    imports = all_imports()
    return violations(imports) + room_cycles(imports)


def test_the_walk_sees_every_kind_of_import():
    source = (
        "import numpy as np\n"
        "from featurebank import errors, __version__\n"
        "from . import shards\n"
        "from ..artifact import read_model_card\n"
        "from .catalog import Catalog\n"
        "def f():\n"
        "    import torch\n"
        "    from featurebank.embedder import session\n"
        "class C:\n"
        "    async def g(self):\n"
        "        import ray.data\n"
    )
    got = [(i.line, i.target, i.names, i.in_function)
           for i in imports_of(source, "featurebank/store/x.py", "featurebank.store.x")]
    assert got == [
        (1, "numpy", (), False),
        (2, "featurebank.errors", (), False),  # a submodule named in `from featurebank import ...`
        (2, "featurebank", ("__version__",), False),
        (3, "featurebank.store.shards", (), False),
        (4, "featurebank.artifact", ("read_model_card",), False),
        (5, "featurebank.store.catalog", ("Catalog",), False),
        (7, "torch", (), True),
        (8, "featurebank.embedder.session", (), True),
        (11, "ray.data", (), True),
    ]
    # in a package's __init__.py, "." is the package itself
    init = imports_of("from .store import open_store\n", "featurebank/store/__init__.py", "featurebank.store", True)
    assert init[0].target == "featurebank.store.store"
    # the real tree: a function-level import is seen as one
    lazy = [i for i in all_imports() if i.path == "featurebank/export/cache.py"
            and i.target == "featurebank.export.onnx_export"]
    assert lazy and all(i.in_function for i in lazy)


def test_rules_catch_what_they_should():
    fake = [
        Import("featurebank/embedder/x.py", 3, "featurebank.embedder.x", "featurebank.store.store", (), False),
        Import("featurebank/store/x.py", 4, "featurebank.store.x", "onnxruntime", (), True),
        Import("featurebank/embedder/x.py", 5, "featurebank.embedder.x", "torch", (), False),
        Import("featurebank/embedder/x.py", 6, "featurebank.embedder.x", "torch", (), True),  # lazy: allowed
        Import("featurebank/workflow.py", 7, "featurebank.workflow", "argparse", (), False),
        Import("featurebank/search/x.py", 8, "featurebank.search.x", "featurebank", ("open_store",), False),
        Import("featurebank/search/x.py", 9, "featurebank.search.x", "featurebank", ("__version__",), False),
        Import("featurebank/_x.py", 10, "featurebank._x", "pyarrow", (), False),
        Import("featurebank/cli/x.py", 11, "featurebank.cli.x", "featurebank.service.app", (), False),
    ]
    assert violations(fake) == [
        "featurebank/embedder/x.py:3: embedder must not import store (featurebank.store.store): embedder may import "
        "only artifact, decoding, leaf",
        "featurebank/store/x.py:4: store must never import onnxruntime",
        "featurebank/embedder/x.py:5: embedder must never import torch at module level (only lazily, inside a "
        "function)",
        "featurebank/workflow.py:7: joins must never import argparse",
        "featurebank/search/x.py:8: search imports featurebank.open_store through the top-level lazy map; import it "
        "from its room",
        "featurebank/_x.py:10: leaf imports pyarrow: it may import only the standard library and numpy",
    ]
    cycle = [Import("featurebank/cli/a.py", 1, "featurebank.cli.a", "featurebank.distributed.b", (), False),
             Import("featurebank/distributed/b.py", 2, "featurebank.distributed.b", "featurebank.cli.a", (), True)]
    assert room_cycles(cycle) == ["import cycle between rooms cli, distributed: featurebank/cli/a.py:1 (cli -> "
                                  "distributed); featurebank/distributed/b.py:2 (distributed -> cli)"]


def test_no_room_imports_against_the_table():
    found = _found()
    assert found == [], "imports against STYLE.md's room table:\n" + "\n".join(found)
