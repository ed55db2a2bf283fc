"""Dynamic batching: concurrent requests' images are gathered into model batches.

One collector task takes images off an asyncio queue; a batch closes when it holds
``max_batch`` images or when its first image has waited ``max_wait_s`` since it was queued,
whichever comes first. Batches run one at a time in a dedicated inference thread
(onnxruntime releases the GIL and already uses every core for one batch, so two batches at
once would only contend). While a batch runs, new images queue up; they have waited past
their deadline by then, so the next batch is closed at once with all of them: under load
batches fill up by themselves. A batch also closes at once when nothing else is on its way
(``upcoming()`` is 0: no image is being decoded), so a lone request does not wait at all.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from featurebank.service.metrics import Metrics

__all__ = ["Batcher"]


@dataclass
class _Item:
    pixels: np.ndarray  # (H, W, C) uint8
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers single images into batches for ``infer``.

    Parameters
    ----------
    infer : callable taking an ndarray of shape (n, H, W, C), uint8, and returning an ndarray
        of shape (n, dim), float32; called in the inference thread.
    max_batch : images per batch at most
    max_wait_s : longest time the first image of a batch waits for company
    metrics : where batch sizes and the queue / infer stage times are recorded
    upcoming : callable giving how many images may still join soon (being decoded); None: unknown
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_wait_s: float,
                 metrics: Metrics, upcoming: Callable[[], int] | None = None) -> None:
        self._infer = infer
        self._upcoming = upcoming
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._metrics = metrics
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fb-infer")
        self._task = asyncio.create_task(self._run(), name="featurebank-batcher")

    async def stop(self) -> None:
        """Run what is queued, then stop (the HTTP server has stopped taking requests)."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._pool.shutdown(wait=True)
        self._task = None

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Vector of one decoded image: (H, W, C) uint8 in, (dim,) float32 out."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(pixels, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = first.queued + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or (self._upcoming is not None and self._upcoming() == 0):
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if item is None:
                    stopping = True  # finish this batch and whatever was queued before the stop
                    break
                batch.append(item)
            await self._run_batch(loop, batch)
        # drain: images queued before stop() still get their answer
        rest = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                rest.append(item)
        for start in range(0, len(rest), self.max_batch):
            await self._run_batch(loop, rest[start:start + self.max_batch])

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        # requests that timed out or went away do not cost inference
        batch = [it for it in batch if not it.future.done()]
        if not batch:
            return
        started = time.perf_counter()
        for it in batch:
            self._metrics.stage.labels(stage="queue").observe(started - it.queued)
        self._metrics.batch_size.observe(len(batch))
        try:
            vectors = await loop.run_in_executor(self._pool, self._infer, np.stack([it.pixels for it in batch]))
        except Exception as exc:  # the model failed: every waiting request learns why
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        self._metrics.stage.labels(stage="infer").observe(time.perf_counter() - started)
        self._metrics.images.inc(len(batch))
        for it, vec in zip(batch, vectors):
            if not it.future.done():
                it.future.set_result(vec)
