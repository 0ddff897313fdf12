"""Constrained decoding: grammars (JSON schema, regex, EBNF) that mask the logits before sampling."""
