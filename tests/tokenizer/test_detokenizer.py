"""IncrementalDetokenizer against SmolLM2's byte-level BPE tokenizer (streamed pieces == full decode, no
half characters ever shown), and the stop-string helpers."""

from __future__ import annotations

import pytest

from mmserve.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog, 42 times.\nNew line.",
    "accented": "Café naïve façade: crème brûlée, Ångström, señor, Øre, ŝi ĉiam",
    "cjk": "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji": "emoji 😀🎉 done 👨‍👩‍👧‍👦 family 🇫🇷 flag",
}


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    pieces = [detok.append(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.finish())
    return pieces


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_equals_full_decode(tokenizer, name: str, chunk: int) -> None:
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = _stream(detok, ids, chunk)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full == TEXTS[name]
    assert "".join(pieces) == full
    assert detok.text == full and not detok.corrected
    assert detok.output_ids == ids
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("name", ["accented", "cjk", "emoji"])
def test_multibyte_characters_are_held_back(tokenizer, name: str) -> None:
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    # The tokenizer really splits some character across tokens: a lone token decodes to U+FFFD.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.append([t]) for t in ids]
    assert "" in pieces  # some step had nothing readable yet
    assert all("\ufffd" not in p for p in pieces)
    # Every piece is made of whole characters of the text, in order.
    assert TEXTS[name].startswith("".join(pieces))
    detok.finish()
    assert detok.text == TEXTS[name]


def test_per_step_work_is_bounded(tokenizer) -> None:
    """Each step decodes a short window, not the whole output."""
    ids = tokenizer.encode(TEXTS["english"] * 20, add_special_tokens=False)
    lengths: list[int] = []

    class Spy:
        def decode(self, token_ids: list[int], **kwargs: object) -> str:
            lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, **kwargs)

    detok = IncrementalDetokenizer(Spy())
    for t in ids:
        detok.append([t])
    assert len(ids) > 300 and max(lengths) <= 4
    detok.finish()
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip: bool) -> None:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo 😀"}, {"role": "assistant", "content": "Salut 🎉 ça va ?"}],
        tokenize=True,
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = _stream(detok, ids)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full == detok.text
    assert ("<|im_end|>" in full) is (not skip)
    assert all("\ufffd" not in p for p in pieces)


def test_spaces_between_special_tokens_flag_is_accepted(tokenizer) -> None:
    ids = tokenizer.encode("a<|im_end|><|im_start|>b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, spaces_between_special_tokens=False)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == detok.text == tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("prompt", ["The answer is", "Prix: 10€ pour 🎉", "<|im_start|>assistant\n", "日本"])
def test_prompt_context(tokenizer, prompt: str) -> None:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    output = " forty-two, café 😀 and 中文."
    out_ids = tokenizer.encode(prompt + output, add_special_tokens=False)[len(prompt_ids) :]
    assert tokenizer.encode(prompt + output, add_special_tokens=False)[: len(prompt_ids)] == prompt_ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    pieces = _stream(detok, out_ids)
    full = tokenizer.decode(out_ids, skip_special_tokens=True)
    assert "".join(pieces) == full == detok.text
    assert not detok.text.startswith(prompt)
    assert full.startswith(" forty")  # the leading space is kept


def test_finish_flushes_truly_incomplete_character(tokenizer) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    truncated = ids[:-1]  # cut inside the emoji's bytes
    full = tokenizer.decode(truncated, skip_special_tokens=True)
    assert full.endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer)
    pieces = _stream(detok, truncated)
    assert "\ufffd" in pieces[-1] and all("\ufffd" not in p for p in pieces[:-1])
    assert "".join(pieces) == detok.text == full


def test_finish_repairs_non_additive_decoder() -> None:
    """A decoder that drops a leading space (SentencePiece style): streamed text uses the prompt context,
    finish() makes `text` exactly the standalone decode and says so."""

    class StripTok:
        vocab = {0: "▁The", 1: "▁answer", 2: "▁is", 3: "▁42"}

        def decode(self, ids: list[int], **kwargs: object) -> str:
            return "".join(self.vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    detok = IncrementalDetokenizer(StripTok(), prompt_ids=[0, 1])
    streamed = "".join([detok.append([2]), detok.append([3])])
    assert streamed == " is 42"
    assert detok.finish() == ""
    assert detok.text == "is 42" and detok.corrected

    plain = IncrementalDetokenizer(StripTok())
    assert "".join([plain.append([2]), plain.append([3]), plain.finish()]) == "is 42"
    assert plain.text == "is 42" and not plain.corrected


def test_append_after_finish_raises(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    detok.append(tokenizer.encode("hi", add_special_tokens=False))
    detok.finish()
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.append([1])


# ---------------------------------------------------------------------------------------------- stop strings


def test_find_stop_string_basic() -> None:
    assert find_stop_string("hello world", ["world"]) == (6, "world")
    assert find_stop_string("hello world", ["xyz"]) is None
    assert find_stop_string("hello world", []) is None
    assert find_stop_string("abc STOP def END", ["END", "STOP"]) == (4, "STOP")  # earliest wins
    assert find_stop_string("xxAB", ["AB", "A"]) == (2, "AB")  # same index: first listed wins


def test_find_stop_string_respects_search_from() -> None:
    text = "a##b##c"
    assert find_stop_string(text, ["##"], search_from=0) == (1, "##")
    # An occurrence that ended by search_from was checked already; the next one is found.
    assert find_stop_string(text, ["##"], search_from=3) == (4, "##")
    # An occurrence that straddles search_from ends after it, so it counts.
    assert find_stop_string(text, ["##"], search_from=2) == (1, "##")


def test_find_stop_string_split_across_pieces(tokenizer) -> None:
    text = "The result is done. ###END### ignored tail"
    stops = ["###END###"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    checked = 0
    found = None
    pieces_after_start = 0
    for t in ids:
        piece = detok.append([t])
        if "#" in piece:
            pieces_after_start += 1
        found = find_stop_string(detok.text, stops, search_from=checked)
        checked = len(detok.text)
        if found:
            break
    assert pieces_after_start > 1  # the stop string really arrived in several pieces
    assert found == (text.index("###END###"), "###END###")


def test_streaming_with_holdback_never_shows_stop_prefix(tokenizer) -> None:
    text = "Answer: 12 <st and more <stop> after"
    stops = ["<stop>"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    sent = ""
    checked = 0
    for t in ids:
        detok.append([t])
        found = find_stop_string(detok.text, stops, search_from=checked)
        checked = len(detok.text)
        if found:
            sent += detok.text[len(sent) : found[0]]
            break
        visible = len(detok.text) - stop_holdback(detok.text, stops)
        sent += detok.text[len(sent) : visible]
        # Whatever was sent stays in the final answer: nothing shown is later trimmed.
        assert "Answer: 12 <st and more ".startswith(sent)
    assert sent == "Answer: 12 <st and more "


def test_stop_holdback() -> None:
    assert stop_holdback("hello", ["</s>"]) == 0
    assert stop_holdback("hello <", ["</s>"]) == 1
    assert stop_holdback("hello </", ["</s>"]) == 2
    assert stop_holdback("hello </s", ["</s>"]) == 3
    assert stop_holdback("hello </s>", ["</s>"]) == 0  # a whole stop string is find_stop_string's job
    assert stop_holdback("ab", ["abc", "bcd"]) == 2
    assert stop_holdback("xab", ["b", "abz"]) == 2  # the longest suffix over all stops
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("aaa", ["aaaa"]) == 3
    assert stop_holdback("anything", []) == 0


@pytest.mark.parametrize("min_new_tokens", [0, 4])
def test_request_state_deferring_text_gives_the_same_result(tokenizer, min_new_tokens: int) -> None:
    """The in-process Engine's non-streaming wait detokenizes once at the end: same text, same stop-string cut
    (a stop string ending inside the min_new_tokens stretch does not count) as folding token by token."""
    from mmserve.messages import TokenOutput
    from mmserve.sampling_params import SamplingParams
    from mmserve.tokenizer.request_state import RequestState

    ids = tokenizer.encode(TEXTS["accented"] + " " + TEXTS["english"], add_special_tokens=False)
    params = SamplingParams.from_dict({"max_new_tokens": len(ids), "min_new_tokens": min_new_tokens,
                                       "stop": ["Ca", "fox"]})
    states = []
    for defer in (False, True):
        state = RequestState.create("r", params, [1, 2], tokenizer)
        state.defer_text = defer
        for i, t in enumerate(ids):
            last = i == len(ids) - 1
            state.absorb(TokenOutput(rid="r", new_token_ids=[t], finished_reason={"type": "length"} if last else None,
                                     prompt_tokens=2, completion_tokens=i + 1, cached_tokens=0))
            if defer and not last:
                assert state.detokenizer.text == ""  # nothing decoded before the end
        states.append(state)
    eager, deferred = states
    assert deferred.visible_text() == eager.visible_text()
    assert deferred.stop_search_from == eager.stop_search_from
    # "Ca" opens the text: it cuts there unless min_new_tokens held it back; then "fox" cuts later
    assert eager.visible_text() == ("" if min_new_tokens == 0 else eager.detokenizer.text.split("fox")[0])
