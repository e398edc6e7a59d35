"""Who is annotating which image: an image handed to one annotator is not handed to another until it is
labelled or the lease runs out. One lease per annotator: asking again hands the earlier image back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Lease:
    client: str
    expires: float


class LeaseBook:
    """Leases in the server's memory, seeded at start from the datastore's hand-out records (they survive a
    restart). `minutes` 0 turns leases off: every annotator may get any unlabelled image."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.time) -> None:
        self.seconds = minutes * 60.0
        self.clock = clock
        self.lock = threading.RLock()  # held by a strategy from "who holds what" to "granted"
        self._leases: dict[str, Lease] = {}

    def seed(self, records: Iterable[tuple[str, str, float]]) -> None:
        """(image, client, handed-out time) records; those still within the lease time become leases."""
        with self.lock:
            for image, client, handed_out in records:
                expires = handed_out + self.seconds
                if client and expires > self.clock() and expires > self._leases.get(image, Lease("", 0)).expires:
                    self._leases[image] = Lease(client, expires)

    def prune(self, labelled: set[str]) -> None:
        """Forget leases that ran out or whose image now has a final label."""
        now = self.clock()
        with self.lock:
            for image in [i for i, lease in self._leases.items() if lease.expires <= now or i in labelled]:
                del self._leases[image]

    def held_by_others(self, client: str) -> dict[str, Lease]:
        with self.lock:
            return {i: lease for i, lease in self._leases.items() if lease.client != client}

    def grant(self, image: str, client: str) -> Lease | None:
        """Lease `image` to `client`, handing back the client's earlier image; None when leases are off."""
        if self.seconds <= 0:
            return None
        with self.lock:
            for held in [i for i, lease in self._leases.items() if lease.client == client]:
                del self._leases[held]
            lease = Lease(client, self.clock() + self.seconds)
            self._leases[image] = lease
            return lease

    def active(self) -> dict[str, Lease]:
        with self.lock:
            now = self.clock()
            return {i: lease for i, lease in self._leases.items() if lease.expires > now}
