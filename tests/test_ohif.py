"""The bundled OHIF viewer in a real browser (headless Chromium) against the server on a real PACS.

Marked `pacs` (Orthanc listens on every interface: the group runs in a private network namespace, see
tests/test_pacs.py). The server listens on 127.0.0.1:8000, the address OHIF's MONAI Label panel starts with.
Every step keeps a screenshot in test-artifacts/ohif/. Chromium comes from Debian (`chromium`), driven by
Playwright for Python with executable_path=/usr/bin/chromium (no `playwright install`, nothing downloaded).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom_seg
import pytest
from monailabel.client import MONAILabelClient

from conftest import REPO, load_truth, pacs_server, require_private_network
from lib.evaluation.ground_truth import centre_click
from lib.evaluation.pacs import OrthancProcess, load_sample_studies

pytestmark = [pytest.mark.pacs, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "test-artifacts" / "ohif"

# cornerstone3D, which OHIF exposes on window: the axial viewport, its current slice's world z and the canvas
# position of a world point (patient LPS, millimetres)
AXIAL = """() => {
  const engine = cornerstone.getRenderingEngines()[0];
  const viewport = engine.getViewports().find(v => Math.abs(v.getCamera().viewPlaneNormal[2]) > 0.9);
  return {id: viewport.id, z: viewport.getCamera().focalPoint[2]};
}"""
TO_PAGE = """([id, world]) => {
  const viewport = cornerstone.getRenderingEngines()[0].getViewport(id);
  const [x, y] = viewport.worldToCanvas(world);
  const rect = viewport.canvas.getBoundingClientRect();
  const scale = [rect.width / viewport.canvas.clientWidth, rect.height / viewport.canvas.clientHeight];
  return [rect.left + x * scale[0], rect.top + y * scale[1]];
}"""
PROBES = "() => cornerstoneTools.annotation.state.getAnnotationManager().getNumberOfAllAnnotations()"
LABELMAP_VOXELS = """() => {
  const segmentations = services.segmentationService.getSegmentations();
  let voxels = 0;
  for (const s of segmentations) {
    const labelmap = s.representationData && s.representationData.Labelmap;
    const volume = labelmap && labelmap.volumeId && cornerstone.cache.getVolume(labelmap.volumeId);
    if (!volume) continue;
    const data = volume.voxelManager ? volume.voxelManager.getCompleteScalarDataArray() : volume.getScalarData();
    for (let i = 0; i < data.length; i++) { if (data[i]) voxels++; }
  }
  return {count: segmentations.length, voxels};
}"""
# the viewer has shown the series: every viewport has its image data and the volume behind it has streamed in
SERIES_SHOWN = """() => {
  const engine = window.cornerstone && cornerstone.getRenderingEngines()[0];
  const viewports = engine ? engine.getViewports() : [];
  return viewports.length > 0 && viewports.every(v => {
    if (!v.getImageData()) return false;
    const volumes = (v.getAllVolumeIds ? v.getAllVolumeIds() : []).map(id => cornerstone.cache.getVolume(id));
    return volumes.every(volume => !volume || !volume.loadStatus || volume.loadStatus.loaded);
  });
}"""
SEGMENTATIONS = "() => services.segmentationService.getSegmentations().length"
# what the viewer reported as errors, for a failure's message (CI keeps the output, not test-artifacts/)
VIEWER_ERRORS: list[str] = []


@pytest.fixture(scope="module")
def ohif_setup(sample_data, tmp_path_factory):
    require_private_network()
    work = tmp_path_factory.mktemp("ohif")
    with OrthancProcess(work / "orthanc") as orthanc:
        series = {s.subject: s for s in load_sample_studies(orthanc, sample_data, work / "dicom", ["sub-01", "sub-02"])}
        with pacs_server(orthanc, sample_data, work, port=8000) as server:  # OHIF's panel expects port 8000
            yield server, series, work, orthanc


@pytest.fixture(scope="module")
def page(ohif_setup):
    from playwright.sync_api import sync_playwright

    _, _, work, _ = ohif_setup
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(work / "chromium-profile"),
            executable_path=CHROMIUM,
            args=FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        page = browser.new_page()
        with open(ARTIFACTS / "console.log", "w") as console:  # the viewer's own log, kept with the screenshots
            page.on("console", lambda message: log_console(console, message.type, message.text))
            page.on("pageerror", lambda error: log_console(console, "page error", str(error)))
            yield page
        browser.close()


def log_console(console, kind: str, text: str) -> None:
    console.write(f"{kind}: {text}\n")
    if "error" in kind and "ERR_INTERNET_DISCONNECTED" not in text:  # the private network has no internet
        VIEWER_ERRORS.append(f"{kind}: {text}")


def viewer_errors() -> str:
    return "; the viewer's last errors: " + " | ".join(VIEWER_ERRORS[-8:])


def wait_for(page, script: str, what: str, timeout_s: float):
    deadline = time.time() + timeout_s
    while not (value := page.evaluate(script)) and time.time() < deadline:
        time.sleep(0.5)
    assert value, f"{what} not within {timeout_s:.0f} s{viewer_errors()}"
    return value


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def test_annotating_in_ohif_with_the_foundation_model(ohif_setup, page, sample_data, labels):
    server, series, _, _ = ohif_setup
    page.goto(f"{server.url}/ohif/", wait_until="networkidle")
    page.get_by_text("sub-01", exact=True).first.wait_for(timeout=60_000)
    assert page.get_by_text("sub-02", exact=True).count() >= 1
    shot(page, "01-study-list")

    page.goto(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={series['sub-01'].study_uid}", wait_until="networkidle")
    page.get_by_text("Confirm and Hide").click(timeout=60_000)
    # an annotator connects once the image is on screen; the panel makes its segmentation on connecting
    wait_for(page, SERIES_SHOWN, "the series shown in every viewport", 120)
    page.locator(".monaiLabelPanel button.actionButton").first.click()  # connect to the server
    wait_for(page, SEGMENTATIONS, "the panel's segmentation, made on connecting,", 60)
    page.get_by_text("Point Prompts", exact=True).click(timeout=60_000)
    prompts = page.locator(".modelSelector").filter(has=page.locator("option[value='foundation_2d']")).first
    select = prompts.locator("select.selectBox")
    options = select.locator("option").all_inner_texts()
    assert {"foundation", "foundation_2d"} <= {o.strip() for o in options}, options
    select.select_option("foundation_2d")
    page.get_by_text("left_thalamus", exact=True).first.click()
    shot(page, "02-monai-label-mode")

    # a foreground click at the middle of the left thalamus on the slice the axial viewport shows
    axial = page.evaluate(AXIAL)
    affine = np.asarray(__import__("nibabel").load(sample_data / "studies" / "sub-01.nii.gz").affine)
    z = int(round((axial["z"] - affine[2, 3]) / affine[2, 2]))
    truth = load_truth(sample_data, "sub-01")[:, :, z] == labels["left_thalamus"]
    assert truth.any(), f"the axial viewport shows slice {z}, without the thalamus"
    x, y = centre_click(truth)
    ras = affine @ np.array([x, y, z, 1.0])
    lps = [-float(ras[0]), -float(ras[1]), float(ras[2])]
    page_x, page_y = page.evaluate(TO_PAGE, [axial["id"], lps])
    page.mouse.move(page_x, page_y)
    page.mouse.down()
    page.mouse.up()
    time.sleep(1)
    shot(page, "03-foreground-click")
    placed = page.evaluate(PROBES)
    assert placed == 1, f"{placed} click points after a click at {page_x:.0f}, {page_y:.0f} (slice {z}, voxel {x}, {y})"

    with page.expect_response(lambda r: "/infer/foundation_2d" in r.url, timeout=120_000) as answer:
        prompts.locator("button", has_text="Run").click()
    assert answer.value.status == 200, answer.value.text()
    sent = answer.value.request.post_data or ""
    params = json.loads(sent[sent.index("{") : sent.rindex("}") + 1])
    # the click reaches the server as the voxel it was aimed at (a screen pixel is about a voxel here)
    assert len(params["foreground"]) == 1 and np.abs(np.subtract(params["foreground"][0], [x, y, z])).max() <= 1, params
    wait_for(page, f"() => ({LABELMAP_VOXELS})().voxels", "the inferred mask drawn in OHIF's labelmap", 60)
    drawn = page.evaluate(LABELMAP_VOXELS)
    time.sleep(1)
    shot(page, "04-segmentation")
    assert drawn["voxels"] > 50, f"{drawn}{viewer_errors()}"

    # Active Learning: the next sample is offered in a dialog
    page.get_by_text("Active Learning", exact=True).click()
    page.get_by_role("button", name="Next Sample").click()
    dialog = page.get_by_text("Active Learning - Next Sample")
    dialog.wait_for(timeout=60_000)
    shot(page, "05-next-sample")
    body = page.inner_text("body")
    assert series["sub-01"].series_uid in body or series["sub-02"].series_uid in body
    page.keyboard.press("Escape")

    # save the label: the segmentation panel's Export DICOM SEG stores it in the PACS through the server's proxy
    page.locator("[data-cy='panelSegmentation-btn']").click()
    page.locator("div:has(> button[role='combobox'])").first.locator("> button[aria-haspopup='menu']").first.click()
    page.get_by_text("Export & Download").hover()
    page.get_by_text("Export DICOM SEG").click()
    page.get_by_text("Enter the report name").wait_for(timeout=30_000)
    shot(page, "06-export-dicom-seg")
    page.get_by_role("textbox").last.fill("left thalamus, foundation_2d")
    stow = lambda r: r.request.method == "POST" and "/proxy/dicom/" in r.url  # noqa: E731
    with page.expect_response(stow, timeout=120_000) as stored:
        page.get_by_role("button", name="Save").click()
    assert stored.value.status == 200, stored.value.text()
    page.get_by_text("Segmentation saved successfully").wait_for(timeout=30_000)
    shot(page, "07-label-saved")
    time.sleep(2)
    shot(page, "08-after-saving")
    assert page.get_by_text("Something went wrong").count() == 0
    assert page.evaluate(LABELMAP_VOXELS)["voxels"] == drawn["voxels"]  # the annotator keeps what they saved

    # the PACS holds a SEG on the series with the drawn voxels as left_thalamus, and the server counts it
    orthanc = ohif_setup[3]
    (seg,) = orthanc.instances("SEG")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["sub-01"].series_uid
    segments = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    stored_mask = pydicom_seg.MultiClassReader().read(seg).data
    by_name = {segments[n]: int((stored_mask == n).sum()) for n in segments}
    assert by_name.pop("left_thalamus") == drawn["voxels"] and not any(by_name.values()), by_name
    client = MONAILabelClient(server.url, str(ARTIFACTS))  # no client_id: the identity OHIF's panel has
    assert client.info()["datastore"]["completed"] == 1
    # whichever image the panel's Next Sample leased to this identity, the labelled one is done
    assert client.next_sample("first", {})["id"] == series["sub-02"].series_uid
    (ARTIFACTS / "result.json").write_text(json.dumps({"infer_params": params, "labelmap": drawn}, indent=2))
