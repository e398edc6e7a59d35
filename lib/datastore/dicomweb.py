"""MONAI Label's DICOMweb datastore with the defects met on a real PACS worked around.

* MONAI Label 0.8.5 caches its series listings for `MONAI_LABEL_DICOMWEB_CACHE_EXPIRY` (2 h): after a final
  label is stored in the PACS as a DICOM SEG, the image still counted as unlabelled, so every strategy
  handed the labelled image out again for two hours. Here the listings are refreshed after each save, and
  after each store through the server's DICOMweb proxy (lib.hardening).
* A DICOM SEG stored in the PACS by a viewer (OHIF's "Export DICOM SEG", lib.viewer) is a final label, but
  MONAI Label's datastore knew only the labels saved through it: its SEG listing counted the image as labelled
  while no label could be read for it, so training skipped it. It also decoded a SEG to a volume covering only
  the SEG's own frames, in `.seg.nrrd`, which neither matches the image grid nor reads as NIfTI, and took the
  label values from each writer's own segment numbers. Here the PACS is where final labels are read from:
  the newest SEG on a series is its final label, decoded onto the image grid as NIfTI (written atomically,
  kept by SEG series), with each segment's value taken from its name in the app's labels.
* Its default search filter is `{"Modality": "CT"}`, which hides every MR study; the app asks for the
  modalities of its `dicomweb_modalities` conf (CT and MR) unless `MONAI_LABEL_DICOMWEB_SEARCH_FILTER` is set
  to something else.
"""

from __future__ import annotations

import datetime
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom_seg
import SimpleITK as sitk
from cachetools import TTLCache, cached
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.atomic import replace_atomic
from lib.datastore.checks import UnreadableLabel

logger = logging.getLogger(__name__)
FINAL = DefaultLabelTag.FINAL.value

MONAILABEL_SEARCH_FILTER = {"Modality": "CT"}  # monailabel.config's default


@dataclass(frozen=True)
class SegLabel:
    """A DICOM SEG series in the PACS that labels an image series."""

    series_uid: str
    study_uid: str
    image_uid: str
    # when it was written (series, else content date and time), seconds since the epoch; DICOM times carry no
    # zone and are read as UTC, which orders the SEGs of one site
    ts: float


def _dicom_time(meta: Dataset) -> float:
    for date_tag, time_tag in (("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime")):
        date, clock = str(meta.get(date_tag, "") or ""), str(meta.get(time_tag, "") or "")
        if len(date) == 8:
            clock = (clock.split(".")[0] + "000000")[:6]
            when = datetime.datetime.strptime(date + clock, "%Y%m%d%H%M%S").replace(tzinfo=datetime.UTC)
            return when.timestamp()
    return 0.0


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


class PacsDatastore(DICOMWebDatastore):
    """DICOMWebDatastore whose final labels are the SEGs in the PACS, and whose listings follow new labels.

    The app sets `labels` ({name: value}) after building it (MONAI Label builds the DICOMweb datastore)."""

    labels: dict[str, int] = {}

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def seg_labels(self) -> dict[str, SegLabel]:
        """{image series UID: its newest SEG} over every SEG in the PACS that references a listed series."""
        images = set(self.list_images())
        newest: dict[str, SegLabel] = {}
        for found in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            seg = Dataset.from_json(found)
            study, series = str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(study, series)[0])
            referenced = meta.get("ReferencedSeriesSequence")
            image = str(referenced[0].SeriesInstanceUID) if referenced else ""
            if image not in images:
                logger.warning("SEG %s ignored: it references no listed image series (%r)", series, image)
                continue
            label = SegLabel(series, study, image, _dicom_time(meta))
            if image not in newest or label.ts >= newest[image].ts:
                newest[image] = label
        return newest

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """The image series with a SEG: `seg_labels`' scan, not a second one of MONAI Label's own."""
        return sorted(self.seg_labels())

    def _seg(self, label_id: str) -> SegLabel | None:
        return next((s for s in self.seg_labels().values() if s.series_uid == label_id), None)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        seg = self.seg_labels().get(image_id) if tag == FINAL else None
        return seg.series_uid if seg else super().get_label_by_image_id(image_id, tag)

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        seg = self._seg(label_id) if label_tag == FINAL else None
        if seg is None:
            return super().get_label_info(label_id, label_tag)
        return {"ts": seg.ts, "SeriesInstanceUID": seg.series_uid, "StudyInstanceUID": seg.study_uid, "source": "SEG"}

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        seg = self._seg(label_id) if label_tag == FINAL else None
        if seg is None:
            return super().get_label_uri(label_id, label_tag, image_id)
        path = Path(self._datastore.label_path(FINAL)) / "from-seg" / f"{seg.series_uid}.nii.gz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            instances = self._client.retrieve_series(seg.study_uid, seg.series_uid)
            segs = [i for i in instances if "SegmentSequence" in i]
            if len(segs) != 1:
                raise UnreadableLabel(f"SEG series {seg.series_uid} holds {len(segs)} SEG instances, not 1")
            try:
                label = seg_on_image(segs[0], self.get_image_uri(seg.image_uid), self.labels)
            except (ValueError, KeyError, AttributeError, RuntimeError) as error:  # pydicom-seg's and ITK's
                raise UnreadableLabel(f"SEG {seg.series_uid} does not decode as a label map: {error}") from error
            replace_atomic(path, lambda f: f.write(gzip.compress(label.to_bytes(), 6)), binary=True)
            logger.info("final label of %s: SEG %s, on the image grid in %s", seg.image_uid, seg.series_uid, path)
        return str(path)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        saved = super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        refresh_listings()
        return saved


def refresh_listings() -> None:
    """Drop MONAI Label's cached QIDO answers (series and SEG listings), so the next request asks the PACS."""
    DICOMWebDatastore.list_images.cache_clear()
    DICOMWebDatastore.get_labeled_images.cache_clear()
    PacsDatastore.seg_labels.cache_clear()


def seg_on_image(seg: Dataset, image_path: str, labels: dict[str, int]) -> nib.Nifti1Image:
    """A DICOM SEG as a label map on the grid of the image at `image_path` (NIfTI): each segment gets the value
    its name has in `labels`. Segments with a name that is not in `labels` are left out, with a warning."""
    decoded = pydicom_seg.MultiClassReader().read(seg)
    known = {_key(name): value for name, value in labels.items()}
    values = np.zeros(max(decoded.segment_infos, default=0) + 1, dtype=np.uint8)
    unknown = []
    for number, info in decoded.segment_infos.items():
        name = str(info.get("SegmentLabel", ""))
        if _key(name) in known:
            values[number] = known[_key(name)]
        else:
            unknown.append(f"{number}: {name!r}")
    if unknown:
        logger.warning("SEG %s: segments not among the labels, left out: %s", seg.SeriesInstanceUID, ", ".join(unknown))
    by_name = sitk.GetImageFromArray(values[sitk.GetArrayFromImage(decoded.image)])
    by_name.CopyInformation(decoded.image)
    grid = sitk.ImageFileReader()
    grid.SetFileName(str(image_path))
    grid.ReadImageInformation()  # the geometry only, not the pixels
    reference = sitk.Image(grid.GetSize()[:3], sitk.sitkUInt8)
    reference.SetSpacing(grid.GetSpacing()[:3])
    reference.SetOrigin(grid.GetOrigin()[:3])
    reference.SetDirection(np.reshape(grid.GetDirection(), (grid.GetDimension(),) * 2)[:3, :3].flatten().tolist())
    on_grid = sitk.Resample(by_name, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # for one file, SimpleITK's index (i, j, k) is nibabel's [i, j, k]; its arrays are [k, j, i]
    return nib.Nifti1Image(sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0), nib.load(image_path).affine)


def search_filter(modalities: tuple[str, ...]) -> dict[str, str]:
    """QIDO-RS filter for series of any of these modalities (a comma list, as DICOMweb and Orthanc take it)."""
    return {"Modality": ",".join(modalities)}
