"""The automatic segmentation's coarse-to-fine pass: which slices the fine pass segments."""

from __future__ import annotations

import numpy as np

from lib.engine.auto import AutoConfig, fine_slices

CONFIG = AutoConfig(coarse_step=4, margin=2)
DEPTH = 100


def _coarse(blobs: dict[int, list[tuple[int, slice, slice]]]) -> dict[int, np.ndarray]:
    """{z: (32, 32) channel map} for every coarse slice, with the given (channel, rows, cols) blobs drawn."""
    maps = {z: np.zeros((32, 32), np.uint8) for z in range(CONFIG.coarse_step // 2, DEPTH, CONFIG.coarse_step)}
    for z, drawn in blobs.items():
        for channel, rows, cols in drawn:
            maps[z][rows, cols] = channel
    return maps


def test_fine_pass_spans_each_labels_largest_part_and_ignores_specks_near_the_ends():
    structure = {z: [(1, slice(10, 20), slice(10, 20))] for z in (42, 46, 50, 54)}
    other = {z: [(2, slice(0, 5), slice(0, 5))] for z in (58, 62)}
    specks = {2: [(1, slice(0, 2), slice(0, 2))], 98: [(2, slice(30, 31), slice(30, 31))]}
    coarse = _coarse({**structure, **specks, **{z: structure.get(z, []) + v for z, v in other.items()}})

    rest = fine_slices(coarse, DEPTH, count=2, config=CONFIG)

    # label 1 from 42 to 54, label 2 from 58 to 62: one coarse step and the margin (6) beyond, coarse slices skipped
    expected = [z for z in range(42 - 6, 62 + 6 + 1) if z not in coarse]
    assert rest == expected
    assert 2 not in rest and 97 not in rest


def test_fine_pass_is_empty_when_the_coarse_pass_found_nothing():
    assert fine_slices(_coarse({}), DEPTH, count=3, config=CONFIG) == []


def test_fine_pass_stays_inside_the_volume():
    rest = fine_slices(_coarse({2: [(1, slice(0, 9), slice(0, 9))]}), DEPTH, count=1, config=CONFIG)
    assert rest == [z for z in range(0, 2 + 6 + 1) if z != 2 and z != 6]
