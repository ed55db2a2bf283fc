"""featurebank._faiss_errors: the one reading of FAISS's RuntimeError messages, on errors
raised by the real FAISS."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from featurebank._faiss_errors import faiss_reason


def _raised(call) -> RuntimeError:
    with pytest.raises(RuntimeError) as info:
        call()
    return info.value


def test_location_and_assertion_are_dropped_from_real_faiss_errors():
    parse = _raised(lambda: faiss.index_factory(8, "NoSuchIndex"))
    assert str(parse).startswith("Error in ") and ".cpp:" in str(parse)  # what FAISS says, for the record
    assert faiss_reason(parse) == "could not parse index string NoSuchIndex"
    train = _raised(lambda: faiss.index_factory(8, "IVF16,Flat").train(np.zeros((3, 8), np.float32)))
    assert faiss_reason(train) == "Number of training points (3) should be at least as large as number of clusters (16)"
    remove = _raised(lambda: faiss.index_factory(8, "HNSW8").remove_ids(np.array([1], dtype=np.int64)))
    assert faiss_reason(remove) == "remove_ids not implemented for this type of index"


def test_other_messages_pass_through_and_empty_ones_name_the_type():
    assert faiss_reason(RuntimeError("  a plain\n message ")) == "a plain message"
    assert faiss_reason(RuntimeError("")) == "RuntimeError"
    assert faiss_reason(RuntimeError("could not parse index string 'Foo'")) == "could not parse index string 'Foo'"
