"""Bounded HTTP load on the embedding service vs the offline batch path (the peer), same run.

    python benchmarks/service_load.py [--model lite0.onnx] [--requests 128] [--concurrency 1 8 32 64]

The service (``featurebank serve``, a separate process, real efficientnet_lite0 export, uint8
input) is loaded on loopback by an asyncio httpx client: at each concurrency level, a fixed
number of requests, one JPEG each, POSTed as the raw body. The content-hash cache is turned
off (``--cache-size 0``) so that every request pays decode and inference. The peer is what
``featurebank embed`` does without HTTP: the same JPEG bytes decoded with the same
``decode_image(mode="fast")`` in a thread pool running one batch ahead, and
``ModelRunner.run`` on batches of 32, same thread counts. It is measured before the first
level and after each one (the machine is shared); a level is compared with the mean of the
peer runs on either side of it.

Reported per level: throughput (images/s), p50/p99 latency, mean batch size the service
formed (from /metrics), throughput / offline throughput, and CPU time per image of the
server, of the load client and of the peer (robust to other load on a shared machine: the
client shares the cores with the server, which the peer does not have to). Peak RSS (VmHWM) of the server
process shows memory stays bounded. Prints JSON (and writes it with --json-out).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402


def real_jpegs(n: int) -> list[bytes]:
    """n distinct JPEGs (~0.1-0.3 Mpx) cut from scikit-image's real photos."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as data

    photos = [getattr(data, name)()[..., :3] for name in
              ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")]
    photos.append(data.stereo_motorcycle()[0])
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        j = i // len(photos)
        h, w = img.shape[:2]
        ch, cw = int(h * 0.8), int(w * 0.8)
        y, x = (j * 13) % (h - ch + 1), (j * 29) % (w - cw + 1)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img[y:y + ch, x:x + cw])).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    assert len(set(out)) == n
    return out


def offline_throughput(model: str, images: list[bytes], total: int, batch: int, threads: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode (thread pool, one batch ahead) + ModelRunner.run on batches."""
    from featurebank.decoding import decode_image, to_model_input
    from featurebank.embedder.session import open_model

    runner = open_model(model, device="cpu", threads=threads)
    pre, card = runner.card.preprocessing, runner.card
    work = [images[i % len(images)] for i in range(total)]
    batches = [work[i:i + batch] for i in range(0, total, batch)]

    def decode(chunk):
        return np.stack([decode_image(b, pre, mode="fast") for b in chunk])

    runner.run(to_model_input(decode(batches[0]), card))  # warm-up
    with ThreadPoolExecutor(threads) as pool:
        t0, cpu0 = time.perf_counter(), time.process_time()
        # split each batch over the pool's threads, and keep the next batch decoding
        def submit(chunk):
            step = -(-len(chunk) // threads)
            return [pool.submit(decode, chunk[k:k + step]) for k in range(0, len(chunk), step)]

        pending = submit(batches[0])
        for i in range(len(batches)):
            pixels = np.concatenate([f.result() for f in pending])
            if i + 1 < len(batches):
                pending = submit(batches[i + 1])
            runner.run(to_model_input(pixels, card))
        return total / (time.perf_counter() - t0), (time.process_time() - cpu0) * 1000 / total


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, images: list[bytes], requests: int, concurrency: int, server_pid: int) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        before = (await client.get("/metrics")).text

        async def worker():
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                r = await client.post("/v1/embed", content=images[i % len(images)],
                                      headers={"Content-Type": "image/jpeg", "Accept": "application/octet-stream"})
                latencies.append(time.perf_counter() - t)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        t0, cpu0, server0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        client_cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server_pid) - server0
        after = (await client.get("/metrics")).text
    batches = metric(after, "featurebank_batch_size_count") - metric(before, "featurebank_batch_size_count")
    imgs = metric(after, "featurebank_batch_size_sum") - metric(before, "featurebank_batch_size_sum")
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency, "requests": requests, "statuses": statuses,
        "images_per_s": round(requests / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_batch": round(imgs / batches, 2) if batches else None,
        "server_cpu_ms_per_image": round(server_cpu * 1000 / requests, 1),
        "client_cpu_ms_per_image": round(client_cpu * 1000 / requests, 1),
    }


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="featurebank ONNX model (default: export efficientnet_lite0, uint8)")
    ap.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--images", type=int, default=64, help="distinct JPEGs cycled through")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime and decode threads (default: cores)")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    threads = a.threads or len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            from featurebank.export.onnx_export import export_backbone

            model = str(Path(tmp) / "efficientnet_lite0.onnx")
            export_backbone("efficientnet_lite0", model, input_format="uint8")
        images = real_jpegs(a.images)
        offline_total = max(a.requests, 4 * a.max_batch)
        offline_runs = [offline_throughput(model, images, offline_total, a.max_batch, threads)]

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "featurebank", "serve", "--model", model, "--port", str(port), "--device", "cpu",
               "--cache-size", "0", "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms),
               "--threads", str(threads), "--decode-workers", str(threads), "--log-level", "warning"]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {server.stderr.read()}")
                time.sleep(0.2)
            rss_ready = peak_rss_mib(server.pid)
            asyncio.run(load(url, images, 16, 4, server.pid))  # warm the connection pool and the code paths
            levels = []
            for c in a.concurrency:
                result = asyncio.run(load(url, images, a.requests, c, server.pid))
                result["server_peak_rss_mib"] = peak_rss_mib(server.pid)
                # the machine is shared: the peer is measured right after each level, and each
                # level is compared with the mean of the peer runs just before and after it
                offline_runs.append(offline_throughput(model, images, offline_total, a.max_batch, threads))
                result["offline_images_per_s"] = round((offline_runs[-2][0] + offline_runs[-1][0]) / 2, 1)
                result["offline_cpu_ms_per_image"] = round((offline_runs[-2][1] + offline_runs[-1][1]) / 2, 1)
                result["ratio_vs_offline"] = round(result["images_per_s"] / result["offline_images_per_s"], 3)
                levels.append(result)
                print(json.dumps(result), file=sys.stderr)
        finally:
            server.terminate()
            server.wait(timeout=60)

    versions = {}
    for dist in ("fastapi", "starlette", "uvicorn", "httpx"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info = machine_info()
    info["versions"].update(versions)
    out = {
        "benchmark": "service_load",
        "machine": info,
        "settings": {"model": Path(model).name if a.model else "efficientnet_lite0 (uint8 input, exported)",
                     "requests_per_level": a.requests, "distinct_images": a.images, "max_batch": a.max_batch,
                     "max_wait_ms": a.max_wait_ms, "threads": threads, "decode_mode": "fast", "cache": "off",
                     "response": "application/octet-stream"},
        "offline_images_per_s_runs": [round(v, 1) for v, _ in offline_runs],
        "server_rss_mib": {"ready": rss_ready, "peak": max(r["server_peak_rss_mib"] for r in levels)},
        "levels": levels,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
