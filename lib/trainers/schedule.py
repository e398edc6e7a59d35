"""Scheduled retraining in the server process: start a round when enough new labels arrived or time passed,
and serve a newly published version as soon as the round publishes it.

The round itself runs in MONAI Label's train subprocess (so `GET /train/` shows it and a crash in training
never takes the server down); this thread only decides when, and never while a round is running. A trigger
that comes during a round is not lost: when the round ends, labels it did not use are still new and start
the next round, once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    every_labels: int = 4  # start a round after this many new final labels (0: off)
    interval_minutes: float = 60.0  # ...or this long after the last round, if any label is new (0: off)
    poll_seconds: float = 5.0


class RetrainSchedule:
    """Decides when to train and notices published versions.

    Args:
        new_labels: the (image id, label time) pairs of final labels no stored version has used yet.
        start_round: starts a training round; returns False if it could not (e.g. one is running).
        running: whether a round is running now.
        served_changed: called every poll; reloads the served version if the store points at another one.
    """

    def __init__(
        self,
        config: ScheduleConfig,
        new_labels: Callable[[], set[tuple[str, float]]],
        start_round: Callable[[], bool],
        running: Callable[[], bool],
        served_changed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.new_labels = new_labels
        self.start_round = start_round
        self.running = running
        self.served_changed = served_changed
        self.clock = clock
        self.last_round = clock()
        self._last_trigger: frozenset = frozenset()
        self.rounds_started = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self, new: set) -> str | None:
        """Why a round should start now, or None."""
        if not new or frozenset(new) == self._last_trigger:
            return None  # nothing new, or exactly what the last round (which stored nothing) already saw
        if self.config.every_labels and len(new) >= self.config.every_labels:
            return f"{len(new)} new final labels (train_every_labels {self.config.every_labels})"
        waited = (self.clock() - self.last_round) / 60
        if self.config.interval_minutes and waited >= self.config.interval_minutes:
            return f"{len(new)} new final labels and {waited:.0f} min since the last round"
        return None

    def tick(self) -> bool:
        """One poll; returns True if a round was started."""
        self.served_changed()
        if self.running():
            return False
        new = self.new_labels()
        reason = self.due(new)
        if reason is None:
            return False
        logger.info("scheduled training round: %s", reason)
        if not self.start_round():
            return False
        self._last_trigger = frozenset(new)
        self.last_round = self.clock()
        self.rounds_started += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the schedule must outlive any one bad poll
                logger.exception("retraining schedule: poll failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retrain-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
