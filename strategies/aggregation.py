"""FedAvg of the client segments (SplitFed): an example-weighted mean, accumulated as replies come.

The server keeps one float64 running sum instead of every client's final reply, so its memory
does not grow with the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


class FedAvg:
    def __init__(self, initial: ArrayRecord) -> None:
        self.initial = initial
        self.total = 0.0
        self.clients = 0
        self._sums: dict[str, np.ndarray] = {}
        self._ints: dict[str, np.ndarray] = {}

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Add one client's weights (checked against ``initial``: keys, shapes, dtypes)."""
        for key in self.initial:
            array = arrays[key]
            if np.issubdtype(array.dtype, np.floating):
                scaled = weight * array.astype(np.float64)
                self._sums[key] = self._sums[key] + scaled if key in self._sums else scaled
            else:  # BatchNorm's step counter: not an average
                seen = self._ints.get(key)
                if seen is None or int(array.sum()) > int(seen.sum()):
                    self._ints[key] = array
        self.total += weight
        self.clients += 1

    def result(self) -> ArrayRecord | None:
        """The mean; None if no client contributed, the global model if none saw an example."""
        if not self.clients:
            return None
        if not self.total:
            return self.initial
        out = {}
        for key, ref in self.initial.items():
            if key in self._sums:
                out[key] = Array((self._sums[key] / self.total).astype(np.dtype(ref.dtype)))
            else:
                out[key] = Array(self._ints[key])
        return ArrayRecord(out)
