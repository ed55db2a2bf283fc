"""Opening image files safely: the one function every reader of an image file goes through.

:func:`open_image_file` is used by the decoder (:func:`~featurebank.decoding.decode_image`),
by content hashing (the store's ``hash_files`` and the store-less embed path) and by any other
code that reads the bytes of an image file, so that every path refuses the same files with the
same one-line reason. It imports only the standard library, so the store can use it without
pulling in Pillow.

What it refuses, and why:

* anything that is not a **regular file** once symbolic links are resolved: a FIFO named
  ``x.jpg`` would block ``open()`` forever, a link to ``/dev/zero`` would be read forever, a
  socket or device is never an image. The type is checked with ``os.stat`` before opening
  (opening some devices has side effects), the file is opened with ``O_NONBLOCK`` (so a FIFO
  swapped in after the check cannot block the open) and the opened descriptor is checked again
  with ``os.fstat`` (what is read is what was checked);
* a **virtual file** that says it is empty but is not (``/proc`` and ``/sys`` files report
  size 0 and produce content when read, e.g. ``/proc/self/environ``): not an image file,
  and reading it to the end is not bounded by its size;
* an **empty** file;
* a file **larger than** :data:`MAX_FILE_BYTES` (2 GiB): every image Pillow opens by default
  (up to ``2 * PIL.Image.MAX_IMAGE_PIXELS``, 179 million pixels) fits in that uncompressed in
  8 or 16 bits per channel, so a larger file is not an image featurebank would decode; the
  cap keeps a huge sparse file from being hashed for minutes.

Messages are one line, start with the path, and never quote the file's content.
"""

from __future__ import annotations

import errno
import io
import os
import stat

from featurebank.errors import ImageDecodeError

__all__ = ["MAX_FILE_BYTES", "open_image_file"]

#: Largest image file accepted, in bytes (see the module docstring).
MAX_FILE_BYTES = 2 * 1024**3

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_image_file(path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES) -> io.BufferedReader:
    """Open the image file ``path`` for reading in binary mode, after checking that it is a
    regular, non-empty file of at most ``max_bytes`` bytes (symbolic links are followed).

    Returns an open binary file object (the caller closes it; use it in a ``with``).

    Raises
    ------
    ImageDecodeError
        with a one-line reason naming ``path``: no such file, broken link, symbolic link
        loop, permission denied, a directory, not a regular file (FIFO, socket, device),
        a virtual file (``/proc``, ``/sys``), empty, too large.

    Example
    -------
    >>> with open_image_file("photo.jpg") as fh:          # doctest: +SKIP
    ...     head = fh.read(16)
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageDecodeError(f"{path}: broken symbolic link (its target does not exist)") from None
        raise ImageDecodeError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageDecodeError(f"{path}: permission denied (a folder on the path is not searchable)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise ImageDecodeError(_os_reason(path, exc)) from None
    _check_type(path, st)
    try:
        fd = os.open(path, _FLAGS)
    except PermissionError:
        raise ImageDecodeError(f"{path}: permission denied (the file is not readable by this user)") from None
    except OSError as exc:
        raise ImageDecodeError(_os_reason(path, exc)) from None
    try:
        st = os.fstat(fd)  # the file actually opened: it may have been replaced since the stat
        _check_type(path, st)
        if st.st_size == 0:
            # a virtual file (procfs, sysfs) reports size 0 and still has content
            if os.read(fd, 1):
                raise ImageDecodeError(
                    f"{path}: not a regular image file (a virtual file, e.g. in /proc or /sys, whose size "
                    "is not known in advance)"
                )
            raise ImageDecodeError(f"{path}: file is empty (0 bytes)")
        if st.st_size > max_bytes:
            raise ImageDecodeError(
                f"{path}: file is {st.st_size:,} bytes, over the limit of {max_bytes:,} for an image file"
            )
        os.lseek(fd, 0, os.SEEK_SET)
        return os.fdopen(fd, "rb")
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise ImageDecodeError(_os_reason(path, exc)) from None
        raise


def _check_type(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        # opening a FIFO would block, reading a device could go on forever
        raise ImageDecodeError(f"{path}: not a regular file (a pipe, socket or device)")


def _os_reason(path: str, exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code == errno.ELOOP:
        return f"{path}: symbolic link loop (too many levels of symbolic links)"
    if code == errno.ENAMETOOLONG:
        return f"{path}: file name too long"
    if isinstance(exc, ValueError):
        return f"{path}: not a valid file name ({exc})"
    return f"{path}: cannot open ({getattr(exc, 'strerror', None) or type(exc).__name__})"
