"""A simulated annotator: prompts the `foundation` tasks over HTTP the way a careful person would.

Two protocols, both driven by the ground truth and judged against it:

* **3D, CVPR 2025 interactive 3D segmentation challenge**: a tight 2D box on the structure's middle slice
  plus its z-range (`ground_truth.roi_3d`), then corrective clicks. Each click goes to the centre (maximum of
  the distance transform) of the largest connected error region of the current 3D mask: a foreground click
  where the mask misses the structure, a background click where it spills over. Every request carries the
  box and all clicks so far, as a client would resend them.
* **2D, RITM's number of clicks (NoC)**: clicks only, on the structure's middle slice. The first click is
  the centre of the structure (all of it is the error), later ones correct as above, in 2D, up to 20.
  NoC@85 / NoC@90 are the clicks needed to reach Dice 0.85 / 0.90, and 20 (the maximum) when never reached.

The segmenters are plain callables `prompt dict -> mask`, so the protocol can be tested without a server;
`HttpSegmenter` is the real one, through `monailabel.client.MONAILabelClient` (the Slicer module's client).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monailabel.client import MONAILabelClient
from scipy import ndimage

from lib.evaluation.ground_truth import dice, middle_slice, roi_3d

MAX_CLICKS = 20  # RITM's cap: NoC is this when a threshold is never reached

Segmenter = Callable[[dict], np.ndarray]


@dataclass(frozen=True)
class Click:
    """One simulated click: voxel indices (x, y[, z]) and whether it marks the structure (foreground)."""

    point: tuple[int, ...]
    foreground: bool


def next_click(prediction: np.ndarray, truth: np.ndarray) -> Click | None:
    """The click a careful annotator gives next: the centre of the largest connected error region.

    prediction, truth: boolean arrays of one shape, 2D (X, Y) or 3D (X, Y, Z). The centre is the error
    voxel farthest from the region's boundary, the image border counting as boundary (as RITM pads it);
    of equally far voxels, the one nearest their mean.
    None when the prediction is already exact.
    """
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    largest: tuple[int, np.ndarray, bool] | None = None
    for error, foreground in ((truth & ~prediction, True), (prediction & ~truth, False)):
        regions, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        index = int(np.argmax(sizes))
        if largest is None or sizes[index] > largest[0]:
            largest = (int(sizes[index]), regions == index + 1, foreground)
    if largest is None:
        return None
    _, region, foreground = largest
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[tuple(slice(1, -1) for _ in region.shape)]
    # a slab or a rectangle has a ridge of equally deep voxels: take the one nearest the ridge's middle
    deepest = np.argwhere(distance == distance.max())
    point = deepest[np.argmin(((deepest - deepest.mean(axis=0)) ** 2).sum(axis=1))]
    return Click(tuple(int(i) for i in point), foreground)


def clicks_to_reach(dices: list[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """RITM's NoC: the number of clicks after which Dice first reaches threshold (dices[k] is after k+1
    clicks), or max_clicks when it never does within max_clicks."""
    for index, value in enumerate(dices[:max_clicks]):
        if value >= threshold:
            return index + 1
    return max_clicks


def _points(clicks: list[Click], foreground: bool, z: int | None = None) -> list[list[int]]:
    return [[*c.point, z] if z is not None else list(c.point) for c in clicks if c.foreground == foreground]


@dataclass
class Session:
    """What one simulated session gave: Dice after each step, the clicks, and the seconds each request took."""

    dices: list[float] = field(default_factory=list)
    clicks: list[Click] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    first: np.ndarray | None = None  # the first mask (the box's, in 3D), for pictures
    final: np.ndarray | None = None  # the last mask


def session_3d(segment: Segmenter, truth: np.ndarray, clicks: int = 5) -> Session:
    """CVPR 2025 protocol on one structure: box + z-range, then `clicks` corrective clicks.

    truth: (X, Y, Z) boolean. dices[0] is after the box, dices[k] after k clicks (fewer when exact early).
    """
    truth = truth.astype(bool)
    roi, z = roi_3d(truth), middle_slice(truth)
    session = Session()
    while True:
        prompt = {
            "roi": roi,
            "slice": z,  # propagation starts from the box's slice, wherever the latest click lies
            "foreground": _points(session.clicks, True),
            "background": _points(session.clicks, False),
        }
        begin = time.perf_counter()
        mask = segment(prompt).astype(bool)
        session.seconds.append(time.perf_counter() - begin)
        session.dices.append(dice(mask, truth))
        session.first = mask if session.first is None else session.first
        session.final = mask
        click = next_click(mask, truth) if len(session.clicks) < clicks else None
        if click is None:
            return session
        session.clicks.append(click)


def session_2d(
    segment: Segmenter, truth: np.ndarray, z: int | None = None, max_clicks: int = MAX_CLICKS, stop_at: float = 0.90
) -> Session:
    """RITM protocol on one slice: clicks only, until Dice reaches stop_at or max_clicks are given.

    truth: (X, Y, Z) boolean; the session works on slice z (default: the structure's middle slice) and
    dices[k] is the slice's Dice after k+1 clicks. Stopping at 0.90 leaves NoC@85 and NoC@90 exact.
    """
    truth = truth.astype(bool)
    z = middle_slice(truth) if z is None else z
    target = truth[:, :, z]
    session = Session()
    prediction = np.zeros_like(target)
    while len(session.clicks) < max_clicks:
        click = next_click(prediction, target)
        if click is None:
            break
        session.clicks.append(click)
        prompt = {
            "slice": z,
            "foreground": _points(session.clicks, True, z),
            "background": _points(session.clicks, False, z),
        }
        begin = time.perf_counter()
        prediction = segment(prompt).astype(bool)[:, :, z]
        session.seconds.append(time.perf_counter() - begin)
        session.dices.append(dice(prediction, target))
        if session.dices[-1] >= stop_at:
            break
    session.final = prediction
    return session


class GeometryMismatch(ValueError):
    """A returned label is not on the image's voxel grid, so a Dice against the ground truth would lie."""


def same_grid(label: nib.Nifti1Image, reference: nib.Nifti1Image, tolerance_mm: float = 1e-3) -> None:
    """Raise GeometryMismatch unless label and reference share shape and affine (the Dice's geometry)."""
    if tuple(label.shape[:3]) != tuple(reference.shape[:3]):
        raise GeometryMismatch(f"label shape {label.shape} is not the image's {reference.shape}")
    difference = float(np.abs(label.affine - reference.affine).max())
    if difference > tolerance_mm:
        raise GeometryMismatch(f"label affine differs from the image's by {difference:.4g} (mm)")


class HttpSegmenter:
    """Segments one image through a running server, exactly as a client gets it.

    Each call is one `MONAILabelClient.infer`; the returned NIfTI is checked to lie on the ground truth's
    grid (shape and affine) before it is compared with it.
    """

    def __init__(self, client: MONAILabelClient, model: str, image_id: str, reference: Path | nib.Nifti1Image):
        self.client, self.model, self.image_id = client, model, image_id
        self.reference = reference if isinstance(reference, nib.Nifti1Image) else nib.load(reference)

    def __call__(self, prompt: dict) -> np.ndarray:
        path, _ = self.client.infer(self.model, self.image_id, prompt)
        try:
            label = nib.load(path)
            same_grid(label, self.reference)
            return np.asarray(label.dataobj) > 0
        finally:
            Path(path).unlink(missing_ok=True)
