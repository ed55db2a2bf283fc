"""Writing a study's outputs: JSON and PNG written atomically, plain-text tables."""

from __future__ import annotations

import io
import json
import os
import platform
from pathlib import Path
from typing import Any

from featurebank._atomic import write_bytes_atomic

__all__ = ["write_json", "write_figure", "format_table", "environment"]


def write_json(path: Path, payload: Any) -> Path:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path


def write_figure(path: Path, fig: Any) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return path


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded with every study."""
    import numpy
    import onnxruntime
    import sklearn

    from featurebank import __version__

    return {"featurebank": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "scikit-learn": sklearn.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count()}
