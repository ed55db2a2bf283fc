"""FAISS's bare ``RuntimeError`` messages, reduced to the sentence a user can act on.

Shared by the classifiers and the search room (neither is upstream of the other). FAISS
messages read ``Error in <C++ signature> at <file>:<line>: <reason>``, where an assertion's
reason is ``Error: '<condition>' failed: <sentence>``. Callers raise a ``ValueError`` of
their own that names the argument at fault (``n_samples``, the factory string) and add
:func:`faiss_reason` to it.

>>> faiss_reason(RuntimeError("Error in void faiss::Clustering::train_encoded(...) at "
...     "/faiss/Clustering.cpp:66: Error: 'nx >= k' failed: Number of training points (3) should "
...     "be at least as large as number of clusters (16)"))
'Number of training points (3) should be at least as large as number of clusters (16)'
>>> faiss_reason(RuntimeError("Error in faiss::index_factory_sub(int, std::string) at "
...     "/faiss/index_factory.cpp:1228: could not parse index string Foo"))
'could not parse index string Foo'
"""

from __future__ import annotations

import re

__all__ = ["faiss_reason"]

_LOCATION = re.compile(r"^Error in .*? at \S+?:\d+: ")
_ASSERTION = re.compile(r"^Error: '.*?' failed: ")


def faiss_reason(exc: BaseException) -> str:
    """The reason in a FAISS exception's message, without the C++ location; the
    exception's type name when the message is empty."""
    text = " ".join(str(exc).split())
    text = _ASSERTION.sub("", _LOCATION.sub("", text, count=1), count=1)
    return text.strip() or type(exc).__name__
