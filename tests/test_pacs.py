"""The server on a real PACS: Orthanc with DICOMweb, the sample studies as DICOM series, labels as DICOM SEG.

Marked `pacs`: Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`) listens on every interface, so these
tests run only inside a private network namespace that has nothing but loopback. `make test` runs them in
one (`unshare --net`); a plain `pytest` leaves them out (pyproject's addopts).
"""

from __future__ import annotations

import tempfile
import time

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient

from conftest import load_truth, pacs_server, require_private_network
from lib.datastore.dicomweb import PacsDatastore, refresh_listings
from lib.evaluation.ground_truth import box_on_slice, dice, middle_slice, roi_3d
from lib.evaluation.pacs import OrthancProcess, load_sample_studies, series_affine, write_series
from lib.trainers.foundation import labelled_images

pytestmark = [pytest.mark.pacs, pytest.mark.slow]
SUBJECTS = ("sub-01", "sub-02", "sub-03")


@pytest.fixture(scope="module")
def pacs(sample_data, tmp_path_factory):
    require_private_network()
    work = tmp_path_factory.mktemp("pacs")
    with OrthancProcess(work) as orthanc:
        series = load_sample_studies(orthanc, sample_data, work / "dicom", list(SUBJECTS))
        yield orthanc, {s.subject: s for s in series}


@pytest.fixture(scope="module")
def dicomweb_server(pacs, sample_data, tmp_path_factory):
    """`monailabel start_server --studies http://127.0.0.1:<port>/dicom-web`, nothing but the app's defaults."""
    orthanc, _ = pacs
    work = tmp_path_factory.mktemp("pacs-server")
    # a short training round: the test checks that labels in the PACS train, not how well
    with pacs_server(orthanc, sample_data, work, train_steps="4", train_slice_step="16") as server:
        yield server


@pytest.fixture(scope="module")
def client(dicomweb_server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(dicomweb_server.url, tmpdir=str(tmp_path_factory.mktemp("pacs-client")))


def test_a_volume_written_as_dicom_keeps_its_geometry_and_pixels(sample_data, tmp_path):
    image = sample_data / "studies" / "sub-01.nii.gz"
    series = write_series(image, tmp_path, "sub-01")
    volume = nib.load(image)
    assert len(series.files) == volume.shape[2]
    assert np.allclose(series_affine(series.files), volume.affine, atol=1e-4)
    middle = pydicom.dcmread(series.files[80])
    assert np.array_equal(middle.pixel_array, np.asarray(volume.dataobj)[:, :, 80].T)
    again = write_series(image, tmp_path / "again", "sub-01")
    assert again.series_uid == series.series_uid, "UIDs are stable across runs"


def test_the_datastore_lists_the_mr_series_of_the_pacs(client, pacs):
    """MONAI Label's own default search filter lists CT only: these MR studies would be invisible."""
    _, series = pacs
    assert client.info()["datastore"]["total"] == len(SUBJECTS)
    sample = client.next_sample("first", {})
    assert sample["id"] in {s.series_uid for s in series.values()}
    assert sample["Modality"] == "MR"


def test_the_dicomweb_proxy_forwards_query_strings(client, pacs):
    """OHIF searches the PACS through the server's proxy; MONAI Label 0.8.5 dropped the query string."""
    _, series = pacs
    base = f"{client.get_server_url()}/proxy/dicom/qido/studies"
    studies = requests.get(base, params={"PatientID": "sub-02", "includefield": "00081030"}, timeout=30).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [series["sub-02"].study_uid]
    assert len(requests.get(base, timeout=30).json()) == len(SUBJECTS)


def test_foundation_segments_a_dicom_series(client, pacs, sample_data, labels):
    _, series = pacs
    truth = load_truth(sample_data, "sub-01") == labels["left_thalamus"]
    z = middle_slice(truth)
    path, info = client.infer("foundation_2d", series["sub-01"].series_uid, {"roi": box_on_slice(truth, z)})
    label = nib.load(path)
    # MONAI Label converts the series back to NIfTI: same grid as the volume the series was written from
    assert np.allclose(label.affine, nib.load(sample_data / "studies" / "sub-01.nii.gz").affine, atol=1e-3)
    mask = np.asarray(label.dataobj) > 0
    assert dice(mask[:, :, z], truth[:, :, z]) > 0.8
    path, info = client.infer("foundation", series["sub-01"].series_uid, {"roi": roi_3d(truth)})
    assert info["slices_segmented"] > 10 and dice(np.asarray(nib.load(path).dataobj) > 0, truth) > 0.5


def test_a_final_label_is_stored_in_the_pacs_as_a_dicom_seg_on_the_series_grid(
    client, pacs, sample_data, labels, tmp_path
):
    orthanc, series = pacs
    image_id = series["sub-02"].series_uid
    truth_file = sample_data / "ground-truth" / "sub-02.nii.gz"
    label_info = [{"name": name, "idx": index} for name, index in labels.items()]
    client.save_label(image_id, str(truth_file), "final", {"label_info": label_info})

    segs = orthanc.instances("SEG")
    assert len(segs) == 1
    seg = segs[0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image_id
    assert seg.StudyInstanceUID == series["sub-02"].study_uid
    names = {s.SegmentLabel for s in seg.SegmentSequence}
    assert names == set(labels), names

    # decoded and resampled onto the image series, the SEG is the label that was saved
    decoded = pydicom_seg.MultiClassReader().read(seg).image
    reference = sitk.ReadImage(str(sample_data / "studies" / "sub-02.nii.gz"))
    on_grid = sitk.Resample(decoded, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, decoded.GetPixelID())
    stored = sitk.GetArrayFromImage(on_grid)  # (z, y, x)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file)))
    by_segment = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    scores = [dice(stored == number, truth == labels[name]) for number, name in by_segment.items()]
    assert min(scores) > 0.99, dict(zip(by_segment.values(), scores, strict=True))

    # the labelled series is not handed out again (MONAI Label cached its listing for 2 hours)
    url = client.get_server_url()
    annotators = [MONAILabelClient(url, str(tmp_path), client_id=f"annotator-{i}") for i in range(3)]
    handed = {annotator.next_sample("first", {}).get("id") for annotator in annotators}
    assert image_id not in handed and handed & {series["sub-01"].series_uid, series["sub-03"].series_uid}
    assert client.info()["datastore"]["completed"] == 1


def viewer_seg(series, sample_data, segments: dict[str, int], series_time: str) -> pydicom.Dataset:
    """A DICOM SEG as a viewer writes it: its own segment numbers (1, 2, ...) and names ({name: truth value}),
    frames only where a segment is (pydicom-seg, as dcmjs does)."""
    truth = sitk.ReadImage(str(sample_data / "ground-truth" / f"{series.subject}.nii.gz"))
    values = sitk.GetArrayFromImage(truth)
    numbered = np.zeros_like(values, dtype=np.uint8)
    for number, value in enumerate(segments.values(), start=1):
        numbered[values == value] = number
    image = sitk.GetImageFromArray(numbered)
    image.CopyInformation(truth)
    code = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
    attributes = [
        {"labelID": n, "SegmentLabel": name, "SegmentAlgorithmType": "MANUAL",
         "SegmentedPropertyCategoryCodeSequence": code, "SegmentedPropertyTypeCodeSequence": code}
        for n, name in enumerate(segments, start=1)
    ]  # fmt: skip
    template = pydicom_seg.template.from_dcmqi_metainfo(
        {"SeriesDescription": "viewer label", "SeriesNumber": "99", "InstanceNumber": "1",
         "ContentCreatorName": "Viewer^Test", "segmentAttributes": [attributes]}
    )  # fmt: skip
    writer = pydicom_seg.MultiClassWriter(template, inplane_cropping=False, skip_empty_slices=True)
    seg = writer.write(image, [str(f) for f in series.files])
    seg.SeriesDate, seg.SeriesTime = "20261129", series_time
    return seg


def test_segs_stored_by_a_viewer_through_the_proxy_are_final_labels_that_train_a_round(
    client, pacs, sample_data, labels, tmp_path, caplog, monkeypatch
):
    """OHIF's Export DICOM SEG: a SEG stored by STOW-RS through the server's proxy, with the viewer's own segment
    numbers, names that differ in case and spacing, and one name the app does not know."""
    orthanc, series = pacs
    url = client.get_server_url()
    viewer = DICOMwebClient(url=f"{url}/proxy/dicom/wado")
    first = {"Left Thalamus": labels["left_thalamus"], "left_putamen": labels["left_putamen"],
             "tumour": labels["right_caudate"]}  # fmt: skip
    viewer.store_instances([viewer_seg(series["sub-03"], sample_data, first, "120000")])
    only_thalamus = {"left_thalamus": labels["left_thalamus"]}
    viewer.store_instances([viewer_seg(series["sub-01"], sample_data, only_thalamus, "120000")])
    # the listings follow at once (MONAI Label cached them for 2 hours): both images are labelled now
    labelled = {series["sub-01"].series_uid, series["sub-03"].series_uid}
    annotator = MONAILabelClient(url, str(tmp_path), client_id="after-the-viewer")
    assert annotator.next_sample("first", {}).get("id") not in labelled
    assert annotator.info()["datastore"]["completed"] >= 2

    # the datastore the trainer reads: each SEG is a NIfTI label on the image grid, valued by segment name.
    # In this process, MONAI Label's dicom_to_nifti would leave each series' NIfTI in /tmp after copying it into
    # the cache (the servers get temp folders of their own): here it goes to pytest's folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    datastore = PacsDatastore(DICOMwebClient(url=orthanc.dicomweb), {"Modality": "MR"}, str(tmp_path / "cache"))
    datastore.labels = labels
    refresh_listings()
    found = {i.image_id: i for i in labelled_images(datastore)}
    assert labelled <= found.keys()
    sub03 = found[series["sub-03"].series_uid]
    label, truth = nib.load(sub03.label_path), load_truth(sample_data, "sub-03")
    assert np.allclose(label.affine, nib.load(sample_data / "studies" / "sub-03.nii.gz").affine, atol=1e-3)
    stored = np.asarray(label.dataobj)
    for name in ("left_thalamus", "left_putamen"):
        assert dice(stored == labels[name], truth == labels[name]) > 0.99, name
    assert set(np.unique(stored)) == {0, labels["left_thalamus"], labels["left_putamen"]}  # "tumour" left out
    assert sub03.label_ts > 0

    # a later SEG on the same series replaces the earlier one as its final label
    viewer.store_instances([viewer_seg(series["sub-03"], sample_data, only_thalamus, "130000")])
    refresh_listings()
    newer = {i.image_id: i for i in labelled_images(datastore)}[series["sub-03"].series_uid]
    assert newer.label_ts > sub03.label_ts
    assert set(np.unique(np.asarray(nib.load(newer.label_path).dataobj))) == {0, labels["left_thalamus"]}

    # and the server trains on them: a round runs on every labelled series of the PACS
    client.train_start("foundation", {})
    deadline, stats = time.time() + 600, {}
    while time.time() < deadline:
        stats = client.info()["train_stats"]["foundation"]
        if stats["total"] > 1:
            break
        time.sleep(3)
    assert stats["total"] > 1, stats
    used = stats["versions"][1]["labels_used"]
    assert labelled <= used.keys(), used

    # a SEG that cannot be read as a label map (overlapping segments) leaves its series out, and only it
    broken = viewer_seg(series["sub-01"], sample_data, only_thalamus, "140000")
    broken.SegmentsOverlap = "YES"
    viewer.store_instances([broken])
    refresh_listings()
    with caplog.at_level("WARNING"):
        readable = {i.image_id for i in labelled_images(datastore)}
    assert series["sub-03"].series_uid in readable and series["sub-01"].series_uid not in readable
    assert "overlapping" in caplog.text and str(broken.SeriesInstanceUID) in caplog.text
