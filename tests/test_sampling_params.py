"""SamplingParams: defaults, parsing of API payloads, and validation errors that name the parameter."""

from __future__ import annotations

import pytest

from mmserve.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
    assert p.seed is None and p.n == 1
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.logprobs is False and p.top_logprobs_num == 0
    assert not p.is_greedy
    assert not p.needs_penalty_state
    assert SamplingParams.from_dict(None) == p
    assert SamplingParams.from_dict({}) == p


def test_from_dict_normalises_stop() -> None:
    assert SamplingParams.from_dict({"stop": "###"}).stop == ["###"]
    assert SamplingParams.from_dict({"stop": ["a", "bc"]}).stop == ["a", "bc"]
    assert SamplingParams.from_dict({"stop": None}).stop == []
    assert SamplingParams.from_dict({"stop_token_ids": None}).stop_token_ids == []
    assert SamplingParams.from_dict({"stop_token_ids": [2, 7]}).stop_token_ids == [2, 7]


def test_from_dict_values_and_int_as_float() -> None:
    p = SamplingParams.from_dict({"temperature": 0, "top_k": 5, "max_new_tokens": 3, "seed": 7})
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_k == 5 and p.max_new_tokens == 3 and p.seed == 7
    assert p.is_greedy
    assert SamplingParams.from_dict({"top_k": 1}).is_greedy
    assert SamplingParams.from_dict({"repetition_penalty": 1.1}).needs_penalty_state
    assert SamplingParams.from_dict({"presence_penalty": 0.5}).needs_penalty_state


def test_from_dict_copies_existing_object() -> None:
    orig = SamplingParams(top_logprobs_num=3, stop=["x"])
    p = SamplingParams.from_dict(orig)
    assert p is not orig and p.logprobs is True
    assert orig.logprobs is False  # the caller's object is not normalised in place
    p.stop.append("y")
    assert orig.stop == ["x"]


def test_top_logprobs_implies_logprobs() -> None:
    assert SamplingParams.from_dict({"top_logprobs_num": 2}).logprobs is True


def test_to_dict_round_trip() -> None:
    p = SamplingParams.from_dict({"stop": "x", "seed": 3, "top_p": 0.5, "logprobs": True})
    d = p.to_dict()
    assert d["stop"] == ["x"] and d["seed"] == 3
    assert SamplingParams.from_dict(d) == p


def test_unknown_key_raises() -> None:
    with pytest.raises(ValueError, match="top_q"):
        SamplingParams.from_dict({"top_q": 0.5})


def test_non_dict_raises() -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_new_tokens", -1),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 2.0),
        ("top_p", -0.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.1),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("n", 0),
        ("top_logprobs_num", -1),
        ("stop", [""]),
        ("stop", ""),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_value_raises(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict({name: value})


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_new_tokens", 1.5),
        ("max_new_tokens", "10"),
        ("max_new_tokens", True),
        ("temperature", "hot"),
        ("temperature", None),
        ("top_k", 2.0),
        ("top_p", [0.5]),
        ("stop", 3),
        ("stop", ["a", 1]),
        ("stop_token_ids", 5),
        ("stop_token_ids", ["1"]),
        ("ignore_eos", 1),
        ("seed", "42"),
        ("seed", 1.0),
        ("n", None),
        ("logprobs", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_wrong_type_raises(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict({name: value})


def test_boundary_values_accepted() -> None:
    SamplingParams.from_dict({
        "max_new_tokens": 0, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 1.0,
        "presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 0.01, "n": 1,
        "top_logprobs_num": 0, "stop_token_ids": [0], "seed": -5,
    })


def test_verify_on_directly_constructed_object() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=2.0).verify()
    p = SamplingParams(stop="x")  # type: ignore[arg-type]
    p.verify()
    assert p.stop == ["x"]
