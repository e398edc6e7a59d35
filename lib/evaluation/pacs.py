"""A real PACS for tests and for `make run-pacs`: Orthanc with DICOMweb, fed with the sample studies as DICOM.

    python -m lib.evaluation.pacs --data sample-data/build --port 8042 --dicom-dir sample-data/build/dicom

writes each sample study as an MR DICOM series (one file per slice, geometry taken from the NIfTI affine),
starts Orthanc (Debian packages `orthanc` and `orthanc-dicomweb`) on 127.0.0.1:<port> with its DICOMweb
plugin at /dicom-web/, uploads the series and waits until it is stopped.

Orthanc 1.10 binds its HTTP port on every interface and has no option to bind one address: it runs with
`RemoteAccessAllowed` false (any other host gets a 403) and the test group runs it inside a private network
namespace that has only loopback (`make test` does `unshare --net`), so nothing listens beyond loopback there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from lib.evaluation.server import free_port, stop_process

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def uid(*parts: str) -> str:
    """A DICOM UID derived from `parts`: the same study gets the same UIDs on every run (2.25 = UUID form)."""
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


@dataclass(frozen=True)
class Series:
    subject: str
    study_uid: str
    series_uid: str
    files: list[Path]


def write_series(image: Path, out_dir: Path, subject: str, modality: str = "MR") -> Series:
    """One DICOM file per slice of a NIfTI volume, with the volume's geometry.

    Voxel (i, j, k) of the NIfTI is pixel (row j, column i) of slice k: rows run along the affine's j axis
    and columns along its i axis, both turned from RAS into DICOM's LPS.
    """
    volume = nib.load(image)
    data = np.asarray(volume.dataobj)
    if not np.allclose(data, np.round(data)) or data.min() < -32768 or data.max() > 32767:
        raise ValueError(f"{image}: only integer intensities within int16 are written as DICOM here")
    affine = volume.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_direction = RAS_TO_LPS @ affine[:3, 0] / spacing[0]  # along a row: increasing i (column index)
    column_direction = RAS_TO_LPS @ affine[:3, 1] / spacing[1]  # down a column: increasing j (row index)
    study, series = uid(subject, "study"), uid(subject, "series")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid(subject, "slice", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = subject, subject
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = uid(subject, "frame")
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.StudyDate, ds.StudyTime, ds.Modality = "20261129", "120000", modality
        ds.StudyDescription, ds.SeriesDescription = "medfoundation sample", f"{subject} T1"
        ds.ImagePositionPatient = [float(v) for v in RAS_TO_LPS @ (affine @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_direction, *column_direction)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
        pixels = data[:, :, k].T.astype(np.int16)  # (rows = j, columns = i)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return Series(subject, study, series, files)


def series_affine(files: list[Path]) -> np.ndarray:
    """The RAS voxel-to-world affine of a series written as above (for checks): (4, 4)."""
    slices = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files), key=lambda d: d.InstanceNumber)
    first, second = slices[0], slices[1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing
    lps[:3, 1] = orientation[3:] * row_spacing
    lps[:3, 2] = np.subtract(second.ImagePositionPatient, first.ImagePositionPatient)
    lps[:3, 3] = first.ImagePositionPatient
    to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return to_ras @ lps


class OrthancProcess:
    """Orthanc with DICOMweb on 127.0.0.1:<port>, storage in a fresh folder, stopped by its PID."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir, self.port = Path(workdir), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> OrthancProcess:
        if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
            raise RuntimeError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medfoundation-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # Orthanc binds every interface; only loopback may talk to it
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,  # no DIMSE port: DICOMweb over HTTP only
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Host": f"127.0.0.1:{self.port}"},
        }
        config_file = self.workdir / "orthanc.json"
        config_file.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "w")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen([ORTHANC, str(config_file)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Orthanc not ready after {timeout} s")

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (POST /instances), one request a file."""
        for path in files:
            request = urllib.request.Request(
                f"{self.url}/instances", data=path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                status = json.loads(response.read()).get("Status")
                if status not in ("Success", "AlreadyStored"):
                    raise RuntimeError(f"Orthanc refused {path}: {status}")

    def get_json(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def instances(self, modality: str) -> list[pydicom.Dataset]:
        """Every stored instance of the series of this modality (e.g. "SEG"), read whole."""
        found = []
        for series_id in self.get_json("/series"):
            if self.get_json(f"/series/{series_id}")["MainDicomTags"].get("Modality") != modality:
                continue
            for instance in self.get_json(f"/series/{series_id}/instances"):
                with urllib.request.urlopen(f"{self.url}/instances/{instance['ID']}/file", timeout=30) as response:
                    found.append(pydicom.dcmread(io.BytesIO(response.read())))
        return found

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_sample_studies(orthanc: OrthancProcess, data: Path, dicom_dir: Path, subjects: list[str]) -> list[Series]:
    """Write the subjects' studies as DICOM (unless already there) and upload them."""
    written = []
    for subject in subjects:
        series = write_series(data / "studies" / f"{subject}.nii.gz", dicom_dir / subject, subject)
        orthanc.upload(series.files)
        written.append(series)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--port", type=int, default=8042)
    parser.add_argument("--subjects", default="sub-01,sub-02,sub-03")
    parser.add_argument("--dicom-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="Orthanc storage (default: a fresh temp folder)")
    parser.add_argument("--ready-file", type=Path, default=None, help="created once the studies are in the PACS")
    args = parser.parse_args()
    if args.ready_file:
        args.ready_file.unlink(missing_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="orthanc-"))
    with OrthancProcess(workdir, args.port) as orthanc:
        series = load_sample_studies(orthanc, args.data, args.dicom_dir or workdir / "dicom", args.subjects.split(","))
        print(f"Orthanc on {orthanc.url} (DICOMweb {orthanc.dicomweb}), storage {workdir}", flush=True)
        for s in series:
            print(f"  {s.subject}: study {s.study_uid}, series {s.series_uid}, {len(s.files)} slices", flush=True)
        if args.ready_file:
            args.ready_file.write_text(orthanc.dicomweb + "\n")
        try:
            orthanc.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
