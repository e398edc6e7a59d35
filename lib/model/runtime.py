"""Fast paths for the image encoder: the same weights run by the runtime that is fastest on this device.

On a CPU the encoder is exported once per set of encoder weights to OpenVINO IR. In float32 it answers as
torch float32 does (max difference 5e-6) 2.2x faster on this project's 2-core machine; in bfloat16 (CPUs with
native bf16 instructions, AVX512_BF16 or AMX) 3.6x faster, but its masks differ (README, "Speed"). On a GPU
torch runs the encoder, under fp16 autocast if asked. Every runtime takes what
`FoundationModel.normalize` gives and returns float32 embeddings, so the embedding cache, the training store
and the decoder never know which one ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")


class EncoderRuntime(Protocol):
    name: str

    def __call__(self, normalized: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 256, 64, 64) float32 embeddings on the input's device."""
        ...


class TorchEncoder:
    """The encoder module itself, under autocast to `dtype` when one is given (bf16 on CPU, bf16/fp16 on GPU).

    One call at a time in a process (as OpenVinoEncoder): parallel encodes only split the same cores.
    """

    _lock = threading.Lock()  # shared: the server makes a stand-in TorchEncoder while an export is being built

    def __init__(self, encoder: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.name = f"torch-{str(dtype).removeprefix('torch.') if dtype else 'float32'}"

    @torch.no_grad()
    def __call__(self, normalized: torch.Tensor) -> torch.Tensor:
        with (
            self._lock,
            torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None),
        ):
            return self.encoder(normalized.to(self.device)).float()


def low_precision_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for a low-precision encoder: bf16 on a CPU, fp16 on a GPU; None when off.

    On a GPU fp16 keeps the answers where bf16 does not (masks against float32's on an H200: mean Dice 0.998, min
    0.988 in fp16; 0.975, min 0.846 in bf16, whose 8-bit mantissa is what differs) and is the faster in batches
    (2.5 against 2.8 ms a slice). CPUs have no fast fp16 matrix units, so bf16 there; without native bf16 (AVX2
    only, say) None: emulated bf16 is many times slower than float32.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if not cpu_has_bf16():
        _warn_emulated_bf16()
        return None
    return torch.bfloat16


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs kernels asynchronously); a no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_bf16(device: torch.device) -> bool:
    """bfloat16 that is faster than float32 here: CUDA with bf16, or a CPU with native bf16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


@functools.cache
def _warn_emulated_bf16() -> None:  # once per process, not once per encoder built
    logger.warning("bf16 asked for, but this CPU has no native bf16 (AVX512_BF16 or AMX): float32 is used")


def weights_digest(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc only; elsewhere a no-op)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def lower_thread_priority(nice: int) -> None:
    """Add `nice` to the calling thread's nice value (Linux: a per-thread attribute, inherited by the threads it
    starts); elsewhere a no-op, since there it would lower the whole process."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512_BF16 or AMX): without them bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def export_path(ir_dir: Path, encoder: nn.Module, image_size: int) -> Path:
    """Where the OpenVINO export of these encoder weights is kept: named by the weights themselves, not only the
    version, so that a version number reused after the model folder was reset never loads another's export."""
    return Path(ir_dir) / f"encoder-{weights_digest(encoder)}-{image_size}-b1.xml"


@contextlib.contextmanager
def export_lock(path: Path):
    """Hold `path`'s export lock (a `.lock` file beside it) across processes. On a fresh install the server and
    its start-up scoring subprocess both exported the encoder at once (8.4 GB peak against 3.1 GB); with the
    lock the second waits for the first's export and loads it. Without POSIX locks (Windows) no lock is taken:
    the export is still written under temporary names, so a half export never loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_suffix(".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is exporting this encoder; waiting to load its export (%s)", path.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class OpenVinoEncoder:
    """The encoder exported to OpenVINO IR (kept in `ir_dir` per encoder weights, so a restart only compiles).

    Args:
        encoder: the torch image encoder (its weights at this moment are what gets exported).
        image_size: S, the square input side.
        ir_dir: where IR files are kept; None: export every time (tests, benchmarks).
        bf16: infer in bfloat16 (only where the CPU has native bf16, else float32).
        threads: inference threads (0: torch's, so both runtimes use the same cores).
        nice: added to the nice value of the thread that runs every OpenVINO call, export included; the threads
            OpenVINO starts inherit it, so a click's decode (torch, normal priority) takes the cores from a slice
            being encoded instead of sharing them (decode of 4 candidate boxes while slices are encoded, 2 cores:
            379 ms at nice 0, 236 ms at 5, against 199 ms alone). OpenVINO's worker threads are one pool per
            process, started by its first user: in the server that is this worker, as the encoder is the only
            user of OpenVINO there.
    """

    def __init__(
        self,
        encoder: nn.Module,
        image_size: int,
        ir_dir: Path | None = None,
        bf16: bool = False,
        threads: int = 0,
        nice: int = 0,
    ) -> None:
        # one worker thread, one slice at a time: concurrent encodes on the same cores are no faster in total,
        # each extra infer request holds its own buffers (8 annotators: server RSS 3.4 GB), and the queue is per
        # slice, so a click's slice slips in between the slices of a background pre-encoding batch
        self._worker = ThreadPoolExecutor(
            1, thread_name_prefix="encoder", initializer=lower_thread_priority, initargs=(nice,)
        )
        self.nice = nice
        self._worker.submit(self._build, encoder, image_size, ir_dir, bf16, threads).result()

    def _build(self, encoder: nn.Module, image_size: int, ir_dir: Path | None, bf16: bool, threads: int) -> None:
        import openvino as ov

        begin = time.perf_counter()
        core = ov.Core()
        model = self._load_or_export(ov, core, encoder, image_size, ir_dir)
        precision = "bf16" if bf16 and cpu_has_bf16() else "f32"
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        }
        self._compiled = core.compile_model(model, "CPU", config)
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        del model
        release_freed_memory()  # an export leaves ~1 GB of freed tracing memory that malloc would otherwise keep
        self._request = self._compiled.create_infer_request()
        self.name = f"openvino-{precision}"
        logger.info(
            "image encoder on OpenVINO (%s, %d threads, nice +%d) ready in %.1f s",
            precision, self.threads, self.nice, time.perf_counter() - begin,
        )  # fmt: skip

    @staticmethod
    def _load_or_export(ov, core, encoder: nn.Module, image_size: int, ir_dir: Path | None):
        if ir_dir is None:
            return OpenVinoEncoder._export(ov, encoder, image_size, None)
        path = export_path(ir_dir, encoder, image_size)
        with export_lock(path):  # another process exporting the same weights: wait, then load its export
            if path.exists() and path.with_suffix(".bin").exists():
                return core.read_model(path)
            return OpenVinoEncoder._export(ov, encoder, image_size, path)

    @staticmethod
    def _export(ov, encoder: nn.Module, image_size: int, path: Path | None):
        begin = time.perf_counter()
        example = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # TinyViT's shape asserts: constant here
            # batch 1: TinyViT's traced reshapes fix the batch, and a batch is no faster per slice here (measured)
            model = ov.convert_model(encoder.eval(), example_input=example)
        if path is not None:  # export_lock made its folder
            # written under temporary names, then renamed: a crash never leaves a half IR that later loads
            with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
                staged = Path(scratch) / path.name
                ov.save_model(model, staged, compress_to_fp16=False)
                os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
                os.replace(staged, path)
            logger.info("image encoder exported to %s in %.1f s", path, time.perf_counter() - begin)
        return model

    def __call__(self, normalized: torch.Tensor) -> torch.Tensor:
        pixels = normalized.detach().to("cpu", torch.float32).contiguous().numpy()
        slices = [self._worker.submit(self._infer, pixels[i : i + 1]).result() for i in range(len(pixels))]
        return torch.from_numpy(np.concatenate(slices))

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        return self._request.infer({0: pixels})[0].copy()


def make_encoder_runtime(
    runtime: str,
    encoder: nn.Module,
    image_size: int,
    device: torch.device,
    low_precision: bool,
    ir_dir: Path | None = None,
    threads: int = 0,
    nice: int = 0,
) -> EncoderRuntime:
    """The runtime asked for; `auto` is OpenVINO on a CPU when it is installed, torch otherwise.

    low_precision: bf16 on a CPU with native bf16 (else float32), fp16 on CUDA (`low_precision_dtype`).
    threads: OpenVINO's inference threads (0: as many as torch uses); torch's encoder shares torch's threads.
    nice: how much lower than the caller's the OpenVINO encoder's CPU priority is (OpenVinoEncoder).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"encoder runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if device.type == "cuda":
        if runtime == "openvino":
            logger.warning("encoder runtime openvino is for CPUs; on %s torch runs the encoder", device)
        return TorchEncoder(encoder, device, low_precision_dtype(device, low_precision))
    if runtime in ("auto", "openvino") and openvino_available():
        try:
            return OpenVinoEncoder(encoder, image_size, ir_dir, bf16=low_precision, threads=threads, nice=nice)
        except Exception:  # noqa: BLE001 - an export failure must not stop the server: torch still serves
            logger.exception("exporting the image encoder to OpenVINO failed; torch runs it")
    elif runtime == "openvino":
        logger.warning("encoder runtime openvino asked for but the openvino package is not installed; using torch")
    if threads:
        logger.warning("encoder_threads %d is for the OpenVINO encoder; torch's runs on torch's threads", threads)
    return TorchEncoder(encoder, device, low_precision_dtype(device, low_precision))
