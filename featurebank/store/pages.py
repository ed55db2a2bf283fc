"""Resident pages of the shard mappings: letting go of them after a long pass.

A reader that touches every shard of a large space in an order other than storage order
(``store export``, sorted by key) ends with every page of every shard mapped into its address
space: counted in its RSS, though the kernel can reclaim them. :func:`release_pages` drops
them (``madvise(MADV_DONTNEED)``); the data stays in the page cache and comes back on the next
read. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Iterable

import numpy as np

from featurebank.store.shards import Block

__all__ = ["release_pages", "release_array"]


def _libc_madvise():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _libc_madvise()


def release_pages(blocks: Iterable[Block]) -> int:
    """Drop this process's references to the pages of the shard mappings behind ``blocks``
    (each whole read-only file mapping once, as :func:`~featurebank.store.shards.read_blocks`
    recorded it in ``Block.mapping``). Returns the number of mappings released."""
    if _madvise is None:
        return 0
    done = set()
    for b in blocks:
        if b.mapping is None or b.mapping in done:
            continue
        done.add(b.mapping)
        # a whole PROT_READ file mapping made by read_blocks, never anonymous memory: DONTNEED
        # only unmaps its pages, whose content comes back from the file
        _madvise(b.mapping[0], b.mapping[1], mmap.MADV_DONTNEED)
    return len(done)


def release_array(a) -> bool:
    """:func:`release_pages` for a read-only ``np.memmap`` (the persisted key map read front to
    back by export); any other array is left alone (its memory is the data). True if released."""
    if _madvise is None or not isinstance(a, np.memmap) or a.mode != "r" or a.size == 0:
        return False
    page = mmap.PAGESIZE
    start = a.ctypes.data // page * page
    _madvise(start, a.ctypes.data + a.nbytes - start, mmap.MADV_DONTNEED)
    return True
