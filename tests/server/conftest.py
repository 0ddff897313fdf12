"""A real server process on loopback for the API tests: `start_server(model_path, *flags)` returns a handle
with the base URL; servers are stopped (SIGTERM) at the end of the module. Starting a server costs about ten
seconds, so servers whose tests only send requests are shared by the modules that ask for the same model and flags
(`smollm2_server`, `tiny_text_server`), and stopped when the tests/server package ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """The exit status; a server still running after `timeout` seconds is killed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def launch(model_path: str | None, *flags: str, log_dir, timeout: float = 180) -> ServerHandle:
    """Start `python -m mmserve.launch_server` (`mmserve serve` with no model when model_path is None)."""
    port = free_port()
    log_path = os.path.join(str(log_dir), f"server-{port}.log")
    if model_path is None:
        cmd = [sys.executable, "-m", "mmserve.cli", "serve", "--port", str(port), *flags]
    else:
        cmd = [sys.executable, "-m", "mmserve.launch_server", "--model-path", model_path, "--port", str(port),
               "--dtype", "float32", *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    handle = ServerHandle(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{handle.log()}")
        try:
            if httpx.get(handle.url + "/health", timeout=2).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    handle.stop()
    raise RuntimeError(f"server did not become healthy:\n{handle.log()}")


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    handles: list[ServerHandle] = []
    log_dir = tmp_path_factory.mktemp("server_logs")

    def start(model_path: str | None, *flags: str) -> ServerHandle:
        handle = launch(model_path, *flags, log_dir=log_dir)
        handles.append(handle)
        return handle

    yield start
    stop_all(handles)


def stop_all(handles: list[ServerHandle]) -> None:
    """SIGTERM every server first, then wait: each takes about a second to wind down, and they can do it together."""
    for handle in handles:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)
    for handle in handles:
        handle.wait()


@pytest.fixture(scope="package")
def smollm2_server(smollm2_dir, tmp_path_factory):
    """The real SmolLM2 (its de-quantized folder) with no flags."""
    handle = launch(str(smollm2_dir), log_dir=tmp_path_factory.mktemp("smollm2_server_logs"))
    yield handle
    handle.stop()


@pytest.fixture(scope="package")
def tiny_text_server(tiny_model_dir, tmp_path_factory):
    """The tiny random Qwen2 (SmolLM2's tokenizer and template, context 1024) with no flags."""
    handle = launch(str(tiny_model_dir("qwen2")), log_dir=tmp_path_factory.mktemp("tiny_text_server_logs"))
    yield handle
    handle.stop()
