"""Start-up fails fast and says why: a busy port, a device or tensor-parallel degree this machine cannot give, or
a folder with no model is one line on stderr and exit code 2, within seconds and before any model loads. While
the weights load, progress is logged."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest
import torch

from mmserve import Engine
from mmserve.config import ServerArgs
from mmserve.runner.model_runner import LoadProgress

FAST_S = 10.0  # the model loads in 20-60 s on this machine; refusing takes the interpreter's start and torch's import


def run(*cmd: str) -> tuple[int, list[str], float]:
    """Run a command; its exit code, its stderr lines (without the default model's notice) and its duration."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("no model given")]
    return proc.returncode, lines, time.monotonic() - start


def assert_refused(result: tuple[int, list[str], float], *words: str) -> str:
    code, lines, seconds = result
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("mmserve: error: "), lines  # one line, no traceback, no loading
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    for word in words:
        assert word in lines[0], lines
    return lines[0]


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_busy_port_fails_before_loading(busy_port, tiny_model_dir):
    assert_refused(run("mmserve.cli", "serve", "--port", str(busy_port)), f"127.0.0.1:{busy_port}", "in use",
                   "--port")
    assert_refused(run("mmserve.launch_server", "--model-path", str(tiny_model_dir("qwen2")), "--port",
                       str(busy_port)), "in use")


def test_parallel_layouts_that_cannot_work_are_refused_at_once(tiny_model_dir):
    """Before loading (the server prints such a ValueError as one line and exits 2: the other tests here)."""
    from mmserve.launch_server import check_before_loading

    model = str(tiny_model_dir("qwen2"))  # 4 query heads, 2 key/value heads
    with pytest.raises(ValueError, match="--tp-size 3 does not divide the model's attention: 4 query heads and 2"):
        check_before_loading(ServerArgs(model_path=model, tp_size=3))
    with pytest.raises(ValueError, match="--dist-init-addr"):
        ServerArgs(model_path=model, tp_size=2, nnodes=2)
    with pytest.raises(ValueError, match="multiple of --nnodes"):
        ServerArgs(model_path=model, tp_size=3, nnodes=2, dist_init_addr="127.0.0.1:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_gpu_refused_at_once():
    assert_refused(run("mmserve.cli", "serve", "--device", "cuda"), "--device cuda", "no CUDA GPU", "--device cpu")
    assert_refused(run("mmserve.cli", "generate", "Hi", "--device", "cuda:1"), "no CUDA GPU")


def test_folder_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert_refused(run("mmserve.cli", "serve", str(tmp_path)), f"no config.json or weights in {tmp_path}")
    assert_refused(run("mmserve.cli", "generate", "Hi", "--model-path", str(tmp_path)), "no config.json or weights")
    with pytest.raises(ValueError, match="no config.json or weights in"):
        Engine(model_path=str(tmp_path))


def test_folder_with_config_but_no_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir("qwen2") / "config.json").read_text())
    assert_refused(run("mmserve.cli", "serve", str(tmp_path)), "no weights (*.safetensors or pytorch_model*.bin)")


def test_weights_loading_logs_progress(tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setattr(LoadProgress, "interval_s", 0.0)  # a line at every tenth, however fast the load
    with caplog.at_level(logging.INFO, logger="mmserve.runner.model_runner"):
        with Engine(model_path=str(tiny_model_dir("qwen2")), dtype="float32", max_total_tokens=64):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "mmserve.runner.model_runner"]
    assert lines[0].startswith("loading weights from "), lines
    tenths = [line for line in lines if line.startswith("loading weights: ")]
    assert len(tenths) >= 5 and "100% (" in tenths[-1], lines
    assert lines[-1].startswith("loaded ") and " tensors (" in lines[-1], lines
