"""Progress inside a long round: batches done of the total, images per second, and an ETA.

A deep ResNet's epoch over full data takes minutes; without this the log is silent until the
round ends.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("flwr").getChild("split")


class Progress:
    def __init__(self, label: str, total_batches: int, every_seconds: float) -> None:
        self.label, self.total, self.every = label, total_batches, every_seconds
        self.done = self.images = 0
        self.t0 = self.last = time.monotonic()

    def add(self, batches: int, images: int) -> None:
        self.done += batches
        self.images += images
        now = time.monotonic()
        if not self.every or now - self.last < self.every or self.done >= self.total:
            return
        self.last = now
        rate = self.images / (now - self.t0)
        eta = (now - self.t0) * (self.total - self.done) / max(self.done, 1)
        log.info(
            "%s: %d/%d batches (%.0f %%), %.0f img/s, ETA %s",
            self.label,
            self.done,
            self.total,
            100 * self.done / max(self.total, 1),
            rate,
            _duration(eta),
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
