"""The training loop's bookkeeping on the real LiteMedSAM decoder, with random embeddings (quick: no encoder).

What it learns is the continual tests' and bench-learning's to show; here: the step count a round asks for is
the step count it trains, and evaluating an adapted encoder encodes each slice once.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lib.engine.training import Case, TrainConfig, evaluate, train
from lib.model.auto_head import AutoHead

NAMES = ["left", "right"]


def _case(name: str, slices: int, seed: int) -> Case:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(slices, 256, 256, dtype=torch.long)
    targets[:, 100:140, 60:100] = 1
    targets[:, 100:140, 160:200] = 2
    return Case(
        name,
        np.arange(slices),
        torch.randn(slices, 256, 64, 64, generator=generator).half(),
        torch.randint(0, 255, (slices, 256, 256), dtype=torch.uint8, generator=generator),
        targets,
        torch.ones(len(NAMES), dtype=torch.bool),
    )


@pytest.mark.parametrize("steps", [2, 4])
def test_a_round_trains_exactly_the_steps_it_was_given(lite_model, steps):
    """5 slices in batches of 2 make epochs of 3 steps: 2 steps stop inside the first, 4 inside the second."""
    network = copy.deepcopy(lite_model.network)
    config = TrainConfig(steps=steps, batch_slices=2, prompted_slices=0)
    outcome = train(network, AutoHead(NAMES), [_case("a", 5, 0)], [], config, progress=lambda _: None)
    assert outcome.steps == steps
    assert outcome.epochs == len(outcome.history) == -(-steps // 3)


def test_evaluating_an_adapted_encoder_encodes_each_slice_once(lite_model):
    network = copy.deepcopy(lite_model.network)
    network.adapted_encoder = True  # as attach_lora leaves it: embeddings come from the cached pixels
    encoded = []
    network.image_encoder.register_forward_hook(lambda _m, args, _out: encoded.append(args[0].shape[0]))
    result = evaluate(network, AutoHead(NAMES), [_case("v", 3, 1)], NAMES, thresholds=(0.0,))
    assert sum(encoded) == 3, f"encoded {encoded} slices for a 3-slice case"
    assert set(result["auto"]) == set(NAMES) and set(result["prompted"]) == set(NAMES)
