"""The scheduler's side of bidirectional spans (Gemma 3's images): prefill steps carry each request's media spans
only for a model that asks for them, and a prefill chunk never ends inside a span that holds queries of the step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.scheduler.scheduler import Scheduler


def scheduler(bidirectional: bool = True) -> Scheduler:
    s = Scheduler.__new__(Scheduler)  # only the span rules: no runner, pools or caches
    s._bidirectional = bidirectional
    return s


def request(kv_len: int, *items: tuple[int, int]) -> SimpleNamespace:
    mm = MultimodalInputs(items=[MultimodalItem("image", {}, offset, length) for offset, length in items])
    return SimpleNamespace(kv_len=kv_len, mm=mm if items else None)


@pytest.mark.parametrize("kv_len, n, expected", [
    (0, 8, 8),  # ends before the image at 10
    (0, 10, 10),  # ends right where the image starts
    (0, 12, 10),  # would end inside it: ends before it instead
    (10, 8, 16),  # starts with the image: runs to its end, past the budget
    (10, 16, 16),  # the whole image
    (14, 4, 12),  # starts inside it (a cached prefix ending mid-image): runs to its end
    (26, 8, 8),  # after it
    (4, 30, 30),  # holds it whole
])
def test_a_chunk_never_ends_inside_an_image(kv_len, n, expected):
    assert scheduler()._chunk_len(request(kv_len, (10, 16)), n) == expected


def test_touching_images_are_one_span():
    s = scheduler()
    req = request(0, (10, 16), (26, 16), (50, 16))
    assert s._media_spans(req) == [(10, 42), (50, 66)]
    assert s._chunk_len(req, 30) == 10
    req.kv_len = 10
    assert s._chunk_len(req, 20) == 32  # both touching images in one step, as the attention merges them
    req.kv_len = 42
    assert s._chunk_len(req, 16) == 8  # ends before the third image


def test_spans_only_for_models_that_ask():
    with_media, text = request(0, (3, 4), (9, 4)), request(0)
    assert scheduler()._step_spans([with_media, text]) == [[(3, 7), (9, 13)], []]
    assert scheduler()._step_spans([text, text]) is None
    causal = scheduler(bidirectional=False)
    assert causal._step_spans([with_media]) is None
    assert causal._chunk_len(request(0, (10, 16)), 12) == 12
