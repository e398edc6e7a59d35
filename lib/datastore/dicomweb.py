"""MONAI Label's DICOMweb datastore with the defects met on a real PACS worked around.

* MONAI Label 0.8.5 caches its series listings for `MONAI_LABEL_DICOMWEB_CACHE_EXPIRY` (2 h): after a final
  label is stored in the PACS as a DICOM SEG, the image still counted as unlabelled, so every strategy
  handed the labelled image out again for two hours. Here the listings are refreshed after each save.
* Its default search filter is `{"Modality": "CT"}`, which hides every MR study; the app asks for the
  modalities of its `dicomweb_modalities` conf (CT and MR) unless `MONAI_LABEL_DICOMWEB_SEARCH_FILTER` is set
  to something else.
"""

from __future__ import annotations

from typing import Any

from monailabel.datastore.dicom import DICOMWebDatastore

MONAILABEL_SEARCH_FILTER = {"Modality": "CT"}  # monailabel.config's default


class PacsDatastore(DICOMWebDatastore):
    """DICOMWebDatastore whose labelled / unlabelled listings follow the labels saved through it."""

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


def search_filter(modalities: tuple[str, ...]) -> dict[str, str]:
    """QIDO-RS filter for series of any of these modalities (a comma list, as DICOMweb and Orthanc take it)."""
    return {"Modality": ",".join(modalities)}
