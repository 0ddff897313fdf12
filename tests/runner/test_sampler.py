"""Sampler: greedy, filters (checked against transformers' warpers), the sampled distribution, seeds,
penalties (transformers' repetition penalty, OpenAI's presence/frequency), logit_bias and min_new_tokens
(transformers' sequence_bias and min_new_tokens processors), and log-probs."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmserve.runner.sampler import PenaltyState, Sampler, SamplingBatch, _adjust_logits, _apply_penalties
from mmserve.sampling_params import SamplingParams

V = 200


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def _batch(params: list[SamplingParams], v: int = V, steps: list[int] | None = None,
           states: list[PenaltyState | None] | None = None, seed: int = 1234,
           stop_ids: list[list[int]] | None = None) -> SamplingBatch:
    gen = torch.Generator().manual_seed(seed)
    return SamplingBatch.build(
        params,
        states if states is not None else [None] * len(params),
        steps if steps is not None else [0] * len(params),
        v,
        "cpu",
        generator=gen,
        stop_ids=stop_ids,
    )


def _sample_many(row: torch.Tensor, params: SamplingParams, n: int, seed: int = 1234) -> torch.Tensor:
    """n draws for one row of logits, as a batch of n identical rows."""
    logits = row.unsqueeze(0).expand(n, -1).contiguous()
    return Sampler()(logits, _batch([params] * n, v=row.numel(), seed=seed)).next_token_ids


def _hf_support(row: torch.Tensor, warpers: list) -> torch.Tensor:
    """Token ids that transformers' warper chain leaves with a finite score."""
    scores = LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), row.unsqueeze(0).clone())
    return torch.isfinite(scores[0]).nonzero().flatten()


def _hf_probs(row: torch.Tensor, warpers: list) -> torch.Tensor:
    scores = LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), row.unsqueeze(0).clone())
    return torch.softmax(scores[0], dim=-1)


def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the tokens with expected count >= 5, plus one pooled bin for the rest."""
    n = samples.numel()
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    assert (obs[~keep] == 0).all(), "draws landed on zero-probability tokens"
    stat = (((obs - exp) ** 2) / exp)[keep].sum().item()
    return stat, int(keep.sum().item()) - 1


def _within_chi_square(stat: float, df: int) -> bool:
    # mean df, sd sqrt(2 df): six sd is a false-alarm rate far below anything that matters, and the seeds
    # are fixed anyway.
    return stat < df + 6 * (2 * df) ** 0.5


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits(16).to(dtype)
    params = [SamplingParams(temperature=0.0)] * 8 + [SamplingParams(top_k=1, temperature=0.7)] * 8
    batch = _batch(params)
    assert batch.all_greedy
    out = Sampler()(logits, batch)
    assert out.next_token_ids.dtype == torch.int64
    assert torch.equal(out.next_token_ids, logits.float().argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None and out.top_logprob_ids is None


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    logits = _logits(64)
    params = [SamplingParams(temperature=0.0 if i % 2 else 5.0) for i in range(64)]
    out = Sampler()(logits, _batch(params)).next_token_ids
    argmax = logits.argmax(-1)
    assert torch.equal(out[1::2], argmax[1::2])
    assert not torch.equal(out[0::2], argmax[0::2])  # at temperature 5 the sampled rows wander


def test_tiny_temperature_is_finite_and_argmax() -> None:
    logits = _logits(4)
    out = Sampler()(logits, _batch([SamplingParams(temperature=1e-30)] * 4)).next_token_ids
    assert torch.equal(out, logits.argmax(-1))


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, V), _batch([]))
    assert out.next_token_ids.shape == (0,)


def test_wrong_logits_shape_raises() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, V + 1), _batch([SamplingParams()] * 2))


# ---------------------------------------------------------------------------------------------- filters


def test_top_k_stays_in_top_k() -> None:
    row = _logits(1, seed=1)[0]
    draws = _sample_many(row, SamplingParams(temperature=1.5, top_k=5), 4000)
    allowed = set(row.topk(5).indices.tolist())
    assert set(draws.tolist()) == allowed  # never outside, and at temperature 1.5 all five show up
    hf = _hf_support(row, [TemperatureLogitsWarper(1.5), TopKLogitsWarper(5)])
    assert set(hf.tolist()) == allowed


def test_top_k_keeps_ties_like_transformers() -> None:
    row = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 0.0])
    draws = _sample_many(row, SamplingParams(top_k=2, temperature=3.0), 3000)
    hf = set(_hf_support(row, [TopKLogitsWarper(2)]).tolist())
    assert hf == {0, 1, 2, 3}
    assert set(draws.tolist()) == hf


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_stays_in_nucleus(top_p: float) -> None:
    row = _logits(1, seed=2)[0]
    params = SamplingParams(temperature=0.8, top_p=top_p)
    draws = _sample_many(row, params, 4000)
    nucleus = _hf_support(row, [TemperatureLogitsWarper(0.8), TopPLogitsWarper(top_p)])
    assert set(draws.tolist()) <= set(nucleus.tolist())
    # The nucleus is the smallest prefix (by probability) whose mass reaches top_p.
    probs = torch.softmax(row / 0.8, -1)
    mass = probs[nucleus].sum().item()
    smallest_kept = probs[nucleus].min().item()
    assert mass >= top_p and mass - smallest_kept < top_p


def test_top_p_keeps_at_least_one_token() -> None:
    row = torch.tensor([10.0, 0.0, 0.0, 0.0])
    draws = _sample_many(row, SamplingParams(top_p=1e-6), 500)
    assert (draws == 0).all()


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_respects_threshold(min_p: float) -> None:
    row = _logits(1, seed=3)[0]
    draws = _sample_many(row, SamplingParams(temperature=0.7, min_p=min_p), 4000)
    probs = torch.softmax(row / 0.7, -1)
    threshold = min_p * probs.max()
    assert (probs[draws] >= threshold).all()
    hf = _hf_support(row, [TemperatureLogitsWarper(0.7), MinPLogitsWarper(min_p)])
    assert set(draws.tolist()) <= set(hf.tolist())
    assert set(hf.tolist()) == set((probs >= threshold).nonzero().flatten().tolist())


def test_distribution_matches_softmax() -> None:
    v = 50
    row = _logits(1, v=v, seed=4, scale=1.0)[0]
    draws = _sample_many(row, SamplingParams(), 20000, seed=7)
    stat, df = _chi_square(draws, torch.softmax(row, -1))
    assert _within_chi_square(stat, df), (stat, df)


def test_filtered_distribution_matches_transformers_chain() -> None:
    """temperature -> top_k -> top_p -> min_p, compared as a distribution with transformers' chain."""
    v = 100
    row = _logits(1, v=v, seed=5, scale=1.5)[0]
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02)
    hf = [TemperatureLogitsWarper(0.9), TopKLogitsWarper(30), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)]
    draws = _sample_many(row, params, 20000, seed=8)
    assert set(draws.tolist()) <= set(_hf_support(row, hf).tolist())
    stat, df = _chi_square(draws, _hf_probs(row, hf))
    assert _within_chi_square(stat, df), (stat, df)


def test_per_row_parameters_in_one_batch() -> None:
    """Rows with different filters in one batch each obey their own."""
    row = _logits(1, seed=6)[0]
    kinds = [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(min_p=0.5), SamplingParams()]
    n = 1000
    params = [k for k in kinds for _ in range(n)]
    logits = row.unsqueeze(0).expand(len(params), -1).contiguous()
    out = Sampler()(logits, _batch(params)).next_token_ids.view(len(kinds), n)
    assert set(out[0].tolist()) <= set(row.topk(3).indices.tolist())
    assert set(out[1].tolist()) <= set(_hf_support(row, [TopPLogitsWarper(0.5)]).tolist())
    assert set(out[2].tolist()) <= set(_hf_support(row, [MinPLogitsWarper(0.5)]).tolist())
    assert len(set(out[3].tolist())) > 20  # the unfiltered row still explores the vocabulary


# ---------------------------------------------------------------------------------------------- seeds


def _seeded_run(position: int, others: list[SamplingParams], seed: int, steps: int = 12,
                start_step: int = 0) -> list[int]:
    tokens = []
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    for step in range(start_step, start_step + steps):
        params = list(others)
        params.insert(position, target)
        logits = _logits(len(params), seed=100 + step)
        # The target's logits are the same whatever the batch: only its neighbours change.
        logits[position] = _logits(1, seed=200 + step)[0]
        batch = _batch(params, steps=[step] * len(params), seed=step * 31 + len(params))
        tokens.append(int(Sampler()(logits, batch).next_token_ids[position]))
    return tokens


def test_seed_reproduces_across_batch_composition_and_position() -> None:
    alone = _seeded_run(0, [], seed=42)
    crowded = _seeded_run(2, [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=7),
                              SamplingParams(top_k=3)], seed=42)
    last = _seeded_run(5, [SamplingParams(seed=42)] * 5, seed=42)
    assert alone == crowded == last
    # A later recomputation of steps 4.. gives the same tokens as the original run's steps 4..
    assert _seeded_run(1, [SamplingParams()], seed=42, steps=8, start_step=4) == alone[4:]


def test_different_seeds_differ() -> None:
    a = _seeded_run(0, [], seed=1, steps=20)
    b = _seeded_run(0, [], seed=2, steps=20)
    assert a != b


def test_seeded_steps_draw_fresh_noise() -> None:
    row = _logits(1, seed=9, scale=0.1)[0]  # nearly uniform, so the token follows the noise
    draws = set()
    for step in range(20):
        batch = _batch([SamplingParams(seed=5)], steps=[step])
        draws.add(int(Sampler()(row.unsqueeze(0), batch).next_token_ids[0]))
    assert len(draws) > 10


def test_seeded_rows_follow_the_distribution() -> None:
    """Seeded noise is real Exp(1) noise: over many seeds the draws follow softmax."""
    v = 20
    row = _logits(1, v=v, seed=10, scale=1.0)[0]
    n = 5000
    params = [SamplingParams(seed=s) for s in range(n)]
    draws = Sampler()(row.unsqueeze(0).expand(n, -1).contiguous(), _batch(params, v=v)).next_token_ids
    stat, df = _chi_square(draws, torch.softmax(row, -1))
    assert _within_chi_square(stat, df), (stat, df)


# ---------------------------------------------------------------------------------------------- penalties


def _state(prompt: list[int], output: list[int], v: int = V) -> PenaltyState:
    s = PenaltyState.create(prompt, v, "cpu")
    for t in output:
        s.update(t)
    return s


def test_penalty_state() -> None:
    s = _state([3, 5, 3], [5, 7, 7])
    assert s.seen.dtype == torch.bool and s.output_counts.dtype == torch.int32
    assert set(s.seen.nonzero().flatten().tolist()) == {3, 5, 7}
    assert s.output_counts[7] == 2 and s.output_counts[5] == 1 and s.output_counts[3] == 0
    with pytest.raises(ValueError, match="vocab_size"):
        PenaltyState.create([1, V], V, "cpu")


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    prompts = [[1, 2, 3, 50], [10, 11], [5]]
    outputs = [[4, 4, 60], [], [5, 6, 199]]
    logits = _logits(3)
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty)] * 2
    params.append(SamplingParams(temperature=0.0))
    states = [_state(p, o) for p, o in zip(prompts, outputs, strict=True)]
    batch = _batch(params, states=states)
    ours = _apply_penalties(logits.clone(), batch)
    for i in range(3):
        p = params[i].repetition_penalty
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = logits[i]
        if p != 1.0:
            expected = RepetitionPenaltyLogitsProcessor(p)(ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=0)


def test_repetition_penalty_changes_greedy_choice_like_transformers() -> None:
    logits = torch.zeros(1, V)
    logits[0, 10] = 2.0  # the favourite, but already seen
    logits[0, 20] = 1.8
    state = _state([10], [])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2)]
    out = Sampler()(logits, _batch(params, states=[state])).next_token_ids
    hf = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[10]]), logits.clone()).argmax(-1)
    assert out.tolist() == hf.tolist() == [20]


def test_presence_frequency_openai_formula() -> None:
    prompts = [[1, 2, 3], [7]]
    outputs = [[2, 2, 9, 9, 9, 4], [7, 8]]
    logits = _logits(2)
    params = [SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(temperature=0, presence_penalty=-1.0, frequency_penalty=1.5)]
    states = [_state(p, o) for p, o in zip(prompts, outputs, strict=True)]
    ours = _apply_penalties(logits.clone(), _batch(params, states=states))
    for i in range(2):
        expected = logits[i].clone()
        for tok in set(outputs[i]):  # prompt tokens are not penalised: OpenAI counts generated tokens only
            count = outputs[i].count(tok)
            expected[tok] -= count * params[i].frequency_penalty + params[i].presence_penalty
        torch.testing.assert_close(ours[i], expected)


def test_all_penalties_together_and_rows_without_state() -> None:
    logits = _logits(2)
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.2, frequency_penalty=0.1),
        SamplingParams(temperature=0),
    ]
    states: list[PenaltyState | None] = [_state([1, 2], [2, 3, 3]), None]
    ours = _apply_penalties(logits.clone(), _batch(params, states=states))
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[1, 2, 2, 3, 3]]), logits[:1].clone())[0]
    expected[2] -= 0.1 * 1 + 0.2
    expected[3] -= 0.1 * 2 + 0.2
    torch.testing.assert_close(ours[0], expected)
    torch.testing.assert_close(ours[1], logits[1], rtol=0, atol=0)


def test_missing_penalty_state_raises() -> None:
    with pytest.raises(ValueError, match="PenaltyState"):
        _batch([SamplingParams(repetition_penalty=1.2)], states=[None])


def test_penalised_sampling_avoids_repeats() -> None:
    """A strong frequency penalty removes an over-used token from the sampled support."""
    row = torch.zeros(V)
    row[0] = 6.0
    state = _state([], [0, 0, 0, 0, 0])
    n = 2000
    params = [SamplingParams(frequency_penalty=2.0)] * n
    out = Sampler()(row.unsqueeze(0).expand(n, -1).contiguous(), _batch(params, states=[state] * n))
    assert (out.next_token_ids == 0).float().mean() < 0.05


# ------------------------------------------------------------------------------ logit_bias, min_new_tokens


def _params(**kw) -> SamplingParams:
    return SamplingParams.from_dict(kw)


def test_logit_bias_parsing() -> None:
    p = _params(logit_bias={"5": 2.5, "17": -100, "0": 100})
    assert p.logit_bias == {5: 2.5, 17: -100.0, 0: 100.0}
    assert _params(logit_bias={5: 1}).logit_bias == {5: 1.0}  # the in-process API may use integer keys
    assert _params(logit_bias=None).logit_bias == {} == SamplingParams().logit_bias
    assert SamplingParams.from_dict(p.to_dict()) == p
    for bad, match in [({"abc": 1}, "logit_bias key 'abc' is not a token id"),
                       ({"-3": 1}, "logit_bias key '-3' is not a token id"),
                       ({"1.5": 1}, "logit_bias key '1.5'"),
                       ({"7": 100.5}, r"logit_bias\['7'\] must be in \[-100, 100\], got 100.5"),
                       ({"7": float("nan")}, r"logit_bias\['7'\] must be in \[-100, 100\]"),
                       ({"7": "1"}, r"logit_bias\['7'\] must be a number"),
                       ({"7": True}, r"logit_bias\['7'\] must be a number"),
                       ([1, 2], "logit_bias must be an object")]:
        with pytest.raises(ValueError, match=match):
            _params(logit_bias=bad)


def test_min_new_tokens_parsing() -> None:
    assert _params(min_new_tokens=3, max_new_tokens=3).min_new_tokens == 3
    with pytest.raises(ValueError, match="min_new_tokens must be >= 0"):
        _params(min_new_tokens=-1)
    with pytest.raises(ValueError, match=r"min_new_tokens must be <= max_new_tokens \(4\), got 5"):
        _params(min_new_tokens=5, max_new_tokens=4)


def test_logit_bias_then_penalties_match_transformers() -> None:
    """HF's processor order: sequence_bias (single tokens here), then the repetition penalty."""
    logits = _logits(3)
    biases = [{3: 5.0, 50: -2.5, 199: 100.0}, {}, {7: -100.0, 8: 0.25}]
    prompts = [[3, 4, 50], [1], [8, 9]]
    params = [_params(temperature=0, logit_bias=b, repetition_penalty=1.3) for b in biases]
    states = [_state(p, []) for p in prompts]
    batch = _batch(params, states=states)
    assert batch.logit_bias is not None and batch.logit_bias.shape == (3, V)
    ours = _adjust_logits(logits.clone(), batch)
    for i in range(3):
        hf = [RepetitionPenaltyLogitsProcessor(1.3)]
        if biases[i]:
            hf.insert(0, SequenceBiasLogitsProcessor([[[t], b] for t, b in biases[i].items()]))
        expected = LogitsProcessorList(hf)(torch.tensor([prompts[i]]), logits[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=0)


def test_logit_bias_steers_greedy_and_sampled_rows() -> None:
    logits = _logits(4)
    argmax = logits.argmax(-1)
    params = [_params(temperature=0, logit_bias={"42": 100}),
              _params(temperature=0, logit_bias={str(int(argmax[1])): -100}),
              _params(temperature=0),
              _params(temperature=1.0, logit_bias={"42": 100})]
    batch = _batch(params)
    out = Sampler()(logits, batch).next_token_ids
    assert out[0] == 42 and out[1] != argmax[1] and out[2] == argmax[2] and out[3] == 42
    greedy = _batch(params[:3])
    assert greedy.all_greedy  # the argmax fast path still serves biased greedy rows
    assert Sampler()(logits[:3], greedy).next_token_ids.tolist() == out[:3].tolist()


def test_no_bias_tensor_without_bias() -> None:
    assert _batch([SamplingParams(), _params(min_new_tokens=2)], stop_ids=[[2], []]).logit_bias is None
    # past min_new_tokens nothing is held back
    assert _batch([_params(min_new_tokens=2)], steps=[2], stop_ids=[[2]]).logit_bias is None


def test_min_new_tokens_matches_transformers() -> None:
    """EOS and stop ids get -inf while fewer than min_new_tokens are out, as HF's MinNewTokensLengthLogitsProcessor."""
    logits = _logits(1)[0]
    prompt = [5, 6, 7]
    stop = [2, 11]
    for step in range(5):
        params = [_params(temperature=0, min_new_tokens=3, logit_bias={"2": 4.0})]
        batch = _batch(params, steps=[step], stop_ids=[stop])
        ours = _adjust_logits(logits.unsqueeze(0).clone(), batch)[0]
        ids = torch.tensor([prompt + [9] * step])
        hf = LogitsProcessorList([SequenceBiasLogitsProcessor([[[2], 4.0]]),
                                  MinNewTokensLengthLogitsProcessor(len(prompt), 3, stop)])
        expected = hf(ids, logits.unsqueeze(0).clone())[0]
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        assert torch.isinf(ours[stop]).all() == (step < 3)


def test_min_new_tokens_holds_back_a_favourite_stop_token() -> None:
    row = torch.zeros(V)
    row[2] = 30.0  # EOS would win every draw
    n = 500
    params = [_params(min_new_tokens=4)] * n
    held = Sampler()(row.unsqueeze(0).expand(n, -1).contiguous(), _batch(params, steps=[3] * n, stop_ids=[[2]] * n))
    assert (held.next_token_ids != 2).all()
    free = Sampler()(row.unsqueeze(0).expand(n, -1).contiguous(), _batch(params, steps=[4] * n, stop_ids=[[2]] * n))
    assert (free.next_token_ids == 2).all()
    greedy = [_params(temperature=0, min_new_tokens=1)]
    assert Sampler()(row.unsqueeze(0), _batch(greedy, stop_ids=[[2]])).next_token_ids.item() != 2


def test_bias_on_a_held_back_token_stays_minus_inf() -> None:
    params = [_params(temperature=0, min_new_tokens=1, logit_bias={"2": 100})]
    batch = _batch(params, stop_ids=[[2]])
    assert batch.logit_bias[0, 2].item() == float("-inf")
    assert Sampler()(_logits(1), batch).next_token_ids.item() != 2


def test_bias_ids_outside_the_vocabulary_raise() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        _batch([_params(logit_bias={str(V): 1})])


def test_logprobs_stay_raw_under_logit_bias() -> None:
    logits = _logits(1)
    out = Sampler()(logits, _batch([_params(temperature=0, logprobs=True, logit_bias={"42": 100})]))
    assert out.next_token_ids.item() == 42
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[:, 42])


# ---------------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(4)
    params = [SamplingParams(logprobs=True, repetition_penalty=2.0, temperature=0.5),
              SamplingParams(top_logprobs_num=5, temperature=0.0),
              SamplingParams(top_logprobs_num=2, top_k=4),
              SamplingParams(temperature=0.0)]
    for p in params:
        p.verify()
    states = [_state([int(logits[0].argmax())], [])] + [None] * 3
    out = Sampler()(logits, _batch(params, states=states))
    raw = torch.log_softmax(logits, -1)
    ids = out.next_token_ids
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprobs is not None and out.top_logprob_ids is not None
    assert out.top_logprobs.shape == (4, 5) and out.top_logprob_ids.dtype == torch.int64
    top = raw.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_logprob_ids, top.indices)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_bf16_are_float32() -> None:
    logits = _logits(3).bfloat16()
    out = Sampler()(logits, _batch([SamplingParams(top_logprobs_num=3, temperature=0)] * 3))
    raw = torch.log_softmax(logits.float(), -1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.max(-1).values)
    assert out.top_logprobs is not None and out.top_logprobs.dtype == torch.float32


def test_batch_flags() -> None:
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0.0, top_p=0.5, min_p=0.2),
              SamplingParams(top_logprobs_num=4)]
    b = _batch(params)
    assert not b.all_greedy and b.need_top_k and not b.need_top_p and not b.need_min_p
    assert not b.need_penalties and b.max_top_logprobs_num == 4 and b.need_logprobs
    assert b.temperatures.shape == (3, 1) and b.top_ks.tolist() == [[3], [V], [V]]
    assert b.top_ps[0].item() == float("inf")
