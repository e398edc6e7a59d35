"""The embedding cache stays within its byte budget; `--conf` values are parsed or refused clearly."""

import json

import pytest
import torch

from lib.engine.cache import EmbeddingCache
from lib.settings import AppSettings, ConfError, parse_labels


def test_cache_evicts_least_recently_used_within_budget():
    one = torch.zeros(256, dtype=torch.float32)  # 1 KiB
    cache = EmbeddingCache(budget_bytes=3 * 1024)
    for key in "abc":
        cache.put(key, one.clone())
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", one.clone())
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.nbytes <= cache.budget_bytes
    assert cache.stats()["hits"] == 1


def test_cache_ignores_an_item_larger_than_the_budget():
    cache = EmbeddingCache(budget_bytes=100)
    cache.put("big", torch.zeros(1000))
    assert len(cache) == 0 and cache.nbytes == 0


def test_labels_accept_names_list_map_and_file(tmp_path):
    assert parse_labels("liver, spleen") == {"liver": 1, "spleen": 2}
    assert parse_labels('["a", "b"]') == {"a": 1, "b": 2}
    assert parse_labels('{"a": 3, "b": 7}') == {"a": 3, "b": 7}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"x": 2}))
    assert parse_labels(str(path)) == {"x": 2}


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"labels": '{"a": 0}'}, "1..255"),
        ({"labels": '{"a": 1, "b": 1}'}, "share an index"),
        ({"labels": "{bad json"}, "invalid JSON"),
        ({"cache_mb": "lots"}, "expected a int"),
        ({"cache_mb": "1"}, "at least 16"),
        ({"encoder_bf16": "maybe"}, "true or false"),
        ({"modality": "PET"}, "auto, CT or MR"),
        ({"ct_window": "40"}, "level,width"),
        ({"device": "tpu"}, "auto, cpu, cuda"),
    ],
)
def test_bad_conf_values_name_the_key(conf, message):
    with pytest.raises(ConfError, match=message):
        AppSettings.from_conf(conf)


def test_defaults_and_passthrough_keys():
    settings = AppSettings.from_conf({"server_mode": "true", "cache_mb": "64", "ct_window": "50,350"})
    assert settings.model == "lite_medsam" and settings.cache_mb == 64 and settings.ct_window == (50.0, 350.0)
    assert (
        settings.propagation_end_taper
        and not AppSettings.from_conf({"propagation_end_taper": "false"}).propagation_end_taper
    )
    assert settings.encoder_export_dir is None  # the app's <model_dir>/openvino
    assert AppSettings.from_conf({"encoder_export_dir": " /srv/exports "}).encoder_export_dir == "/srv/exports"
    assert settings.embeddings_dir is None  # the app's <model_dir>/embeddings
    assert AppSettings.from_conf({"embeddings_dir": "/scratch/emb"}).embeddings_dir == "/scratch/emb"


def test_roi_slack_is_the_models_unless_the_conf_sets_one():
    assert AppSettings().roi_slack == 0.5  # LiteMedSAM: the hippocampi reach beyond the middle slice's box
    assert AppSettings.from_conf({"model": "mobile_sam"}).roi_slack == 0.25  # natural-image SAMs flood
    assert AppSettings.from_conf({"propagation_roi_slack": "-1"}).roi_slack == -1.0  # no cut
    with pytest.raises(ConfError, match="propagation_roi_slack"):
        AppSettings.from_conf({"propagation_roi_slack": "wide"})


def test_plane_guidance_and_smoothing_are_on_by_default_and_can_be_turned_off():
    assert (AppSettings().propagation_plane_guide, AppSettings().propagation_smooth) == (2.0, 1.0)
    off = AppSettings.from_conf({"propagation_plane_guide": "0", "propagation_smooth": "0"})
    assert (off.propagation_plane_guide, off.propagation_smooth) == (0.0, 0.0)
    for bad in ("-1", "nan", "inf", "wide"):
        with pytest.raises(ConfError, match="propagation_smooth"):
            AppSettings.from_conf({"propagation_smooth": bad})


def test_the_propagation_config_carries_every_propagation_key_and_the_models_slack():
    # the server and the benchmarks both build the 3D propagation from this, so a conf key reaches both
    conf = {
        "propagation_margin": "5", "propagation_mask_prompt": "true", "propagation_end_taper": "false",
        "propagation_plane_guide": "0", "propagation_smooth": "0.5", "focus_context": "2",
        "click_corrections": "false",
    }  # fmt: skip
    config = AppSettings.from_conf(conf).propagation_config()
    assert (config.margin, config.use_mask_prompt, config.end_taper) == (5, True, False)
    assert (config.plane_guide, config.smooth_sigma, config.first_context) == (0.0, 0.5, 2.0)
    assert config.click_corrections is False and config.roi_slack == 0.5  # LiteMedSAM's own
    assert AppSettings.from_conf({"model": "mobile_sam"}).propagation_config().roi_slack == 0.25
    assert AppSettings().propagation_config().planes == 1  # three planes cost about three times the encodes
    assert AppSettings.from_conf({"propagation_planes": "3"}).propagation_config().planes == 3
    for bad in ("2", "0", "three"):
        with pytest.raises(ConfError, match="propagation_planes"):
            AppSettings.from_conf({"propagation_planes": bad})


def test_mask_threshold_is_the_models_unless_the_conf_sets_one():
    assert AppSettings().decoder_threshold == -1.5  # LiteMedSAM's calibrated threshold
    assert AppSettings.from_conf({"model": "mobile_sam"}).decoder_threshold == 0.0  # SAM's
    assert AppSettings.from_conf({"model": "mobile_sam", "mask_threshold": "-0.5"}).decoder_threshold == -0.5


def test_the_service_runs_as_the_conf_says():
    conf = {"decoder_bf16": "false", "cache_mb": "64", "propagation_planes": "3", "model": "mobile_sam"}
    config = AppSettings.from_conf(conf).service_config("/exports")
    assert config.decoder_bf16 is False and config.compile_decoder is True and config.cache_bytes == 64 << 20
    assert config.propagation.planes == 3 and config.mask_threshold == 0.0 and config.encoder_ir_dir == "/exports"
    assert AppSettings().service_config("/exports").decoder_bf16 is True
