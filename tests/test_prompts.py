"""Prompt validation: what OHIF and Slicer send is accepted; malformed or outside prompts name the problem."""

import numpy as np
import pytest

from lib.engine.prompts import Prompt, PromptError

SHAPE = (50, 60, 40)


def test_points_and_roi_are_parsed_in_voxel_order():
    prompt = Prompt.from_request(
        {"foreground": [[10, 20, 5], [11.4, 21.6, 5]], "background": [[1, 2, 6]], "roi": [30, 10, 5, 25, 8, 2]}, SHAPE
    )
    assert prompt.foreground.tolist() == [[10, 20, 5], [11, 22, 5]]
    assert prompt.roi.tolist() == [10, 30, 5, 25, 2, 8]  # each pair sorted: Slicer may send max before min
    xy, labels = prompt.points_on(5)
    assert xy.tolist() == [[10, 20], [11, 22]] and labels.tolist() == [1, 1]
    assert prompt.box_2d().tolist() == [10, 5, 30, 25]
    assert prompt.z_range(SHAPE[2]) == (2, 8)


def test_start_slice_prefers_slice_then_points_then_roi_middle():
    assert Prompt.from_request({"foreground": [[1, 1, 3]], "slice": 7}, SHAPE).start_slice() == 7
    assert Prompt.from_request({"foreground": [[1, 1, 3]], "slice": -1}, SHAPE).start_slice() == 3
    assert Prompt.from_request({"roi": [0, 5, 0, 5, 10, 20]}, SHAPE).start_slice() == 15


def test_roi_partly_outside_is_clipped():
    prompt = Prompt.from_request({"roi": [-5, 10, 0, 70, 0, 39.6]}, SHAPE)
    assert prompt.roi.tolist() == [0, 10, 0, 59, 0, 39]


@pytest.mark.parametrize(
    ("request_params", "message"),
    [
        ({}, "empty prompt"),
        ({"background": [[1, 1, 1]]}, "empty prompt"),
        ({"foreground": [[50, 1, 1]]}, "outside the image"),
        ({"foreground": [[-1, 1, 1]]}, "outside the image"),
        ({"foreground": [[1, 1]]}, "must be [x, y, z]"),
        ({"foreground": "1,2,3"}, "must be a list"),
        ({"foreground": [[1, float("nan"), 1]]}, "not a finite number"),
        ({"foreground": [[1, True, 1]]}, "expected a number"),
        ({"roi": [1, 2, 3]}, "'roi' must be"),
        ({"roi": [100, 200, 0, 5, 0, 5]}, "does not overlap"),
        ({"roi": [0, 5, 0, 5, 0, float("inf")]}, "not a finite number"),
        ({"foreground": [[1, 1, 1]], "slice": 40}, "outside the image's 40 slices"),
    ],
)
def test_bad_prompts_are_refused_with_a_message(request_params, message):
    with pytest.raises(PromptError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Prompt.from_request(request_params, SHAPE)


def test_points_on_other_slices_are_ignored_for_a_slice():
    prompt = Prompt.from_request({"foreground": [[1, 1, 3]], "background": [[2, 2, 4]]}, SHAPE)
    xy, labels = prompt.points_on(4)
    assert xy.tolist() == [[2, 2]] and labels.tolist() == [0]
    assert np.asarray(prompt.points_on(9)[0]).size == 0


def test_focus_window_snaps_and_round_trips_at_the_slice_edge():
    from lib.engine.preprocessing import WINDOW_SIDES, Window

    box = np.array([2, 3, 11, 9])  # 10 x 7 pixels near the top-left corner of a 60 x 50 slice
    window = Window.around(box, (60, 50), context=3.0)
    assert window.side in WINDOW_SIDES and window.side >= 30
    assert window.x0 < 0 and window.y0 < 0  # hangs over the edge: padded, not shifted
    image = np.arange(60 * 50, dtype=np.int32).reshape(60, 50)
    crop = window.crop(image)
    assert crop.shape == (window.side, window.side)
    back = window.paste(crop, image.shape)
    inside = back != 0
    np.testing.assert_array_equal(back[inside], image[inside])
    assert window.to_window(box)[:2].tolist() == [2 - window.x0, 3 - window.y0]
    assert Window.around(np.array([0, 0, 40, 40]), (60, 50), context=3.0) is None  # as big as the slice
