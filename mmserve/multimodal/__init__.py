"""Multimodal input: media loading, processors, items, hashing, the encoder cache and embedding merge."""
