"""Crafting hostile classifier files from real ones: edit the skops schema, swap members,
write zip members whose headers lie about their size."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable

HEADER, MODEL = "featurebank-classifier.json", "model.skops"


def read_parts(path: Path) -> tuple[bytes, dict, dict[str, bytes]]:
    """(header bytes, skops schema, the skops archive's other members) of a classifier file."""
    with zipfile.ZipFile(path) as zf:
        header, model = zf.read(HEADER), zf.read(MODEL)
    with zipfile.ZipFile(io.BytesIO(model)) as inner:
        members = {name: inner.read(name) for name in inner.namelist()}
    return header, json.loads(members.pop("schema.json")), members


def skops_bytes(schema: dict, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        zf.writestr("schema.json", json.dumps(schema))
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def write_classifier(path: Path, header: bytes, model: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(HEADER, header)
        zf.writestr(MODEL, model)
    return path


def edit_schema(src: Path, dst: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(schema, members)`` applied to its skops payload."""
    header, schema, members = read_parts(src)
    edit(schema, members)
    return write_classifier(dst, header, skops_bytes(schema, members))


def json_node(value) -> dict:
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True}


def dict_node(items: dict) -> dict:
    str_type = {"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"}
    return {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode", "content": items,
            "key_types": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode",
                          "content": [str_type] * len(items)}}


def object_node(type_name: str, attrs: dict | None = None, loader: str = "ObjectNode") -> dict:
    module, _, cls = type_name.rpartition(".")
    node = {"__class__": cls, "__module__": module, "__loader__": loader}
    if attrs is not None:
        node["content"] = dict_node(attrs)
    return node


def add_attribute(name: str, node: dict) -> Callable[[dict, dict], None]:
    """An edit that gives the root estimator one more fitted attribute holding ``node``."""
    def edit(schema: dict, members: dict) -> None:
        state = schema["content"]
        state["content"][name] = node
        state["key_types"]["content"].append({"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"})
    return edit


def lying_zip(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip whose members are (name, raw deflate data, declared uncompressed size, crc32):
    the declared size may be anything, which zipfile itself cannot write."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, data, size, crc in members:
        offset = out.tell()
        fname = name.encode()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), size, len(fname), 0))
        out.write(fname)
        out.write(data)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data), size,
                                  len(fname), 0, 0, 0, 0, 0, offset))
        central.write(fname)
    cd = central.getvalue()
    start = out.tell()
    out.write(cd)
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(cd), start, 0))
    return out.getvalue()


def deflate_zeros(n_bytes: int) -> tuple[bytes, int]:
    """Raw deflate stream of ``n_bytes`` zeros (about 1000x smaller) and its crc32."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(64 << 20)
    parts, crc, left = [], 0, n_bytes
    while left:
        chunk = block[: min(left, len(block))]
        parts.append(comp.compress(chunk))
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    parts.append(comp.flush())
    return b"".join(parts), crc


def deflate(data: bytes) -> tuple[bytes, int]:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return comp.compress(data) + comp.flush(), zlib.crc32(data)
