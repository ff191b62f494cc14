"""What is known about one table's copy while it runs, for both ways of showing it
(progress.LogProgress, bars.BarProgress): HQ's estimates and the bytes that arrived."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TableProgress:
    """What is known about one table's copy: HQ's estimates and what arrived so far."""

    table: str
    est_rows: int = 0
    est_bytes: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    @property
    def rows(self) -> int:
        """Rows copied so far, estimated from bytes (0 when HQ had no statistics)."""
        if not self.est_rows or not self.est_bytes:
            return 0
        return round(self.bytes * self.est_rows / self.est_bytes)

    @property
    def total_rows(self) -> int:
        """The expected total, raised when the estimate turns out low."""
        return max(self.est_rows, self.rows)

    def eta(self) -> float | None:
        """Seconds left at the current rate, None when unknown."""
        if not self.bytes or not self.est_bytes or self.bytes >= self.est_bytes:
            return None
        return (self.est_bytes - self.bytes) / (self.bytes / self.seconds)
