"""The one Flower record codec of fed-dplora, shared by `clients/` and `strategies/`:
named float32 numpy arrays <-> `ArrayRecord`."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})


def to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Tensor bytes that travel (serialization headers not counted)."""
    return sum(a.nbytes for a in arrays.values())
