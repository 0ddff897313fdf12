"""Fixtures of the scheduler tests: the tiny Qwen2 model most of them run, and an engine over it per module (a
module that needs other flags defines its own `engine`)."""

from __future__ import annotations

import pytest

from mmserve import Engine


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def engine(model_path):
    with Engine(model_path=model_path, dtype="float32") as e:
        yield e
