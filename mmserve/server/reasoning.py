"""Reasoning parsers (`--reasoning-parser`): a reasoning model's thinking, written between `<think>` and
`</think>`, goes to the chat message's `reasoning_content`, the rest to `content`, whole or streamed.

- `qwen3`: the model opens the block itself when it thinks (Qwen3 with `enable_thinking`); an answer that does not
  start with `<think>` is all content.
- `qwen3-thinking`, `deepseek-r1`: the chat template opens the block in the prompt, so the answer starts inside it
  (a `<think>` the model writes again at the start is dropped); an answer that never closes it is all reasoning.

Both parts are the answer's text as written (no whitespace trimmed around the tags). Streaming holds back only
what could still be a tag, so the deltas join to what the whole answer splits into.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmserve.tokenizer.detokenizer import stop_holdback

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    starts_inside: bool  # the prompt opened the block


PARSERS = {"qwen3": ReasoningFormat(starts_inside=False), "qwen3-thinking": ReasoningFormat(starts_inside=True),
           "deepseek-r1": ReasoningFormat(starts_inside=True)}


class ReasoningStream:
    """Splits one answer's text, fed in pieces, into (reasoning, content) pieces."""

    def __init__(self, fmt: ReasoningFormat):
        # where the text is: "start" (may yet open a block), "reasoning", "content"
        self.state = "start"
        self.fmt = fmt
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buffer += text
        reasoning, content = [], []
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(START):
                    self.buffer, self.state = stripped[len(START):], "reasoning"
                elif START.startswith(stripped) and not final:
                    break  # blank, or a start of the tag: wait for more
                else:
                    self.state = "reasoning" if self.fmt.starts_inside else "content"
            elif self.state == "reasoning":
                at = self.buffer.find(END)
                if at >= 0:
                    reasoning.append(self.buffer[:at])
                    self.buffer, self.state = self.buffer[at + len(END):], "content"
                    continue
                keep = 0 if final else stop_holdback(self.buffer, [END])
                reasoning.append(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            else:
                content.append(self.buffer)
                self.buffer = ""
                break
        return "".join(reasoning), "".join(content)


def split_reasoning(fmt: ReasoningFormat, text: str) -> tuple[str | None, str]:
    """(reasoning_content or None when there is none, content) of a whole answer."""
    reasoning, content = ReasoningStream(fmt).feed(text, final=True)
    return reasoning or None, content
