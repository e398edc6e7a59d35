"""The serving decoder (lib.model.fast_decoder) answers as SAM's decoder does, keeps a slice's image-only work for
the next prompt on it, and never compiles on a request. Its bfloat16 answers are checked against the reference on
the sample slices in tests/test_encoder_runtime.py (random embeddings make masks too ambiguous to compare)."""

import pytest
import torch

from lib.model.fast_decoder import FastDecoder


def prompt_kinds() -> dict[str, tuple]:
    """(points, boxes, mask_inputs, multimask) of every prompt the server sends, in encoder-input pixels."""
    box = torch.tensor([[40.0, 50, 120, 150]])
    clicks = (torch.tensor([[[60.0, 70], [80, 90]]]), torch.tensor([[1, 0]]))
    candidates = (torch.tensor([[[60.0, 70]]]).expand(4, -1, -1), torch.ones(4, 1, dtype=torch.int64))
    mask = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    return {
        "box": (None, box, None, False),
        "clicks, three masks": (clicks, None, None, True),
        "box and clicks": (clicks, box, None, False),
        "four candidate boxes, one click": (candidates, box.repeat(4, 1) + 3 * torch.arange(4.0)[:, None], None, False),
        "box and a neighbour's mask": (None, box, mask, False),
        "clicks and a mask, three masks": (clicks, None, mask, True),
    }


def test_the_fast_decoder_answers_as_sams_decoder_for_every_prompt_kind(lite_model):
    network = lite_model.network
    decoder = FastDecoder(network)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, (points, boxes, masks, multimask) in prompt_kinds().items():
            expected_logits, expected_iou = network.decode(embedding, points, boxes, masks, multimask)
            logits, iou = decoder(embedding, points, boxes, masks, multimask, image_key="slice 70")
            assert logits.shape == expected_logits.shape and iou.shape == expected_iou.shape, name
            torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4, msg=name)
            torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=1e-5, msg=name)
    # four prompt kinds without a mask shared one image side; with a mask prompt nothing is shared
    assert decoder.sides_made == 1


def test_the_image_side_is_kept_per_slice_and_only_for_the_latest_slices(lite_model):
    decoder = FastDecoder(lite_model.network)
    box = torch.tensor([[40.0, 50, 120, 150]])
    first, second = (torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    with torch.no_grad():
        on_first = decoder(first, None, box, None, image_key=("sub-01", 70))
        on_second = decoder(second, None, box, None, image_key=("sub-01", 71))
        assert decoder.sides_made == 2
        # the second slice's side must not answer for the first: the answer is the first slice's again
        torch.testing.assert_close(decoder(first, None, box, None, image_key=("sub-01", 70))[0], on_first[0])
        assert not torch.allclose(on_first[0], on_second[0])
        assert decoder.sides_made == 2
        decoder(first, None, box, None)  # no key: nothing kept, nothing reused
        assert decoder.sides_made == 3
        for z in range(72, 72 + 4):  # four newer slices push slice 70 out
            decoder(second, None, box, None, image_key=("sub-01", z))
        decoder(first, None, box, None, image_key=("sub-01", 70))
        assert decoder.sides_made == 3 + 4 + 1


@pytest.mark.slow
def test_compiled_decoder_matches_eager_and_falls_back_for_other_shapes(lite_model):
    decoder = FastDecoder(lite_model.network, compiled=True, signatures=((1, 0, False),))
    assert not decoder.ready
    decoder.warm_up()  # ~10-30 s on 2 cores
    assert decoder.ready == {(1, 0, False)}
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[40.0, 50, 120, 150]])
    with torch.no_grad():
        eager_logits, eager_iou = lite_model.network.decode(embedding, None, box, None)
        logits, iou = decoder(embedding, None, box, None, image_key="slice")
    torch.testing.assert_close(logits, eager_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(iou, eager_iou, atol=1e-4, rtol=1e-4)
    # a box plus two clicks was not warmed up: it must run eagerly (no compile on the request path)
    points = (torch.tensor([[[60.0, 70], [80, 90]]]), torch.tensor([[1, 0]]))
    calls = []
    original = decoder._compiled_masks
    decoder._compiled_masks = lambda *args: calls.append(args) or original(*args)
    with torch.no_grad():
        decoder(embedding, points, box, None, image_key="slice")
        assert calls == []
        decoder(embedding, None, box, None, image_key="slice")
    assert len(calls) == 1, "the warmed-up shape must run compiled"
