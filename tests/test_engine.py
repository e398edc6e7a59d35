"""The engine on real sample anatomy with the real LiteMedSAM weights (no server)."""

from dataclasses import replace
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import load_truth
from lib.engine.cache import EmbeddingCache
from lib.engine.interactive import (
    EVIDENCE_CLIP,
    PropagationConfig,
    VolumeResult,
    clip_to_roi,
    cross_plane_walks,
    focus,
    fuse_walks,
    mask_centres,
    mask_region,
    nudge_centre,
    plane_centres,
    propagate,
    segment_2d,
    slice_votes,
    tapered_box,
    walk_evidence,
)
from lib.engine.predictor import SlicePrediction, SlicePredictor
from lib.engine.preprocessing import IntensityConfig, intensity_bounds, to_uint8
from lib.engine.prompts import Prompt
from lib.engine.volumes import (
    ImageReadError,
    ImageTooLarge,
    PreparedVolume,
    VolumeStore,
    from_plane_view,
    to_plane_view,
)
from lib.evaluation.ground_truth import box_on_slice, centre_click, dice, middle_slice, roi_3d


@pytest.fixture(scope="module")
def engine(lite_model, sample_data):
    predictor = SlicePredictor(lite_model, EmbeddingCache(512 << 20))
    volume = VolumeStore(IntensityConfig()).get(sample_data / "studies" / "sub-01.nii.gz")
    return predictor, volume, load_truth(sample_data, "sub-01")


def test_ct_is_windowed_and_mr_percentile_scaled():
    ct = np.full((4, 4, 4), -1000.0)
    ct[1:3, 1:3, 1:3] = 40.0
    modality, low, high = intensity_bounds(ct, IntensityConfig())
    assert (modality, low, high) == ("CT", -160.0, 240.0)
    assert to_uint8(np.array([-1000.0, 40.0, 3000.0]), low, high).tolist() == [0, 127, 255]
    mr = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    assert intensity_bounds(mr, IntensityConfig())[0] == "MR"


def test_box_prompt_on_real_slices_reaches_dice_08(engine, labels):
    predictor, volume, truth = engine
    scores = []
    for name in ("left_thalamus", "right_putamen", "left_caudate", "left_hippocampus"):
        structure = truth == labels[name]
        z = middle_slice(structure)
        result = segment_2d(predictor, volume, Prompt.from_request({"roi": box_on_slice(structure, z)}, volume.shape))
        scores.append(dice(result.mask[:, :, z], structure[:, :, z]))
        assert result.mask.sum() == result.mask[:, :, z].sum(), "2D writes only the prompted slice"
    assert np.mean(scores) >= 0.8, scores


def test_second_click_on_a_slice_does_not_run_the_encoder(engine):
    predictor, volume, _ = engine
    prompt = Prompt.from_request({"roi": [60, 80, 80, 110, 70, 70]}, volume.shape)
    segment_2d(predictor, volume, prompt)
    encoded, sides = predictor.encoded_slices, predictor.decoder.sides_made
    second = segment_2d(predictor, volume, Prompt.from_request({"roi": [62, 78, 82, 108, 70, 70]}, volume.shape))
    assert predictor.encoded_slices == encoded and second.info["cached_embedding"] is True
    assert predictor.decoder.sides_made == sides, "the second box made the decoder's image side again"


def test_later_clicks_on_a_slice_reuse_the_first_clicks_decode_and_cannot_corrupt_it(engine, labels):
    predictor, volume, truth = engine
    structure = truth == labels["left_thalamus"]
    z = middle_slice(structure)
    x, y = centre_click(structure[:, :, z])
    first = segment_2d(predictor, volume, Prompt.from_request({"foreground": [[x, y, z]]}, volume.shape))
    calls = predictor.decoder_calls
    inside = np.argwhere(first.mask[:, :, z])[len(np.argwhere(first.mask[:, :, z])) // 3]  # another mask pixel
    clicks = {"foreground": [[x, y, z], [int(inside[0]), int(inside[1]), z]]}
    second = segment_2d(predictor, volume, Prompt.from_request(clicks, volume.shape))
    assert predictor.decoder_calls == calls, "a click the mask agrees with ran the decoder again"
    assert np.array_equal(second.mask, first.mask)
    remembered = predictor.predict(volume, z, None, None, np.asarray([x - 8, y - 8, x + 8, y + 8]))
    with pytest.raises(ValueError):
        remembered.mask[0, 0] = True  # shared with later callers: read-only
    predictor.mask_threshold, threshold = predictor.mask_threshold + 1.0, predictor.mask_threshold
    try:
        predictor.predict(volume, z, None, None, np.asarray([x - 8, y - 8, x + 8, y + 8]))
        assert predictor.decoder_calls == calls + 2, "another threshold must decode again"
    finally:
        predictor.mask_threshold = threshold


@pytest.mark.slow
def test_propagation_stays_in_the_roi_and_follows_the_structure(engine, labels):
    predictor, volume, truth = engine
    structure = truth == labels["right_putamen"]
    roi = roi_3d(structure)
    result = propagate(predictor, volume, Prompt.from_request({"roi": roi}, volume.shape))
    zs = np.nonzero(result.mask.any(axis=(0, 1)))[0]
    assert roi[4] <= zs.min() and zs.max() <= roi[5]
    assert dice(result.mask, structure) >= 0.6


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08 not really a gzip")
    with pytest.raises(ImageReadError, match="cannot read image broken.nii.gz"):
        VolumeStore(IntensityConfig()).get(bad)
    with pytest.raises(ImageReadError, match="not found"):
        VolumeStore(IntensityConfig()).get(tmp_path / "absent.nii.gz")


def test_an_image_over_the_size_limit_is_refused_before_its_data_is_read(sample_data):
    image = sample_data / "studies" / "sub-01.nii.gz"  # 5.1 million voxels
    with pytest.raises(ImageTooLarge, match="has 5 million voxels.*limit is 4 million"):
        VolumeStore(IntensityConfig(), max_voxels=4_000_000).get(image)
    assert VolumeStore(IntensityConfig(), max_voxels=6_000_000).get(image).shape == nib.load(image).shape


def test_a_volume_is_keyed_by_content_so_a_copy_finds_its_embeddings(sample_data, tmp_path):
    import shutil

    original = sample_data / "studies" / "sub-01.nii.gz"
    copy = tmp_path / "copied-elsewhere.nii.gz"
    shutil.copy(original, copy)  # a new path and modification time, the same bytes
    key = VolumeStore(IntensityConfig()).get(original).key
    assert VolumeStore(IntensityConfig()).get(copy).key == key
    assert VolumeStore(IntensityConfig(ct_window=(0.0, 80.0))).get(copy).key != key, "intensity settings count"

    image = nib.load(copy)
    changed = np.asarray(image.dataobj).copy()
    changed[0, 0, 0] += 1  # one voxel: another volume
    nib.save(nib.Nifti1Image(changed, image.affine, image.header), copy)
    assert VolumeStore(IntensityConfig()).get(copy).key != key


def test_concurrent_clicks_on_one_new_slice_encode_it_once(engine):
    from concurrent.futures import ThreadPoolExecutor

    predictor, volume, _ = engine
    z = 30  # a slice no other test touches
    assert not predictor.is_encoded(volume, z)
    encoded = predictor.encoded_slices
    box = np.array([40, 60, 90, 120])
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: predictor.predict(volume, z, None, None, box), range(4)))
    assert predictor.encoded_slices == encoded + 1, "the other three waited for the first encoder run"
    for result in results[1:]:
        np.testing.assert_array_equal(result.mask, results[0].mask)


def test_propagated_masks_are_cut_to_the_roi_box_with_slack():
    prompt = Prompt.from_request({"roi": [10, 19, 20, 29, 0, 3]}, (64, 64, 4))  # x 10..19, y 20..29
    flood = np.ones((64, 64), bool)  # (H, W): rows are y
    cut = clip_to_roi(flood, prompt, 0.5)
    ys, xs = np.nonzero(cut)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 24, 15, 34)
    assert clip_to_roi(flood, prompt, 0.0).sum() == 100


def test_the_box_narrows_towards_the_rois_z_ends_around_its_own_centre():
    # roi: a 41 x 21 in-plane box, slices 10..30, prompted at 20 (D = 11 on both sides)
    prompt = Prompt.from_request({"roi": [100, 140, 50, 70, 10, 30]}, (256, 256, 64))
    box = np.asarray([98, 48, 142, 72])  # the previous mask's box + margin, a little wider than the roi's
    near = tapered_box(box, prompt, 20, 21, margin=3)  # scale 1 - (1/11)^2: limits 46.6 x 26.8, above the box
    assert np.array_equal(near, box)
    end = tapered_box(box, prompt, 20, 30, margin=3)  # scale 1 - (10/11)^2 = 0.17: 7.0 + 6 by 3.6 + 6
    assert np.array_equal(end, [114, 56, 126, 64]), end
    assert np.allclose((end[:2] + end[2:]) / 2, (box[:2] + box[2:]) / 2)
    below = tapered_box(box, prompt, 20, 10, margin=3)  # the other side of the prompted slice narrows the same
    assert np.array_equal(below, end)
    small = np.asarray([118, 58, 122, 62])
    assert np.array_equal(tapered_box(small, prompt, 20, 29, margin=3), small)  # never widens a box


def test_plane_views_are_the_same_voxels_superior_up():
    data = np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7)  # (X, Y, Z)
    volume = PreparedVolume("k", data, np.eye(4), "MR")
    sagittal, coronal = volume.plane_view("sagittal"), volume.plane_view("coronal")
    assert sagittal.key != volume.key != coronal.key  # their embeddings are cached apart
    assert sagittal.slice_image(2).shape == (7, 6) and coronal.slice_image(4).shape == (7, 5)  # (Z, Y), (Z, X)
    for row in range(7):  # the first row is the last z
        assert np.array_equal(sagittal.slice_image(2)[row], data[2, :, 6 - row])
        assert np.array_equal(coronal.slice_image(4)[row], data[:, 4, 6 - row])


def test_a_mask_segmented_on_a_plane_view_comes_back_on_the_volumes_axes():
    data = np.random.default_rng(0).integers(0, 255, (5, 6, 7), dtype=np.uint8)
    volume = PreparedVolume("k", data, np.eye(4), "MR")
    for plane in ("sagittal", "coronal"):
        assert np.array_equal(from_plane_view(volume.plane_view(plane).data, plane), data), plane


def sure(mask: np.ndarray, inside: float = EVIDENCE_CLIP, outside: float = -EVIDENCE_CLIP) -> tuple[VolumeResult, None]:
    """An axial walk with the same margin on every voxel of its mask (`inside`) and on every other one."""
    margins = {z: np.where(mask[:, :, z].T, inside, outside) for z in range(mask.shape[2])}
    return VolumeResult(mask, np.eye(4), margins=margins), None


def test_fusing_three_planes_keeps_what_two_agree_on_and_drops_what_one_alone_says():
    axial = np.zeros((30, 30, 20), bool)
    axial[10:20, 10:20, 4:16] = True
    axial[:, :, 9] = False  # a slice the axial walk lost
    sagittal, coronal = axial.copy(), axial.copy()
    sagittal[:, :, 9] = coronal[:, :, 9] = False
    sagittal[10:20, 10:20, 9] = True  # the sagittal walk found it: with the coronal one missing it, 1 of 3
    coronal[10:20, 10:20, 9] = True  # ...and the coronal one too: 2 of 3
    coronal[2:8, 2:8, 2:18] = True  # a neighbour only the coronal walk took
    walks = [sure(axial), sure(sagittal), sure(coronal)]
    for sigma in (0.0, 1.0):
        fused = fuse_walks(walks, sigma, keep=[], weights=[1.0, 1.0, 1.0])
        assert fused[12:18, 12:18, 9].all() and not fused[2:8, 2:8, 2:18].any()
    assert not fuse_walks(walks, 1.0, keep=[9], weights=[1.0] * 3)[:, :, 9].any()  # a clicked slice stays axial
    empty = np.zeros_like(axial)
    assert fuse_walks([sure(empty)] * 3, 1.0, keep=[], weights=[1.0] * 3) is empty
    # the axial walk counting twice: it still needs one view to agree, and two views without it are outvoted
    one, two, three = (np.zeros((8, 8, 8), bool) for _ in range(3))
    one[:4] = True
    two[:2] = three[2:6] = True
    weighted = fuse_walks([sure(one), sure(two), sure(three)], 0.0, keep=[], weights=[2.0, 1.0, 1.0])
    assert weighted[:4].all() and not weighted[4:].any()
    assert not fuse_walks([sure(one), sure(two), sure(three)], 0.0, keep=[], weights=[1.0, 1.0, 1.0])[4:].any()
    # how sure each walk was decides: the one that took [4:6] barely loses, the one that rejected it barely too
    took, rejected = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    took[:6] = rejected[:4] = True
    assert not fuse_walks([sure(took, inside=0.5), sure(rejected)], 0.0, [], [1.0, 1.0])[4:6].any()
    assert fuse_walks([sure(took), sure(rejected, outside=-0.5)], 0.0, [], [1.0, 1.0])[4:6].all()
    # a view's walk comes back on the volume's axes
    view = sure(to_plane_view(coronal, "coronal"))[0]
    assert np.array_equal(fuse_walks([(view, "coronal")], 0.0, [], [1.0]), coronal)


def test_a_slice_margin_is_above_zero_exactly_where_the_decoded_mask_is(engine, labels):
    predictor, volume, truth = engine
    structure = truth == labels["left_thalamus"]
    z = middle_slice(structure)
    box = Prompt.from_request({"roi": box_on_slice(structure, z)}, volume.shape).box_2d()
    for window in (None, focus(box, volume, 3.0)):
        prediction = predictor.predict(volume, z, box=box, window=window)
        margin = predictor.slice_margin(volume, prediction)
        assert margin.shape == prediction.mask.shape and prediction.mask.sum() > 50
        assert np.array_equal(margin > 0, prediction.mask)
    inside = window.paste(np.ones((window.side, window.side), bool), margin.shape)
    assert np.array_equal(np.isfinite(margin), inside) and not inside.all()  # outside the focus window: no opinion


def test_a_masks_region_is_its_bounding_box_grown_and_cut_at_the_volumes_low_edges():
    mask = np.zeros((20, 30, 12), bool, order="F")
    assert mask_region(mask, 2) is None
    mask[4:9, 0:6, 3] = True
    mask[6, 10, 7] = True
    assert mask_region(mask) == ndimage.find_objects(mask.view(np.uint8))[0]
    assert mask_region(mask, 2) == (slice(2, 11), slice(0, 13), slice(1, 10))


def test_a_walks_evidence_is_its_clipped_margin_near_its_mask_and_no_elsewhere():
    mask = np.zeros((12, 10, 6), bool)
    mask[3:6, 2:5, 2] = True
    margin = np.full((10, 12), 50.0, np.float32)  # (H, W) = (Y, X): sure everywhere, even far from the mask
    margin[0, 0] = -np.inf  # outside a focus window
    evidence = walk_evidence(VolumeResult(mask, np.eye(4), [2], margins={2: margin}))
    assert evidence.dtype == np.float16 and evidence.shape == mask.shape
    assert np.all(evidence[3:6, 2:5, 2] == np.float16(EVIDENCE_CLIP))  # clipped
    assert evidence[1, 2, 2] == np.float16(EVIDENCE_CLIP) and evidence[0, 2, 2] == np.float16(-EVIDENCE_CLIP)
    assert np.all(evidence[:, :, [0, 1, 3, 4, 5]] == np.float16(-EVIDENCE_CLIP))  # slices it never segmented
    # a sagittal walk's evidence comes back on the volume's axes, near its mask on each of its slices (x = i)
    view = to_plane_view(mask, "sagittal")
    sure_margins = {x: np.ones(view[:, :, x].T.shape, np.float32) for x in range(2, 7)}
    back = walk_evidence(VolumeResult(view, np.eye(4), margins=sure_margins), "sagittal")
    assert back.shape == mask.shape
    near = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1), iterations=2)  # 3D, 6-connected
    assert near[2].any() and not mask[2].any()  # the slice beside the mask's own counts as near
    for x in range(2, 7):
        assert np.array_equal(back[x] > 0, near[x]), x


def test_a_slices_votes_are_sure_where_clicks_edited_its_mask():
    decoded_mask = np.zeros((6, 8), bool)
    decoded_mask[1:4, 1:4] = True
    final_mask = decoded_mask.copy()
    final_mask[1, 1] = False  # a background click's cut
    final_mask[4, 5] = True  # a foreground click's addition
    decoded = SlicePrediction(decoded_mask, torch.zeros(1, 1, 256, 256), 0.9)
    final = SlicePrediction(final_mask, torch.zeros(1, 1, 256, 256), 0.9)
    unsure = SimpleNamespace(slice_margin=lambda volume, prediction: np.full((6, 8), 0.25, np.float32))
    votes = slice_votes(unsure, None, decoded, final)
    assert votes.dtype == np.float16
    assert votes[1, 1] == np.float16(-EVIDENCE_CLIP) and votes[4, 5] == np.float16(EVIDENCE_CLIP)
    assert np.all(votes[2:4, 2:4] == np.float16(0.25))  # unedited: the decoder's own margin


def test_mask_centres_are_the_middle_of_each_slices_extent():
    mask = np.zeros((20, 30, 5), bool)
    mask[4:9, 10:21, 1] = True  # x 4..8, y 10..20
    mask[[2, 12], 5, 3] = True  # two specks: the extent's middle, not the mean
    assert mask_centres(mask) == {1: (6.0, 15.0), 3: (7.0, 5.0)}


class BrightInTheBox:
    """Stands in for the model where only geometry is under test: a slice's mask is its bright pixels inside the
    box (the real model's gain from three planes is measured in README, not asserted here)."""

    model = SimpleNamespace(spec=SimpleNamespace(point_prompts=False))
    encoded_slices = 0

    def __init__(self):
        self.boxes = []  # (volume key, z, box) of every decode

    def encode(self, volume, slices, window=None) -> int:
        return 0

    def predict(self, volume, z, points_xy=None, point_labels=None, box=None, mask_input=None, window=None):
        image = volume.slice_image(z)
        inside = np.zeros(image.shape, bool)
        x0, y0, x1, y1 = (int(v) for v in box)
        inside[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
        self.boxes.append((volume.key, int(z), (x0, y0, x1, y1)))
        return SlicePrediction((image > 127) & inside, torch.zeros(1, 1, 256, 256), 1.0)

    def slice_margin(self, volume, prediction):
        return np.where(prediction.mask, 3.0, -3.0).astype(np.float32)


def test_the_sagittal_and_coronal_walks_come_back_on_the_volumes_axes_and_fuse():
    # a tilted ellipsoid with three different radii, off centre: a swapped or flipped axis would misplace it
    volume, truth, prompt = tilted_ellipsoid()
    config = PropagationConfig(roi_slack=0.5, plane_guide=0.0, smooth_sigma=0.0, planes=3)
    axial = propagate(BrightInTheBox(), volume, prompt, replace(config, planes=1)).mask
    walks = cross_plane_walks(BrightInTheBox(), volume, prompt, axial, config)
    assert [plane for _, plane in walks] == ["sagittal", "coronal"]
    sagittal, coronal = (from_plane_view(walk.mask, plane) for walk, plane in walks)
    assert dice(sagittal, truth) > 0.9 and dice(coronal, truth) > 0.9, (dice(sagittal, truth), dice(coronal, truth))
    for walk, plane in walks:  # a vote on every slice the walk segmented, on the volume's axes
        assert sorted(walk.margins) == walk.slices and walk_evidence(walk, plane).shape == truth.shape
    fused = propagate(BrightInTheBox(), volume, prompt, config)
    assert fused.info["planes"] == 3 and dice(fused.mask, truth) > 0.9
    roi = prompt.roi
    assert not fused.mask[:, :, : roi[4]].any() and not fused.mask[:, :, roi[5] + 1 :].any()  # the roi's z-range
    assert propagate(BrightInTheBox(), volume, prompt, replace(config, planes=1)).info["planes"] == 1


def tilted_ellipsoid() -> tuple[PreparedVolume, np.ndarray, Prompt]:
    x, y, z = np.meshgrid(np.arange(40), np.arange(48), np.arange(36), indexing="ij")
    truth = ((x - 17 - 0.3 * (z - 18)) / 9) ** 2 + ((y - 26) / 12) ** 2 + ((z - 18) / 7) ** 2 <= 1
    volume = PreparedVolume("ellipsoid", np.where(truth, 200, 20).astype(np.uint8), np.eye(4), "MR")
    return volume, truth, Prompt.from_request({"roi": roi_3d(truth), "slice": middle_slice(truth)}, volume.shape)


def test_given_centres_steer_the_boxes_instead_of_the_two_cuts():
    volume, truth, prompt = tilted_ellipsoid()
    config = PropagationConfig(roi_slack=-1.0, plane_guide=2.0, smooth_sigma=0.0)
    plain, steered = BrightInTheBox(), BrightInTheBox()
    propagate(plain, volume, prompt, config)
    assert any(key.endswith(":sagittal") for key, _, _ in plain.boxes)  # the cuts ran
    propagate(steered, volume, prompt, config, centres={z: (0.0, 0.0) for z in range(volume.shape[2])})
    assert all(key == "ellipsoid" for key, _, _ in steered.boxes)  # given centres: no cuts
    before = {z: np.asarray(box) for key, z, box in plain.boxes if key == "ellipsoid"}
    after = {z: np.asarray(box) for _, z, box in steered.boxes}
    moved = [z for z in after if z != prompt.start_slice() and z in before]
    assert moved and all(np.all(after[z][:2] + after[z][2:] < before[z][:2] + before[z][2:]) for z in moved)


def test_the_box_moves_towards_the_cuts_centre_by_at_most_the_limit():
    box = np.asarray([10, 20, 20, 30])  # centre (15, 25)
    assert np.array_equal(nudge_centre(box, (25.0, 24.0), 2.0), [12, 19, 22, 29])  # x by +2 (capped), y by -1
    assert np.array_equal(nudge_centre(box, (None, 40.0), 2.0), [10, 22, 20, 32])  # x unknown: stays
    assert np.array_equal(nudge_centre(box, None, 2.0), box)


def test_smoothing_fills_a_missed_slice_drops_a_stray_one_and_keeps_clicked_slices():
    mask = np.zeros((30, 30, 20), bool)
    mask[10:20, 10:20, 4:16] = True
    mask[:, :, 9] = False  # one slice the decoder lost
    mask[2:5, 2:5, 12] = True  # a stray blob on one slice
    smoothed = fuse_walks([sure(mask)], 1.0, keep=[], weights=[1.0])
    assert smoothed[12:18, 12:18, 9].all() and not smoothed[2:5, 2:5, 12].any()
    kept = fuse_walks([sure(mask)], 1.0, keep=[9], weights=[1.0])
    assert not kept[:, :, 9].any()  # a slice with clicks keeps its click-edited mask
    # an unsure edge gives way to sure neighbours: a bulge the decoder barely took is dropped, a firm one kept
    bulge = mask.copy()
    bulge[20:24, 10:20, 8:13] = True
    for margin, expected in ((0.3, False), (EVIDENCE_CLIP, True)):
        walk = sure(bulge)[0]
        for z in range(8, 13):
            walk.margins[z][10:20, 20:24] = margin  # (Y, X)
        assert fuse_walks([(walk, None)], 1.0, keep=[], weights=[1.0])[22, 12:18, 10].all() == expected, margin


def test_the_sagittal_and_coronal_cuts_find_the_structures_centre_on_its_slices(engine, labels):
    predictor, volume, truth = engine
    structure = truth == labels["left_thalamus"]
    roi = roi_3d(structure)
    centres = plane_centres(predictor, volume, Prompt.from_request({"roi": roi}, volume.shape), context=3.0)
    assert sorted(centres) == list(range(roi[4], roi[5] + 1))
    xc, yc = (roi[0] + roi[1]) // 2, (roi[2] + roi[3]) // 2
    errors = []
    for z, (x, y) in centres.items():  # against the truth's own extent along the same two lines
        xs, ys = np.nonzero(structure[:, yc, z])[0], np.nonzero(structure[xc, :, z])[0]
        if len(xs) and len(ys) and x is not None and y is not None:
            errors += [abs(x - (xs.min() + xs.max()) / 2), abs(y - (ys.min() + ys.max()) / 2)]
    assert len(errors) >= len(centres)  # two errors a slice: at least half the slices show it in both cuts
    assert np.median(errors) <= 2.0, errors
