"""Active-learning strategies `uncertain`, `diverse`, `random` and `first`, all lease-aware.

Thin adapters: the choice is lib.engine.selection's; the scores are what the `foundation_uncertainty`
scoring task stored in each image's info; the descriptors are the scoring task's DescriptorFile.
Annotators are told apart by the `client_id` MONAI Label's clients send, else a `user` request param.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.leases import LeaseBook
from lib.engine.descriptors import DescriptorFile
from lib.engine.selection import pick_diverse, pick_uncertain

logger = logging.getLogger(__name__)
SCORE_KEY = "foundation_uncertainty"


def client_of(request: dict[str, Any]) -> str:
    return str(request.get("client_id") or request.get("user") or "anonymous")


def reload(datastore: Datastore) -> None:
    """See what the scoring subprocess wrote: re-read the datastore file if it changed (cheap when it did not).

    LocalDatastore's reader is private; other datastores keep their own state and are left alone.
    """
    reread = getattr(datastore, "_init_from_datastore_file", None)
    if callable(reread):
        reread()


class LeasedStrategy(Strategy):
    """Candidates = images without a final label that no other annotator holds; subclasses choose one."""

    name = ""

    def __init__(self, description: str, leases: LeaseBook) -> None:
        super().__init__(description)
        self.leases = leases

    def choose(self, candidates: list[str], datastore: Datastore, held: set[str]) -> tuple[str | None, dict]:
        raise NotImplementedError

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        client = client_of(request)
        reload(datastore)
        unlabelled = sorted(datastore.get_unlabeled_images())
        labelled = set(datastore.list_images()) - set(unlabelled)
        with self.leases.lock:
            self.leases.prune(labelled)
            held = self.leases.held_by_others(client)
            candidates = [i for i in unlabelled if i not in held]
            if not candidates:
                message = (
                    "every image has a final label: nothing left to annotate"
                    if not unlabelled
                    else f"the {len(unlabelled)} unlabelled image(s) are being annotated by others "
                    f"({', '.join(sorted({lease.client for lease in held.values()}))}); try again later"
                )
                logger.info("%s for %s: %s", self.name, client, message)
                return {"id": None, "message": message, "unlabelled": len(unlabelled), "held_by_others": len(held)}
            chosen, why = self.choose(candidates, datastore, set(held))
            lease = self.leases.grant(chosen, client)
        logger.info("%s: %s to %s (%s)", self.name, chosen, client, why or "no score")
        result: dict[str, Any] = {"id": chosen, "client_id": client, "why": why}
        if lease is not None:
            result["lease_expires"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lease.expires))
        return result


class FirstUnlabelled(LeasedStrategy):
    name = "first"

    def __init__(self, leases: LeaseBook) -> None:
        super().__init__("First unlabelled image (by id) that no one else is annotating", leases)

    def choose(self, candidates, datastore, held):
        return candidates[0], {}


class RandomUnlabelled(LeasedStrategy):
    name = "random"

    def __init__(self, leases: LeaseBook) -> None:
        super().__init__("A random unlabelled image that no one else is annotating", leases)
        self.rng = random.Random()

    def choose(self, candidates, datastore, held):
        return self.rng.choice(candidates), {}


def stored_scores(datastore: Datastore, images: list[str]) -> dict[str, dict]:
    return {i: datastore.get_image_info(i).get(SCORE_KEY) or {} for i in images}


class Uncertain(LeasedStrategy):
    name = "uncertain"

    def __init__(self, leases: LeaseBook, served_version: Callable[[], int]) -> None:
        super().__init__(
            "The unlabelled image the foundation model is least sure about (foundation_uncertainty score)", leases
        )
        self.served_version = served_version
        self.rng = random.Random()

    def choose(self, candidates, datastore, held):
        stored = stored_scores(datastore, candidates)
        chosen = pick_uncertain(candidates, {i: s.get("score") for i, s in stored.items()}, self.rng)
        return chosen, _why(stored[chosen], self.served_version())


class Diverse(LeasedStrategy):
    name = "diverse"

    def __init__(
        self, leases: LeaseBook, served_version: Callable[[], int], descriptors: Callable[[], DescriptorFile]
    ) -> None:
        super().__init__(
            "Uncertainty x distance in embedding space from every labelled or handed-out image, so that "
            "annotators working at once do not get near-duplicates",
            leases,
        )
        self.served_version = served_version
        self.descriptors = descriptors
        self.rng = random.Random()

    def choose(self, candidates, datastore, held):
        stored = stored_scores(datastore, candidates)
        vectors = self.descriptors().vectors()  # the served encoder's (a LoRA version brings its own)
        busy = (set(datastore.list_images()) - set(datastore.get_unlabeled_images())) | held
        reference = [vectors[i] for i in sorted(busy) if i in vectors]
        scores = {i: s.get("score") for i, s in stored.items()}
        chosen, parts = pick_diverse(candidates, scores, vectors, reference, self.rng)
        return chosen, {**_why(stored[chosen], self.served_version()), **parts}


def _why(stored: dict, served: int) -> dict:
    """What a team lead needs to see why an image was picked."""
    if not stored:
        return {"score": None, "note": "not scored yet (POST /scoring/foundation_uncertainty)"}
    return {
        "score": stored.get("score"),
        "method": stored.get("method"),
        "version": stored.get("version"),
        "current": stored.get("version") == served,
    }
