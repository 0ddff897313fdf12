"""The server past one engine process: `--dp-size 2` (two replicas behind one API server), `--tp-size 2` across
two "hosts" (`--nnodes 2`, node 1 a second `mmserve serve` on this machine), and a tensor-parallel rank that dies."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import free_port, launch

PROMPTS = ["The capital of France is", "One, two, three,", "Hello there", "The history of the city begins",
           "A list of colours: red,", "def main():", "Once upon a time", "The weather today"]
PARAMS = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def expected(tiny_text_server):
    """One engine's answers (the package's shared server of the same tiny Qwen2)."""
    return [generate(tiny_text_server, p) for p in PROMPTS]


def generate(server, prompt: str) -> list[int]:
    resp = httpx.post(server.url + "/generate", json={"text": prompt, "sampling_params": PARAMS}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def info(server) -> dict:
    return httpx.get(server.url + "/server_info", timeout=10).json()


def test_two_replicas_answer_concurrent_requests(start_server, tiny_model_dir, expected):
    server = start_server(str(tiny_model_dir("qwen2")), "--device", "cpu", "--dp-size", "2")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: generate(server, p), PROMPTS))
    assert answers == expected
    state = info(server)
    assert state["dp_size"] == 2 and len(state["replicas"]) == 2
    served = [r["stats"]["generated_tokens"] if r["stats"] else 0 for r in state["replicas"]]
    assert all(n > 0 for n in served) and sum(served) == len(PROMPTS) * PARAMS["max_new_tokens"], served
    assert state["stats"]["generated_tokens"] == sum(served)


def test_tp2_over_two_nodes_and_a_rank_that_dies(tiny_model_dir, expected, tmp_path):
    """Rank 1 lives in node 1's process tree; killing it ends node 0's engine, which the server restarts, and node
    1 starts its rank again to meet it."""
    model = str(tiny_model_dir("qwen2"))
    flags = ("--device", "cpu", "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}")
    node1 = launch_node1(model, flags, tmp_path)
    server = None
    try:
        server = launch(model, *flags, "--node-rank", "0", log_dir=tmp_path)
        assert [generate(server, p) for p in PROMPTS[:2]] == expected[:2]
        assert info(server)["tp_size"] == 2
        os.kill(_rank1_pid(node1.pid), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "is back" not in server.log():
            time.sleep(0.3)
        assert "starting a new engine process" in server.log() and info(server)["replicas"][0]["healthy"]
        assert generate(server, PROMPTS[2]) == expected[2]
    finally:
        if server is not None:
            assert server.stop() == 0
        node1.send_signal(signal.SIGTERM)
        node1.wait(timeout=30)
    assert node1.returncode == 0


def launch_node1(model: str, flags: tuple[str, ...], tmp_path):
    import subprocess
    import sys

    log = open(tmp_path / "node1.log", "w")  # noqa: SIM115 - kept open for the process's life
    return subprocess.Popen([sys.executable, "-m", "mmserve.launch_server", "--model-path", model, "--dtype",
                             "float32", *flags, "--node-rank", "1"], stdout=log, stderr=subprocess.STDOUT)


def _rank1_pid(parent: int) -> int:
    """The engine process node 1's server started (its one child that is a Python process)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = [int(p) for p in open(f"/proc/{parent}/task/{parent}/children").read().split()]
        for pid in children:
            cmd = open(f"/proc/{pid}/cmdline").read()
            if "multiprocessing" in cmd and "resource_tracker" not in cmd:
                return pid
        time.sleep(0.2)
    raise AssertionError("node 1 started no rank")


def test_balancer_methods():
    from mmserve.tokenizer.manager import Balancer, EngineReplica

    replicas = [EngineReplica(0), EngineReplica(1)]
    for r in replicas:  # healthy enough for the balancer: nothing else is looked at
        r.info, r.receiver = object(), type("T", (), {"done": lambda self: False})()
    least = Balancer("least_loaded", replicas)
    replicas[0].load = 3
    assert least.pick([1, 2]) is replicas[1]
    rr = Balancer("round_robin", replicas)
    assert [rr.pick([1]).index for _ in range(4)] == [1, 0, 1, 0]
    prefix = Balancer("prefix", replicas)
    long = list(range(40))
    home = prefix.pick(long)  # the least loaded: replica 1
    assert home is replicas[1]
    replicas[1].load = 5  # busier now, but within the slack: the prompt's first tokens go back to it
    assert prefix.pick(long + [7]) is replicas[1]
    replicas[1].load = 3 + 9  # past the slack: the least loaded instead
    assert prefix.pick(long) is replicas[0]
    replicas[0].error = "restarting"  # an unhealthy replica takes nothing
    assert {least.pick([1]).index for _ in range(3)} == {1}
