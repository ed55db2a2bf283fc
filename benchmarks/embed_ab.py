"""Embed throughput of two revisions of featurebank, interleaved, on the same images.

For a refactor that must not cost speed: the same folder of camera-sized real JPEGs
(``embed_throughput.make_photos``), the same exported model (efficientnet_lite0, uint8 input,
exported once by the *after* tree), embedded into a fresh store by each revision in turn, A B A
B ..., each run in a fresh process (imports and session creation are not timed; the
``embed_images`` call is). Reports the median images/s of each and the ratio after / before.

    python benchmarks/embed_ab.py --before 209dbaf [--after WORKTREE] [--runs 5] [--images 192]

``--before`` is a git revision, checked out into a temporary worktree; ``--after`` defaults to
this checkout's working tree. Each child puts its tree first on ``sys.path``, so the revisions'
code is what runs, with the same installed dependencies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine_info  # noqa: E402

CHILD = r"""
import sys, time, shutil
sys.path.insert(0, sys.argv[1])
import featurebank as fb
assert fb.__file__.startswith(sys.argv[1]), fb.__file__
folder, model, store = sys.argv[2:5]
fb.embed_images(folder, model, store=store + "-warm", progress=False, return_vectors=False)  # session, threads, page cache
shutil.rmtree(store + "-warm")
t0 = time.perf_counter()
emb = fb.embed_images(folder, model, store=store, progress=False, return_vectors=False)
dt = time.perf_counter() - t0
r = emb.report
assert r.failed == 0 and r.embedded + r.duplicates == r.total, r.summary()
print(r.total / dt)
"""


def run_child(tree: Path, folder: Path, model: Path, store: Path) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(folder), str(model), str(store)],
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise SystemExit(f"child for {tree} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare against (e.g. the commit before a refactor)")
    ap.add_argument("--after", default=str(HERE.parent), help="tree of the new code (default: this checkout)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each revision, interleaved (default: 5)")
    ap.add_argument("--images", type=int, default=192, help="camera-sized JPEGs in the folder (default: 192)")
    ap.add_argument("--out", default=str(HERE / "results" / "embed_ab.json"), help="JSON result file")
    args = ap.parse_args()

    from embed_throughput import make_photos

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        try:
            after = Path(args.after).resolve()
            folder = tmp / "photos"
            make_photos(folder, args.images)
            model = tmp / "lite0-uint8.onnx"
            subprocess.run([sys.executable, "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); from featurebank.export.onnx_export import "
                            "export_backbone; export_backbone('efficientnet_lite0', sys.argv[2], input_format='uint8')",
                            str(after), str(model)], check=True, capture_output=True)
            speeds: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(args.runs):
                for name, tree in (("before", before), ("after", after)) if i % 2 == 0 else (("after", after), ("before", before)):
                    v = run_child(tree, folder, model, tmp / f"store-{name}-{i}")
                    speeds[name].append(v)
                    print(f"run {i + 1}/{args.runs} {name:6s} {v:7.1f} images/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    result = {
        "benchmark": "embed_ab",
        "before": args.before,
        "after": subprocess.run(["git", "-C", str(after), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() + " (working tree)",
        "images": args.images,
        "runs": args.runs,
        "images_per_s": speeds,
        "median_images_per_s": med,
        "after_over_before": round(med["after"] / med["before"], 3),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"median before {med['before']:.1f}, after {med['after']:.1f} images/s: after/before = "
          f"{result['after_over_before']:.3f}")


if __name__ == "__main__":
    main()
