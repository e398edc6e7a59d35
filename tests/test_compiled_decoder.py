"""The compiled decoder answers exactly like the eager one, and never compiles on a request."""

import pytest
import torch

from lib.model.compiled import CompiledDecoder


@pytest.mark.slow
def test_compiled_decoder_matches_eager_and_falls_back_for_other_shapes(lite_model):
    decoder = CompiledDecoder(lite_model.network, signatures=((1, 0, False, False),))
    assert not decoder.ready
    decoder.warm_up()  # ~30 s on 2 cores
    assert decoder.ready == {(1, 0, False, False)}
    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    box = torch.tensor([[40.0, 50, 120, 150]])
    with torch.no_grad():
        eager_logits, eager_iou = lite_model.network.decode(embedding, None, box, None)
        logits, iou = decoder(embedding, None, box, None)
    torch.testing.assert_close(logits, eager_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(iou, eager_iou, atol=1e-4, rtol=1e-4)
    # a box plus two clicks was not warmed up: it must run eagerly (no compile on the request path)
    points = (torch.tensor([[[60.0, 70], [80, 90]]]), torch.tensor([[1, 0]]))
    calls = []
    original = decoder._compiled
    decoder._compiled = lambda *args: calls.append(args) or original(*args)
    with torch.no_grad():
        decoder(embedding, points, box, None)
    assert calls == []
