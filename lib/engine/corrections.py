"""Corrective clicks that always correct: a slice's mask is edited to agree with every click on it.

Box-trained models (LiteMedSAM) hardly use point prompts: the simulated annotator (lib.evaluation.annotator)
measured that their masks did not change with corrective clicks, and that a clicks-only 2D session got
worse with every click. So the clicks are applied to the decoded mask, the way an annotator means them:

* a foreground click outside the mask adds the object the model sees there: candidate boxes around the
  click, decoded in one batch; the best-scored candidate that holds the click and no background click;
  its connected part under the click is added.
* a background click inside the mask removes the part of the mask nearer to it than to anything marked
  as the structure (the foreground clicks, else the mask's own centre): a Voronoi cut, no model call.

Clicks the mask already agrees with cost nothing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lib.engine.predictor import SlicePrediction, SlicePredictor
from lib.engine.volumes import PreparedVolume


def grow_box(box: np.ndarray, margin: int, width: int, height: int) -> np.ndarray:
    """(4,) x0, y0, x1, y1 grown by margin pixels on each side, clipped to the slice."""
    return np.asarray(
        [
            max(0, box[0] - margin),
            max(0, box[1] - margin),
            min(width - 1, box[2] + margin),
            min(height - 1, box[3] + margin),
        ],
        dtype=np.int64,
    )


# Half-sides of the candidate boxes tried around a click, as fractions of the slice's longest side.
CLICK_BOX_FRACTIONS = (0.03, 0.05, 0.08, 0.12)


def click_boxes(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, 4) candidate boxes of growing size around the foreground clicks' bounding box."""
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    boxes = []
    for fraction in CLICK_BOX_FRACTIONS:
        half = max(2, round(fraction * max(width, height)))
        boxes.append(grow_box(np.asarray([x0, y0, x1, y1]), half, width, height))
    return np.stack(boxes)


def centre_of(mask: np.ndarray) -> np.ndarray:
    """(2,) x, y of the mask's most interior pixel. mask: (H, W), not empty."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.asarray([x, y])


def voronoi_cut(mask: np.ndarray, click: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """The mask without its pixels nearer to `click` than to every anchor.

    mask: (H, W) bool; click: (2,) x, y; anchors: (K, 2) x, y of what is the structure (K >= 1).
    """
    ys, xs = np.nonzero(mask)
    pixels = np.stack([xs, ys], axis=1).astype(np.float64)
    to_click = ((pixels - click) ** 2).sum(axis=1)
    to_anchor = ((pixels[:, None, :] - anchors[None].astype(np.float64)) ** 2).sum(axis=2).min(axis=1)
    out = mask.copy()
    drop = to_click < to_anchor
    out[ys[drop], xs[drop]] = False
    return out


def object_at(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    z: int,
    click: np.ndarray,
    background: np.ndarray,
) -> np.ndarray | None:
    """(H, W) the connected object under a foreground click, as the model sees it; None if none holds it.

    background: (M, 2) x, y of background clicks the object must not cover.
    """
    width, height, _ = volume.shape
    boxes = click_boxes(click[None], width, height)
    candidates = predictor.predict_batch(volume, z, click[None], np.ones(1, dtype=np.int64), boxes)
    x, y = int(click[0]), int(click[1])
    holding = [c for c in candidates if c.mask[y, x] and not any(c.mask[int(by), int(bx)] for bx, by in background)]
    if not holding:
        return None
    best = max(holding, key=lambda c: c.iou).mask
    regions, _ = ndimage.label(best)
    return regions == regions[y, x]


def apply_clicks(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    z: int,
    prediction: SlicePrediction,
    points: np.ndarray,
    labels: np.ndarray,
) -> SlicePrediction:
    """Edit prediction.mask (H, W) so that it holds every foreground click and no background click.

    points: (K, 2) x, y on slice z; labels: (K,) 1 foreground, 0 background. Clicks are applied in the
    order given (the annotator's), so a later click wins over an earlier one where they disagree.
    """
    if len(points) == 0:
        return prediction
    mask = prediction.mask.copy()
    foreground, background = points[labels == 1], points[labels == 0]
    for (x, y), label in zip(points.astype(np.int64), labels, strict=True):
        if bool(mask[y, x]) == bool(label):
            continue
        if label == 1:
            region = object_at(predictor, volume, z, np.asarray([x, y]), background)
            mask |= region if region is not None else _dot(mask.shape, x, y)
        else:
            anchors = foreground if len(foreground) else centre_of(mask)[None]
            mask = voronoi_cut(mask, np.asarray([x, y]), anchors)
            mask[y, x] = False  # the click's own pixel, even when it is the mask's centre
    if np.array_equal(mask, prediction.mask):
        return prediction
    return SlicePrediction(
        mask=mask, iou=prediction.iou, low_res_logits=prediction.low_res_logits, window=prediction.window
    )


def _dot(shape: tuple[int, int], x: int, y: int) -> np.ndarray:
    """The clicked pixel alone: the least a foreground click adds when the model sees nothing there."""
    dot = np.zeros(shape, dtype=bool)
    dot[y, x] = True
    return dot
