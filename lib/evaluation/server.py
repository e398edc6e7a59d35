"""Start and stop a real `monailabel start_server` for tests and benchmarks (loopback only, stopped by PID)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from lib.atomic import scratch_dir

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a child by its PID, and kill it if it has not exited within `timeout` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


class ServerProcess:
    """`monailabel start_server --app apps/medfoundation` (or another app) as a child process.

    Args:
        studies: the studies folder (or DICOMweb URL).
        log: file receiving the server's output.
        conf: extra `--conf key value` pairs.
        app: the app folder (default: this repository's medfoundation app).
        env: extra environment variables (MONAI Label's own settings, e.g. MONAI_LABEL_AUTO_UPDATE_SCORING).

    Each start gives the server a temp folder of its own (TMPDIR), removed when it is stopped: MONAI Label leaves
    files in the temp folder (a logging config per start, the upload of a refused request), and a test run
    starts dozens of servers.
    """

    def __init__(
        self,
        studies: Path | str,
        log: Path,
        conf: dict[str, str] | None = None,
        port: int | None = None,
        app: Path | str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.app = str(app or REPO / "apps" / "medfoundation")
        self.studies = str(studies)
        self.log = Path(log)
        self.conf = conf or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.tmp: Path | None = None

    def start(self, timeout: float = 180) -> ServerProcess:
        command = [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", self.app, "--studies", self.studies,
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        for key, value in self.conf.items():
            command += ["--conf", key, str(value)]
        self.tmp = scratch_dir("medfoundation-server-")
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "TMPDIR": str(self.tmp),
            **self.env,
        }
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as error:
                if error.code == 401:  # auth is on: the server answers, it just wants a token
                    return
                time.sleep(0.5)
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[psutil.Process]:
        """The server's child processes (a training or scoring round runs in one)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            children = self.children()  # by PID, before the parent goes: a round in progress must not outlive it
            stop_process(self.process)
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
