"""Which unlabelled volume to hand out next: the active-learning strategies' arithmetic, server-free.

The server's strategies (lib.activelearning) and the benchmark (lib.evaluation.bench_active) both call these,
so what is measured is what annotators get.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np

from lib.engine.uncertainty import cosine_distance


def pick_uncertain(candidates: Sequence[str], scores: Mapping[str, float | None], rng: random.Random) -> str | None:
    """The candidate with the highest score (ties: the smaller id); unscored ones only when none is scored."""
    scored = [c for c in candidates if scores.get(c) is not None]
    if scored:
        return max(sorted(scored), key=lambda c: scores[c])  # max keeps the first: ties go to the smaller id
    return rng.choice(list(candidates)) if candidates else None


def diversity(
    candidates: Sequence[str], descriptors: Mapping[str, np.ndarray], reference: Sequence[np.ndarray]
) -> dict[str, float]:
    """{candidate: distance to the nearest reference volume / the largest such distance}, in [0, 1].

    Candidates without a descriptor count as far (1.0); with no reference every candidate is 1.0.
    """
    known = [c for c in candidates if c in descriptors]
    result = {c: 1.0 for c in candidates}
    if not known or not reference:
        return result
    distance = cosine_distance(np.stack([descriptors[c] for c in known]), np.stack(list(reference))).min(axis=1)
    top = float(distance.max())
    result.update({c: (float(d) / top if top > 0 else 1.0) for c, d in zip(known, distance, strict=True)})
    return result


def pick_diverse(
    candidates: Sequence[str],
    scores: Mapping[str, float | None],
    descriptors: Mapping[str, np.ndarray],
    reference: Sequence[np.ndarray],
    rng: random.Random,
) -> tuple[str | None, dict[str, float]]:
    """Uncertainty x diversity: the candidate that is unsure *and* unlike anything labelled or handed out.

    Args:
        reference: descriptors of the volumes already labelled or handed out to other annotators.
    Returns:
        (chosen id or None, {"uncertainty", "diversity", "value"} of the chosen one).
    """
    if not candidates:
        return None, {}
    known = [scores[c] for c in candidates if scores.get(c) is not None]
    if not known:
        chosen = rng.choice(list(candidates))
        return chosen, {"uncertainty": None, "diversity": None, "value": None}
    top = max(known) or 1.0
    spread = diversity(candidates, descriptors, reference)
    values = {
        c: (scores[c] / top if scores.get(c) is not None else 0.0) * spread[c] for c in candidates
    }  # an unscored volume waits for its score
    chosen = max(sorted(candidates), key=lambda c: values[c])
    uncertainty = scores.get(chosen)
    return chosen, {
        "uncertainty": None if uncertainty is None else round(float(uncertainty), 4),
        "diversity": round(spread[chosen], 4),
        "value": round(values[chosen], 4),
    }
