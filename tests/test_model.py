"""The model layer: real LiteMedSAM weights load strictly; files that can't be trusted are refused."""

import shutil
import socket

import pytest
import torch

from lib.engine.embedding_store import EmbeddingStore
from lib.model import MODEL_REGISTRY, CheckpointError, build_model
from lib.model.checkpoints import CheckpointSource, load_state_dict, resolve_checkpoint, verify_checkpoint
from lib.model.registry import build_architecture


def test_lite_medsam_loads_from_the_package_and_runs(lite_model):
    assert lite_model.checkpoint.stat().st_size == 39_370_479
    assert lite_model.version.startswith("lite_medsam@79d8c9dca6db")
    embedding = lite_model.network.encode(torch.rand(1, 3, 256, 256) * 255)
    assert embedding.shape == (1, 256, 64, 64)
    logits, iou = lite_model.network.decode(embedding, None, torch.tensor([[60.0, 60, 160, 160]]), None)
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)


@pytest.mark.parametrize("name", ["sam_vit_b", "medsam_vit_b", "mobile_sam"])
def test_every_registered_architecture_accepts_its_own_state_dict_keys(name):
    # builds the untrained network (no weights here) and checks the SAM-style key layout round-trips strictly
    network = build_architecture(MODEL_REGISTRY[name])
    network.load_state_dict(network.state_dict(), strict=True)
    assert {k.split(".")[0] for k in network.state_dict()} == {"image_encoder", "prompt_encoder", "mask_decoder"}


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="lite_medsam"):
        build_model("no_such_model")


def test_a_checkpoint_whose_digest_differs_from_the_record_is_refused(tmp_path, lite_model):
    copy = tmp_path / "weights.pth"
    shutil.copy(lite_model.checkpoint, copy)
    (tmp_path / "weights.pth.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="does not match"):
        verify_checkpoint(copy, None)
    with pytest.raises(CheckpointError, match="does not match"):
        build_model("lite_medsam", checkpoint=str(copy), model_dir=tmp_path)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_a_crafted_pickle_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict(evil)
    assert not marker.exists()


def test_missing_file_and_offline_url_say_where_to_put_the_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(CheckpointSource("x.pth"), tmp_path, str(tmp_path / "missing.pth"))
    with socket.socket() as s:  # a loopback port with nobody listening: a download that fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = CheckpointSource("sam.pth", url=f"http://127.0.0.1:{port}/sam.pth")
    with pytest.raises(CheckpointError, match=r"put it at .*sam\.pth"):
        resolve_checkpoint(source, tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_mobile_sam_weights_load_from_the_optional_package(tmp_path):
    # the natural-image path of the two (arXiv 2411.02745): MobileSAM's own TinyViT at 1024x1024
    model = build_model("mobile_sam", model_dir=tmp_path)
    assert model.checkpoint.stat().st_size == 40_728_226
    assert model.network.image_size == 1024
    logits, _ = model.network.decode(torch.zeros(1, 256, 64, 64), None, torch.tensor([[100.0, 100, 400, 400]]), None)
    assert logits.shape == (1, 1, 256, 256)
    # a training round's store embeds at the model's own size (a benchmark once passed LiteMedSAM's 256)
    store = EmbeddingStore.for_model(tmp_path / "embeddings", model, model.network.image_encoder)
    assert (store.image_size, store.low_res) == (1024, 256)


def test_a_checkpoint_url_is_downloaded_once_verified_and_kept(tmp_path, lite_model):
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(lite_model.checkpoint, served / "my_lite_medsam.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/my_lite_medsam.pth"
    model_dir = tmp_path / "model"
    try:
        model = build_model("lite_medsam", checkpoint=url, model_dir=model_dir)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert model.checkpoint == model_dir / "my_lite_medsam.pth"
    assert (model_dir / "my_lite_medsam.pth.sha256").read_text().strip() == model.sha256
    again = build_model("lite_medsam", checkpoint=url, model_dir=model_dir)  # server gone: the kept copy serves
    assert again.sha256 == model.sha256
