"""Which integer dot-product instructions this CPU has: the class of INT8 kernels it runs.

onnxruntime's CPU kernels (MLAS) for 8-bit matrix products pick their code path from the
CPU's instruction set, and the paths do not compute the same thing:

* ``"amx"`` (``amx_int8``, Intel Sapphire Rapids and later): tile instructions, exact int32
  accumulation;
* ``"avx512-vnni"`` (``avx512_vnni``: Intel Cascade Lake and later, AMD Zen 4 and later) and
  ``"avx-vnni"`` (``avx_vnni`` without AVX-512 VNNI: Intel Alder Lake and later client cores):
  ``vpdpbusd`` multiplies uint8 by int8 and accumulates in int32, exactly;
* ``"avx2"`` (AVX2 without any VNNI, which includes AVX-512 cores without VNNI such as
  Skylake-SP): ``vpmaddubsw`` adds two uint8 x int8 products into a *saturating* int16, so
  8-bit activations times 8-bit weights can clip (255 * 127 * 2 > 32767);
* ``"other"``: anything else (no AVX2, another architecture, or flags that cannot be read).

A quantized model's vectors therefore depend on the class of the CPU that runs it, which is why
an INT8 model card records the class it was measured on (see
:mod:`featurebank.export.quantize`). Detection reads the ``flags`` line of ``/proc/cpuinfo``
(Linux); elsewhere the answer is the conservative ``"other"``. Standard library only.

>>> kernel_class_of_flags("fpu sse2 avx avx2 fma")
'avx2'
>>> kernel_class_of_flags("avx2 avx512f avx512bw avx512_vnni")
'avx512-vnni'
"""

from __future__ import annotations

import functools

__all__ = ["KERNEL_CLASSES", "cpu_flags", "cpu_kernel_class", "kernel_class_of_flags", "flags_of_cpuinfo"]

#: Every class :func:`cpu_kernel_class` may answer, fastest integer path first.
KERNEL_CLASSES = ("amx", "avx512-vnni", "avx-vnni", "avx2", "other")

CPUINFO = "/proc/cpuinfo"


def flags_of_cpuinfo(text: str) -> frozenset[str]:
    """The CPU flags named in a ``/proc/cpuinfo`` text (the first ``flags`` line; x86 Linux).

    ARM kernels call the line ``Features``; it is read too, so an ARM text gives its
    features (and :func:`kernel_class_of_flags` then answers ``"other"``).
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def kernel_class_of_flags(flags: str | frozenset[str] | set[str]) -> str:
    """The INT8 kernel class (one of :data:`KERNEL_CLASSES`) of a set of CPU flags.

    ``flags`` is a whitespace-separated string (``/proc/cpuinfo``'s ``flags`` value) or a set.
    """
    names = set(flags.split()) if isinstance(flags, str) else set(flags)
    if "amx_int8" in names and "amx_tile" in names:
        return "amx"
    if "avx512_vnni" in names:
        return "avx512-vnni"
    if "avx_vnni" in names:
        return "avx-vnni"
    if "avx2" in names:
        return "avx2"
    return "other"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags; empty where ``/proc/cpuinfo`` cannot be read (not Linux)."""
    try:
        with open(CPUINFO, encoding="ascii", errors="replace") as f:
            return flags_of_cpuinfo(f.read())
    except OSError:
        return frozenset()


def cpu_kernel_class() -> str:
    """The INT8 kernel class of the CPU this process runs on (``"other"`` when unknown)."""
    return kernel_class_of_flags(cpu_flags())
