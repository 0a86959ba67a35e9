"""Aggregation of the client segments (SplitFed), and the bound on one client's update.

``aggregation`` (run config) picks how the clients' final weights become the next round's
global ones:

  fedavg        the mean weighted by the examples the SERVER COUNTED for each client this
                round (rows of activations it received), never by a number the client claims.
                One float64 running sum: memory does not grow with the number of clients.
  median        coordinate-wise median of the clients' weights (Yin et al., 2018).
  trimmed-mean  per coordinate, the floor(trim-fraction x K) largest and smallest values are
                cut and the rest averaged (K clients).

The robust two count each client once, whatever its data: that is what bounds one client's
pull on the result (with K >= 3 a single client cannot move a coordinate's median outside the
others' range). They hold all K clients' weights until the round ends, which is acceptable for
the client segment (small: the early layers and the aux head); the server's memory then grows
with K by one client segment per client, where FedAvg's stays one.

``max-update-norm`` bounds an update before any aggregator sees it: a client whose weights lie
further (L2, over every float array, BatchNorm statistics included) than that from the round's
global weights is dropped for the round, with the norm in its reason. Dropped, not scaled: a
scaled update still moves the model in the direction the client chose, and a dropped reply is
exactly a reply that never came, which the tests can check bit for bit.

Integer arrays (BatchNorm's ``num_batches_tracked``) are counters, not averages: FedAvg keeps
the largest, the robust aggregators the lower median.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from split_core.config import RunConfig
from split_core.payload import PayloadError


def update_norm(arrays: Mapping[str, np.ndarray], initial: ArrayRecord) -> float:
    """L2 distance over every float array between a client's weights and the global ones."""
    total = 0.0
    for key, ref in initial.items():
        array = arrays[key]
        if np.issubdtype(array.dtype, np.floating):
            diff = array.astype(np.float64) - ref.numpy().astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


class Aggregator:
    """Collects the clients' final weights of one round and returns the next global ones."""

    def __init__(self, initial: ArrayRecord, max_update_norm: float = 0.0) -> None:
        self.initial = initial
        self.max_update_norm = max_update_norm
        self.total = 0.0  # examples the server counted over the clients added
        self.clients = 0

    def check(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Raises PayloadError when the update is beyond ``max-update-norm`` (0 = no bound)."""
        if not self.max_update_norm:
            return
        norm = update_norm(arrays, self.initial)
        if not norm <= self.max_update_norm:
            raise PayloadError(
                f"its update has L2 norm {norm:.4g} from the round's global weights, beyond "
                f"max-update-norm={self.max_update_norm:g}"
            )

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """One client's checked weights (keys, shapes, dtypes as ``initial``'s), and the
        examples the server counted for it."""
        self._add(arrays, weight)
        self.total += weight
        self.clients += 1

    def result(self) -> ArrayRecord | None:
        """The aggregate; None if no client contributed."""
        if not self.clients:
            return None
        return self._result()

    def _add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        raise NotImplementedError

    def _result(self) -> ArrayRecord:
        raise NotImplementedError


class FedAvg(Aggregator):
    def __init__(self, initial: ArrayRecord, max_update_norm: float = 0.0) -> None:
        super().__init__(initial, max_update_norm)
        self._sums: dict[str, np.ndarray] = {}
        self._ints: dict[str, np.ndarray] = {}

    def _add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        for key in self.initial:
            array = arrays[key]
            if np.issubdtype(array.dtype, np.floating):
                scaled = weight * array.astype(np.float64)
                self._sums[key] = self._sums[key] + scaled if key in self._sums else scaled
            else:  # BatchNorm's step counter: not an average
                seen = self._ints.get(key)
                if seen is None or int(array.sum()) > int(seen.sum()):
                    self._ints[key] = array

    def _result(self) -> ArrayRecord:
        """The weighted mean; the global model itself if no client had an example."""
        if not self.total:
            return self.initial
        out = {}
        for key, ref in self.initial.items():
            if key in self._sums:
                out[key] = Array((self._sums[key] / self.total).astype(np.dtype(ref.dtype)))
            else:
                out[key] = Array(self._ints[key])
        return ArrayRecord(out)


class _Coordinatewise(Aggregator):
    """Keeps every client's weights (K copies of the client segment) until ``result``."""

    def __init__(self, initial: ArrayRecord, max_update_norm: float = 0.0) -> None:
        super().__init__(initial, max_update_norm)
        self._kept: list[dict[str, np.ndarray]] = []

    def _add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        self._kept.append({key: arrays[key] for key in self.initial})

    def _result(self) -> ArrayRecord:
        out = {}
        for key, ref in self.initial.items():
            stack = np.stack([kept[key] for kept in self._kept])
            if np.issubdtype(stack.dtype, np.floating):
                value = self._combine(np.sort(stack.astype(np.float64), axis=0))
            else:  # counters: the lower median, an actual client's value
                value = np.sort(stack, axis=0)[(len(stack) - 1) // 2]
            out[key] = Array(np.array(value, dtype=np.dtype(ref.dtype), order="C"))  # 0-d too
        return ArrayRecord(out)

    def _combine(self, ordered: np.ndarray) -> np.ndarray:
        """One value per coordinate from the clients' values sorted along axis 0."""
        raise NotImplementedError


class Median(_Coordinatewise):
    def _combine(self, ordered: np.ndarray) -> np.ndarray:
        k = len(ordered)
        return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])


class TrimmedMean(_Coordinatewise):
    def __init__(
        self, initial: ArrayRecord, trim_fraction: float, max_update_norm: float = 0.0
    ) -> None:
        super().__init__(initial, max_update_norm)
        self.trim_fraction = trim_fraction

    def trimmed(self, clients: int) -> int:
        """Values cut from each end of a coordinate: floor(trim-fraction x K)."""
        return math.floor(self.trim_fraction * clients)

    def _combine(self, ordered: np.ndarray) -> np.ndarray:
        cut = self.trimmed(len(ordered))
        return ordered[cut : len(ordered) - cut].mean(axis=0)


def make_aggregator(cfg: RunConfig, initial: ArrayRecord) -> Aggregator:
    """The aggregator the run config names, starting from the round's global weights."""
    if cfg.aggregation == "median":
        return Median(initial, cfg.max_update_norm)
    if cfg.aggregation == "trimmed-mean":
        return TrimmedMean(initial, cfg.trim_fraction, cfg.max_update_norm)
    return FedAvg(initial, cfg.max_update_norm)
