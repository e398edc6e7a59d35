"""2D segmentation of a prompted slice and 3D propagation through neighbouring slices.

Propagation (measured on the sample data, see README): each next slice is prompted by the previous slice's
mask box grown by a margin, the previous low-res logits as a mask prompt, and any clicks on that slice.
It stays within the roi's z-range and stops when the structure vanishes or jumps (a stopping rule), because
the naive "previous box only" scheme drifts into neighbours on thin or curved structures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from lib.engine.corrections import apply_clicks, click_boxes, grow_box
from lib.engine.predictor import SlicePrediction, SlicePredictor
from lib.engine.preprocessing import Window
from lib.engine.prompts import Prompt
from lib.engine.volumes import PreparedVolume, from_plane_view, to_plane_view

logger = logging.getLogger(__name__)

# A walk's vote on a voxel: the decoder's logit minus the mask threshold, within +-EVIDENCE_CLIP (a probability of
# 0.001..0.999: one sure decode must not outvote two others), counted within EVIDENCE_REACH pixels of the walk's
# mask on its slice (further out it is what the roi cut or the neighbour filter removed).
EVIDENCE_CLIP = 6.9
EVIDENCE_REACH = 2


@dataclass(frozen=True)
class PropagationConfig:
    """Knobs of the 3D propagation.

    margin: pixels added around the previous mask's box when prompting the next slice.
    use_mask_prompt: feed the previous low-res logits as a mask prompt.
    min_area: stop when a slice's mask has fewer pixels.
    max_growth: stop (outside an roi) when the area grows more than this factor from one slice to the next.
    min_iou: stop (outside an roi) when the decoder's predicted IoU falls below this.
    prefetch: slices encoded ahead in one batch (whole-slice mode only).
    context: >0 segments each slice in a focus window this many times the box's size (a zoomed view, which
        small structures need: a 15-pixel structure covers 4 cells of the 64x64 embedding grid otherwise).
    first_context: like `context`, for the prompted slice only (the rest of the walk uses `context`).
    keep_connected: drop regions of a slice's mask that do not touch the previous slice's mask (stray blobs
        would otherwise widen the next box and the drift compounds).
    click_corrections: edit each slice's mask to agree with the clicks on it (lib.engine.corrections).
    roi_slack: with an roi, a propagated slice's mask is cut to the roi's in-plane box grown by this
        fraction of its size on each side (<0: no cut). The roi's box is the prompted slice's, and a
        structure's other slices reach a little beyond it; natural-image models (MobileSAM) otherwise
        flood whole slices (3D Dice 0.07 -> 0.34 on sub-01/02 at 0.25). The server takes each model's own
        (ModelSpec.roi_slack): LiteMedSAM's is 0.5, as 0.25 cut off the curved hippocampi.
    end_taper: with an roi, the next slice's box is also held within an envelope that narrows towards the
        roi's z-ends (`tapered_box`). The model fills the box it is given, so without it a mask shrank more
        slowly than the structure at its ends (LiteMedSAM 3D Dice 0.599 -> 0.636 on sub-01..03, 0.612 ->
        0.635 on sub-04/05).
    plane_guide: with an roi, each propagated slice's box centre moves at most this many pixels (per axis)
        towards the structure's centre on that slice as read from one sagittal and one coronal cut through the
        roi's centre (`plane_centres`; 0: off). The chain of boxes lags a structure that moves from slice to
        slice, and a box's position, not its size, is most of the gap to the ground truth's boxes (README).
    smooth_sigma: the walk's votes (`walk_evidence`: the decoder's logits near its mask) are Gaussian-smoothed
        with this sigma (voxels) and the 3D mask is where they stay above zero (0: the mask as walked), so that
        one slice's decode does not stand alone against its neighbours, and a pixel the decoder was unsure of
        gives way to sure neighbours (logits rather than the mask: 0.666 -> 0.675 on sub-01..03, README).
        Slices with clicks keep their click-edited masks.
    planes: 3: with an roi, the structure is also propagated through its sagittal and its coronal slices
        (`cross_plane_walks`, their boxes steered towards the axial mask's centre on each of their slices), and
        the three walks vote by the decoder's logits (`fuse_walks`, the axial walk counting twice): each
        plane's decodes err in their own way. 1: axial slices only (about a third of the encodes).
    """

    margin: int = 3
    use_mask_prompt: bool = False
    min_area: int = 4
    max_growth: float = 2.5
    min_iou: float = 0.5
    prefetch: int = 4
    context: float = 0.0
    keep_connected: bool = True
    first_context: float = 0.0
    click_corrections: bool = True
    roi_slack: float = 0.25
    end_taper: bool = True
    plane_guide: float = 2.0
    smooth_sigma: float = 1.0
    planes: int = 1


@dataclass
class VolumeResult:
    """mask: (X, Y, Z) bool; affine: the image's voxel->RAS; slices: segmented slice indices; info: for the response;
    margins: {z: (H, W) float16 `SlicePredictor.slice_margin`} of each segmented slice, when asked for."""

    mask: np.ndarray
    affine: np.ndarray
    slices: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    margins: dict[int, np.ndarray] = field(default_factory=dict)


def bounding_box(mask: np.ndarray) -> np.ndarray | None:
    """(4,) x0, y0, x1, y1 inclusive of a (H, W) mask, or None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.asarray([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


def mask_region(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice, slice] | None:
    """The (X, Y, Z) mask's bounding box grown by `pad` voxels a side (cut at the volume's low edges), as slices;
    None when empty. find_objects scans only the slab of slices the mask reaches: a propagated mask spans a few
    dozen of a volume's slices, and on the whole volume it took 12 ms, a sixth of a cached 3D request."""
    reached = np.flatnonzero(mask.any(axis=(0, 1)))
    if len(reached) == 0:
        return None
    z0, z1 = int(reached[0]), int(reached[-1]) + 1
    x, y, _ = ndimage.find_objects(mask[:, :, z0:z1].view(np.uint8))[0]
    return tuple(slice(max(0, s.start - pad), s.stop + pad) for s in (x, y, slice(z0, z1)))


def _respects_clicks(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> bool:
    values = mask[points[:, 1], points[:, 0]]
    return bool(np.all(values == (labels == 1)))


def focus(box: np.ndarray | None, volume: PreparedVolume, context: float) -> Window | None:
    """The focus window for a box (None: whole slice)."""
    if box is None or context <= 0:
        return None
    width, height, _ = volume.shape
    return Window.around(box, (height, width), context)


def keep_connected(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Keep the connected regions of `mask` that touch `reference` (or the largest one if none does)."""
    regions, count = ndimage.label(mask)
    if count <= 1:
        return mask
    touching = np.unique(regions[reference & mask])
    touching = touching[touching > 0]
    if len(touching) == 0:
        sizes = ndimage.sum_labels(mask, regions, index=np.arange(1, count + 1))
        touching = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, touching)


def decoder_points(
    predictor: SlicePredictor, points: np.ndarray, labels: np.ndarray, corrections: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The clicks the decoder itself is given: all of them, unless the model is box-trained and the clicks
    are applied as edits anyway (then none: the mask under a given box stays put and each click edits it)."""
    if corrections and not predictor.model.spec.point_prompts:
        return points[:0], labels[:0]
    return points, labels


def segment_slice(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    prompt: Prompt,
    z: int,
    context: float = 0.0,
    corrections: bool = True,
) -> SlicePrediction:
    """Segment slice z from the roi's in-plane box and the clicks on that slice.

    corrections: the clicks then edit the mask until it agrees with every one (lib.engine.corrections).
    """
    decoded = decode_slice(predictor, volume, prompt, z, context, corrections)
    return correct(predictor, volume, z, decoded, prompt, corrections)


def decode_slice(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    prompt: Prompt,
    z: int,
    context: float = 0.0,
    corrections: bool = True,
) -> SlicePrediction:
    """The model's own mask of slice z, before any click edits it.

    Box-trained models (LiteMedSAM) ignore clicks without a box, so clicks alone are turned into candidate
    boxes of a few sizes around them, decoded in one batch; the candidate whose mask agrees with the clicks
    and has the highest predicted IoU wins. With corrections to follow and a box-trained model, only the
    first foreground click seeds the candidates, so that each later click edits the mask rather than
    swapping it for another candidate.
    """
    points, labels = prompt.points_on(z)
    box = prompt.box_2d()
    given_points, given_labels = decoder_points(predictor, points, labels, corrections)
    if box is not None or not np.any(labels == 1):
        best = predictor.predict(volume, z, given_points, given_labels, box, window=focus(box, volume, context))
    else:
        if len(given_points) < len(points):  # box-trained, with corrections: the first click seeds
            given_points, given_labels = points[labels == 1][:1], labels[labels == 1][:1]
        width, height, _ = volume.shape
        boxes = click_boxes(given_points[given_labels == 1], width, height)
        candidates = predictor.predict_batch(volume, z, given_points, given_labels, boxes)
        agreeing = [c for c in candidates if _respects_clicks(c.mask, given_points, given_labels)] or candidates
        best = max(agreeing, key=lambda c: c.iou)
    return best


def segment_2d(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    prompt: Prompt,
    context: float = 0.0,
    corrections: bool = True,
) -> VolumeResult:
    """Segment the prompted slice; the result is a full-size volume with only that slice set.

    context: >0 segments a box prompt in a focus window this many times the box (see PropagationConfig).
    corrections: edit the mask to agree with every click (lib.engine.corrections).
    """
    begin = time.perf_counter()
    z = prompt.start_slice()
    was_encoded = predictor.is_encoded(volume, z, focus(prompt.box_2d(), volume, context))
    prediction = segment_slice(predictor, volume, prompt, z, context, corrections)
    mask = np.zeros(volume.shape, dtype=bool, order="F")  # F order: NIfTI/NRRD write it in one copy
    mask[:, :, z] = prediction.mask.T
    info = {
        "slice": z,
        "iou": round(prediction.iou, 4),
        "cached_embedding": was_encoded,
        "seconds": round(time.perf_counter() - begin, 4),
    }
    return VolumeResult(mask, volume.affine, [z], info)


def clip_to_roi(mask: np.ndarray, prompt: Prompt, slack: float) -> np.ndarray:
    """(H, W) mask without what lies outside the roi's in-plane box grown by `slack` times its size."""
    x0, y0, x1, y1 = prompt.box_2d()
    grow_x, grow_y = round(slack * (x1 - x0 + 1)), round(slack * (y1 - y0 + 1))
    inside = np.zeros_like(mask)
    inside[max(0, y0 - grow_y) : y1 + grow_y + 1, max(0, x0 - grow_x) : x1 + grow_x + 1] = True
    return mask & inside


def tapered_box(box: np.ndarray, prompt: Prompt, z0: int, z: int, margin: int) -> np.ndarray:
    """(4,) x0, y0, x1, y1: `box` around its own centre, no wider or taller than the roi's in-plane box scaled by
    1 - (d / D)^2 (plus `margin` on each side), d = |z - z0|, D = the distance from z0 to the roi's end on z's
    side, plus one. Near z0 that leaves the box as it is; at the roi's last slice it is a small fraction of the
    roi's box (a structure narrows towards its ends; an ellipsoid's cross-sections scale as the root of this)."""
    far = int(prompt.roi[5] if z > z0 else prompt.roi[4])
    scale = max(0.0, 1.0 - (abs(z - z0) / (abs(far - z0) + 1)) ** 2)
    x0, y0, x1, y1 = prompt.box_2d()
    limit = np.maximum(3.0, scale * np.asarray([x1 - x0 + 1, y1 - y0 + 1])) + 2 * margin
    centre = (box[:2] + box[2:]) / 2
    half = (np.minimum(box[2:] - box[:2] + 1, limit) - 1) / 2
    return np.concatenate([np.round(centre - half), np.round(centre + half)]).astype(np.int64)


def plane_centres(
    predictor: SlicePredictor, volume: PreparedVolume, prompt: Prompt, context: float, slack: float = 0.25
) -> dict[int, tuple[float | None, float | None]]:
    """{z: (x, y)} the structure's centre on each slice of the roi's z-range, as far as two cuts show it: the
    sagittal cut through the roi's centre gives y (the middle of the mask's extent on row z), the coronal cut x.
    Each cut is segmented with the box its plane sees of the roi (in-plane range grown by `slack` a side, the
    roi's z-range), in a focus window `context` times that box. None where the cut shows nothing on a row."""
    assert prompt.roi is not None
    x0, x1, y0, y1, z0, z1 = (int(v) for v in prompt.roi)
    depth = volume.shape[2]
    centres: dict[int, list[float | None]] = {z: [None, None] for z in range(z0, z1 + 1)}
    cuts = (("sagittal", 1, (y0, y1), (x0 + x1) // 2), ("coronal", 0, (x0, x1), (y0 + y1) // 2))
    for plane, axis, (low, high), at in cuts:  # axis: which centre coordinate the cut shows
        view = volume.plane_view(plane)
        grow = round(slack * (high - low + 1))
        box = np.asarray([max(0, low - grow), depth - 1 - z1, min(view.shape[0] - 1, high + grow), depth - 1 - z0])
        mask = predictor.predict(view, at, None, None, box, window=focus(box, view, context)).mask  # (Z, W)
        for z in centres:
            columns = np.nonzero(mask[depth - 1 - z])[0]
            if len(columns):
                centres[z][axis] = (columns.min() + columns.max()) / 2
    return {z: (c[0], c[1]) for z, c in centres.items()}


def mask_centres(mask: np.ndarray) -> dict[int, tuple[float, float]]:
    """{z: (x, y)} the middle of each slice's extent of a (X, Y, Z) mask, on the slices where it shows."""
    centres = {}
    for z in np.nonzero(mask.any(axis=(0, 1)))[0]:
        xs, ys = np.nonzero(mask[:, :, z].any(axis=1))[0], np.nonzero(mask[:, :, z].any(axis=0))[0]
        centres[int(z)] = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2)
    return centres


def nudge_centre(box: np.ndarray, centre: tuple[float | None, float | None] | None, limit: float) -> np.ndarray:
    """`box` moved towards `centre` (x, y; None: that axis stays) by at most `limit` pixels per axis."""
    if centre is None:
        return box
    shift = np.zeros(2)
    for axis, target in enumerate(centre):
        if target is not None:
            shift[axis] = np.clip(target - (box[axis] + box[axis + 2]) / 2, -limit, limit)
    return np.round(box + np.tile(shift, 2)).astype(np.int64)


def walk_evidence(walk: VolumeResult, plane: str | None = None) -> np.ndarray:
    """(X, Y, Z) float16: a walk's vote on every voxel, from its mask and margins (`propagate(..., margins=True)`)
    in the walk's own layout (`plane`: a sagittal or coronal view; None: axial): on each segmented slice the
    decoder's margin clipped to +-EVIDENCE_CLIP within EVIDENCE_REACH voxels of the mask (in 3D, 6-connected: its
    neighbour slices' masks count too; in-plane only lost 0.003 on sub-04/05), -EVIDENCE_CLIP elsewhere (a slice
    the walk never segmented says "not here")."""
    evidence = np.full(walk.mask.shape, -EVIDENCE_CLIP, np.float16)
    region = mask_region(walk.mask, EVIDENCE_REACH)
    if region is None:
        return evidence if plane is None else from_plane_view(evidence, plane)
    cross = ndimage.generate_binary_structure(3, 1)
    near = ndimage.binary_dilation(walk.mask[region], cross, iterations=EVIDENCE_REACH)  # beyond it: the fill
    xs, ys, zs = region
    for z, margin in walk.margins.items():
        if zs.start <= z < zs.start + near.shape[2]:
            votes = np.clip(margin.T[xs, ys], -EVIDENCE_CLIP, EVIDENCE_CLIP)
            evidence[xs, ys, z] = np.where(near[:, :, z - zs.start], votes, -EVIDENCE_CLIP)
    return evidence if plane is None else from_plane_view(evidence, plane)


def fuse_walks(
    walks: list[tuple[VolumeResult, str | None]], sigma: float, keep: list[int], weights: list[float]
) -> np.ndarray:
    """(X, Y, Z) voxels where the walks' Gaussian-smoothed evidence (sigma voxels; `walk_evidence`), weighted, sums
    above zero, within their masks' joint bounding box + 3 sigma + EVIDENCE_REACH (beyond it every walk says no);
    the first walk's slices in `keep` stay as they were. Each walk is (result in its own layout, its plane or None
    for axial). Logits rather than masks: a voxel that one walk barely took and another firmly rejected is decided
    by how sure each was (sub-04/05: 0.705 -> 0.709, README). One walk alone: the propagation's smoothing."""
    masks = [walk.mask if plane is None else from_plane_view(walk.mask, plane) for walk, plane in walks]
    first = masks[0]
    pad = int(np.ceil(3 * sigma)) + EVIDENCE_REACH
    regions = [r for r in (mask_region(m, pad) for m in masks) if r is not None]
    if not regions:
        return first
    region = tuple(slice(min(r[a].start for r in regions), max(r[a].stop for r in regions)) for a in range(3))
    total = np.zeros(first[region].shape, np.float32)
    for (walk, plane), weight in zip(walks, weights, strict=True):
        part = walk_evidence(walk, plane)[region].astype(np.float32)  # one whole-volume evidence at a time
        total += weight * (ndimage.gaussian_filter(part, sigma) if sigma > 0 else part)
    fused = np.zeros_like(first, order="F")
    fused[region] = total > 0
    for z in keep:
        fused[:, :, z] = first[:, :, z]
    return fused


def cross_plane_walks(
    predictor: SlicePredictor, volume: PreparedVolume, prompt: Prompt, axial: np.ndarray, config: PropagationConfig
) -> list[tuple[VolumeResult, str]]:
    """[(walk, plane)] for `fuse_walks`, each walk in its plane's layout, with margins: the structure walked through
    its sagittal slices and through its coronal ones, as far as the axial walk's mask `axial` reaches along that
    axis (+ 1), each walk starting from the slice through the middle of that reach, with the box the axial mask
    shows there (+ the margin) over the roi's z-range, and each box moved towards the axial mask's centre on its
    slice by at most `plane_guide` (sub-04/05: 0.700 -> 0.705 fused; README). (The roi's own box is the prompted
    slice's, which a curved structure leaves elsewhere: walks from it lost 0.03 on sub-05.)"""
    assert prompt.roi is not None
    z0, z1 = int(prompt.roi[4]), int(prompt.roi[5])
    depth = volume.shape[2]
    rows = [depth - 1 - z1, depth - 1 - z0]  # a view's rows run superior to inferior
    config = replace(config, planes=1, smooth_sigma=0.0)
    walks = []
    for plane, axis in (("sagittal", 0), ("coronal", 1)):
        reach = np.nonzero(axial.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if len(reach) == 0:
            continue
        start = int(reach.min() + reach.max()) // 2
        section = axial.take(start, axis=axis)  # (Y, Z) or (X, Z)
        extent = np.nonzero((section if section.any() else axial.any(axis=axis)).any(axis=1))[0]
        size = volume.shape[1 - axis]
        across = [max(0, int(extent.min()) - config.margin), min(size - 1, int(extent.max()) + config.margin)]
        along = [max(0, int(reach.min()) - 1), min(volume.shape[axis] - 1, int(reach.max()) + 1)]
        view = volume.plane_view(plane)
        view_prompt = Prompt.from_request({"roi": [*across, *rows, *along], "slice": start}, view.shape)
        centres = mask_centres(to_plane_view(axial, plane))
        walks.append((propagate(predictor, view, view_prompt, config, centres=centres, margins=True), plane))
    return walks


def slice_votes(
    predictor: SlicePredictor, volume: PreparedVolume, decoded: SlicePrediction, final: SlicePrediction
) -> np.ndarray:
    """(H, W) float16: the decoder's margin on a slice (`SlicePredictor.slice_margin`), sure (+-EVIDENCE_CLIP)
    where clicks edited its mask (`final` against `decoded`): an annotator's edit is no guess, and its
    neighbours' smoothing should lean on it (bench_interactive, LiteMedSAM, 30 sessions: 3D Dice after 1 / 3 / 5
    clicks 0.679 / 0.668 / 0.666 without, 0.684 / 0.683 / 0.676 with; the box alone 0.675 either way)."""
    margin = predictor.slice_margin(volume, decoded)
    margin[final.mask & ~decoded.mask] = EVIDENCE_CLIP
    margin[decoded.mask & ~final.mask] = -EVIDENCE_CLIP
    return margin.astype(np.float16)


def correct(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    z: int,
    decoded: SlicePrediction,
    prompt: Prompt,
    corrections: bool,
) -> SlicePrediction:
    """The decoded slice edited by the clicks on it (lib.engine.corrections), or as decoded."""
    if not corrections:
        return decoded
    return apply_clicks(predictor, volume, z, decoded, *prompt.points_on(z))


def propagate(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    prompt: Prompt,
    config: PropagationConfig = PropagationConfig(),
    centres: dict[int, tuple[float | None, float | None]] | None = None,
    margins: bool = False,
) -> VolumeResult:
    """Segment the prompted slice, then walk up and down slice by slice within the roi (or until a stop).

    centres: {z: (x, y)} to steer the boxes towards (`plane_guide`); None: from two cuts (`plane_centres`).
    margins: keep each segmented slice's `slice_margin` in the result (three-plane fusion votes with them).
    """
    begin = time.perf_counter()
    encoded_before = predictor.encoded_slices
    width, height, depth = volume.shape
    z_low, z_high = prompt.z_range(depth)
    z0 = int(np.clip(prompt.start_slice(), z_low, z_high))
    decoded = decode_slice(
        predictor, volume, prompt, z0, config.first_context or config.context, config.click_corrections
    )
    first = correct(predictor, volume, z0, decoded, prompt, config.click_corrections)
    # the next slice is prompted from the model's mask plus what clicks added: a background click's cut
    # stays on its own slice instead of shrinking every slice after it
    reach = decoded.mask | first.mask
    mask = np.zeros(volume.shape, dtype=bool, order="F")  # F order: NIfTI/NRRD write it in one copy
    done: list[int] = []
    kept_margins: dict[int, np.ndarray] = {}
    keep_margins = margins or config.smooth_sigma > 0 or (config.planes == 3 and prompt.roi is not None)
    stops: dict[str, str] = {}
    if first.mask.sum() >= config.min_area:
        mask[:, :, z0] = first.mask.T
        done.append(z0)
        if keep_margins:
            kept_margins[z0] = slice_votes(predictor, volume, decoded, first)
        guide = {}
        if config.plane_guide > 0 and prompt.roi is not None and z_high > z_low:
            guide = (
                centres
                if centres is not None
                else plane_centres(predictor, volume, prompt, config.first_context or config.context)
            )
        for step, limit in ((1, z_high), (-1, z_low)):
            previous, previous_reach, z = first, reach, z0 + step
            previous_window = focus(prompt.box_2d(), volume, config.first_context or config.context)
            while (z <= limit) if step > 0 else (z >= limit):
                box = bounding_box(previous_reach)
                assert box is not None
                box = grow_box(box, config.margin, width, height)
                if config.end_taper and prompt.roi is not None:
                    box = tapered_box(box, prompt, z0, z, config.margin)
                box = nudge_centre(box, guide.get(z), config.plane_guide)
                window = focus(box, volume, config.context)
                if window is None:  # whole slices: encode a few ahead in one go
                    ahead = [z + step * i for i in range(config.prefetch) if z_low <= z + step * i <= z_high]
                    predictor.encode(volume, ahead)
                points, labels = prompt.points_on(z)
                given = decoder_points(predictor, points, labels, config.click_corrections)
                use_mask = config.use_mask_prompt and window is None and previous_window is None
                current = predictor.predict(
                    volume, z, *given, box, previous.low_res_logits if use_mask else None, window=window
                )
                if config.roi_slack >= 0 and prompt.roi is not None:  # see PropagationConfig
                    current.mask = clip_to_roi(current.mask, prompt, config.roi_slack)
                if config.keep_connected:
                    current.mask = keep_connected(current.mask, previous_reach)
                decoded, current = current, correct(predictor, volume, z, current, prompt, config.click_corrections)
                area, previous_area = int(current.mask.sum()), int(previous.mask.sum())
                reason = None
                if area < config.min_area:
                    reason = f"empty at z={z}"
                elif prompt.roi is None and area > config.max_growth * previous_area:
                    reason = f"area jumped at z={z}"
                elif prompt.roi is None and current.iou < config.min_iou:
                    reason = f"low predicted IoU at z={z}"
                if reason:
                    stops["up" if step > 0 else "down"] = reason
                    break
                mask[:, :, z] = current.mask.T
                done.append(z)
                if keep_margins:
                    kept_margins[z] = slice_votes(predictor, volume, decoded, current)
                previous, previous_reach, previous_window = current, decoded.mask | current.mask, window
                z += step
    clicked = {int(z) for z in np.concatenate([prompt.foreground[:, 2], prompt.background[:, 2]])}
    planes = 3 if config.planes == 3 and prompt.roi is not None and z_high > z_low and done else 1
    walks = [(VolumeResult(mask, volume.affine, done, margins=kept_margins), None)]
    if planes == 3:
        walks += cross_plane_walks(predictor, volume, prompt, mask, config)
        # the axial walk counts twice: it had the annotator's own box (sub-04/05: 0.700, equal weights 0.693)
        mask = fuse_walks(walks, config.smooth_sigma, sorted(clicked), [2.0] + [1.0] * (len(walks) - 1))
        mask[:, :, :z_low] = mask[:, :, z_high + 1 :] = False  # the roi's z-range is the annotator's word
    elif config.smooth_sigma > 0 and done:
        mask = fuse_walks(walks, config.smooth_sigma, sorted(clicked), [1.0])
    seconds = time.perf_counter() - begin
    info = {
        "slice": z0,
        "slices": [min(done), max(done)] if done else [],
        "slices_segmented": len(done),
        "slices_encoded_now": predictor.encoded_slices - encoded_before,
        "stops": stops,
        "planes": planes,
        "seconds": round(seconds, 3),
        "seconds_per_slice": round(seconds / max(1, len(done)), 3),
    }
    logger.info("3D propagation: %d slices from z=%d in %.2f s (%s)", len(done), z0, seconds, stops or "roi bounds")
    return VolumeResult(mask, volume.affine, sorted(done), info, kept_margins if margins else {})
