"""The OHIF viewer bundled with MONAI Label (`/ohif/`), with two defects of monailabel 0.8.5 worked around.

1. No way to save a label from OHIF. The MONAI Label mode leaves OHIF's segmentation panel out of its right
   panels, and the MONAI Label panel has no save button. The mode's script is served with that panel added,
   and its "Export DICOM SEG" mended (PATCHES): it stores the segmentation in the PACS (STOW-RS through the
   server's DICOMweb proxy), where the DICOMweb datastore reads it as the series' final label
   (lib.datastore.dicomweb).
2. `/ohif/<folder>/<file>` could never be served (the path was joined with `os.pathsep`, ":"), and every
   missing file was answered with index.html and a 200, so a missing script failed in the browser as HTML.
   Files in folders are served; a missing path that names a file type is a 404; any other path is one of the
   viewer's own routes (`/ohif/monai-label?...`) and gets index.html.
"""

from __future__ import annotations

import functools
import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import FileResponse, Response
from monailabel.endpoints import ohif

logger = logging.getLogger(__name__)

OHIF_DIR = Path(ohif.__file__).resolve().parent / "static" / "ohif"


@dataclass(frozen=True)
class ScriptPatch:
    """Exact replacements (old, new) in one of the viewer's built scripts; `why` goes to the log."""

    why: str
    replacements: tuple[tuple[bytes, bytes], ...]


# the panel without tools: the mode registers no segmentation tool buttons, and the panel with tools (the one
# the mode defines, `cornerstone.panelTool`) crashes the viewer without them
SEGMENTATION_PANEL = b"'@ohif/extension-cornerstone.panelModule.panelSegmentation'"
PATCHES = (
    ScriptPatch(
        "the MONAI Label mode shows the segmentation panel",
        (
            (
                b"rightPanels: [monailabel.monaiLabel],",
                b"rightPanels: [monailabel.monaiLabel, " + SEGMENTATION_PANEL + b"],",
            ),
        ),
    ),
    # Without a context the command manager runs the last registered `storeSegmentation`, the DICOM SEG
    # extension's, which needs the data source that only the cornerstone extension's command passes it: the
    # panel's "Export DICOM SEG" crashed the viewer ("Cannot read properties of undefined (reading 'store')").
    # Then, once stored, it swapped the viewport's image for the SEG alone, which the MPR volume viewport
    # cannot show ("reading 'volumeId'", "Something went wrong"): the annotator keeps the segmentation shown.
    ScriptPatch(
        "Export DICOM SEG runs the command that passes the data source, and keeps the viewport",
        (
            (
                b"commandsManager.run('storeSegmentation', {\n        segmentationId\n      });",
                b"commandsManager.runCommand('storeSegmentation', {\n        segmentationId\n      }, 'CORNERSTONE');",
            ),
            (
                b"if (displaySetInstanceUIDs) {\n        segmentationService.remove(segmentationId);\n"
                b"        viewportGridService.setDisplaySetsForViewport({\n"
                b"          viewportId: viewportGridService.getActiveViewportId(),\n"
                b"          displaySetInstanceUIDs\n        });\n      }",
                b"if (displaySetInstanceUIDs) {\n"
                b"        /* medfoundation: the viewport keeps the saved segmentation */\n      }",
            ),
        ),
    ),
    # A SEG with an empty segment (every label the annotator did not draw) has no centre for it, and reading
    # that centre crashed the viewer when it opened the SEG ("reading 'image'").
    ScriptPatch(
        "a SEG with empty segments opens",
        (
            (b"segDisplaySet.centroids.get(index).image ||", b"segDisplaySet.centroids.get(index)?.image ||"),
            (b"segDisplaySet.centroids.get(index).world ||", b"segDisplaySet.centroids.get(index)?.world ||"),
        ),
    ),
)


@functools.cache
def patched_scripts(ohif_dir: Path = OHIF_DIR) -> dict[str, bytes]:
    """{file name: patched content} of the viewer scripts that PATCHES change."""
    patched: dict[str, bytes] = {}
    applied = set()
    for script in sorted(ohif_dir.glob("*.js")):
        content = original = script.read_bytes()
        for patch in PATCHES:
            if all(old in content for old, _ in patch.replacements):
                for old, new in patch.replacements:
                    content = content.replace(old, new)
                applied.add(patch.why)
                logger.info("OHIF: %s (%s)", patch.why, script.name)
        if content != original:
            patched[script.name] = content
    for patch in PATCHES:
        if patch.why not in applied:
            logger.warning("OHIF: not patched, its script was not found in %s: %s", ohif_dir, patch.why)
    return patched


def viewer_file(path: str, ohif_dir: Path = OHIF_DIR) -> Response:
    """Drop-in for `monailabel.endpoints.ohif.get_ohif`: the answer to `GET /ohif/<path>`."""
    patched = patched_scripts(ohif_dir)
    if path in patched:
        return Response(patched[path], media_type="application/javascript", headers={"Cache-Control": "no-cache"})
    root = ohif_dir.resolve()
    wanted = (root / path).resolve()
    if path and wanted.is_relative_to(root) and wanted.is_file():
        return FileResponse(wanted)
    if path and mimetypes.guess_type(path)[0] is not None:
        raise HTTPException(status_code=404, detail=f"the OHIF viewer has no file {path!r}")
    return FileResponse(root / "index.html", media_type="text/html")


def install() -> None:
    """Serve `/ohif/` through `viewer_file` (MONAI Label's route looks `get_ohif` up at call time)."""
    patched_scripts()  # read and patch once, at start, not on a viewer's first visit
    ohif.get_ohif = viewer_file
