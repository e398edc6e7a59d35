"""The bundled OHIF viewer's files as the server answers them (lib.viewer), without a browser.

tests/test_ohif.py drives the same viewer in Chromium; these check the answers themselves: each fix is applied
to the viewer monailabel ships, and files, routes and missing files get what a browser needs.
"""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from lib.viewer import OHIF_DIR, PATCHES, patched_scripts, viewer_file


def test_every_fix_applies_to_the_bundled_viewer_once():
    patched = patched_scripts()
    for patch in PATCHES:
        for old, new in patch.replacements:
            holding = [name for name, content in patched.items() if new in content]
            assert len(holding) == 1, (patch.why, holding)
            assert old not in patched[holding[0]], patch.why
            assert old in (OHIF_DIR / holding[0]).read_bytes(), "the shipped file itself must stay untouched"


def test_a_patched_script_is_served_patched():
    name, content = next(iter(patched_scripts().items()))
    answer = viewer_file(name)
    assert answer.body == content and answer.media_type == "application/javascript"


def test_files_in_folders_are_served_and_routes_get_the_viewer():
    image = next((OHIF_DIR / "assets" / "images").iterdir())
    assert viewer_file(f"assets/images/{image.name}").path == image
    index = OHIF_DIR / "index.html"
    for route in ("", "monai-label", "viewer/1.2.840.10008"):
        assert viewer_file(route).path == index, route


@pytest.mark.parametrize("path", ["missing.bundle.js", "assets/missing.png", "../../../app.py", "../index.js"])
def test_a_missing_file_or_one_outside_the_viewer_is_a_404(path):
    with pytest.raises(HTTPException) as error:
        viewer_file(path)
    assert error.value.status_code == 404 and path in error.value.detail
