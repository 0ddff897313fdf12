"""The model's processor in worker processes (`--mm-processor-pool process`): the same ids and features as in the
threads, for images and a video, with nothing left in shared memory; a worker that dies is replaced and the request
still answered; a script without a main guard works; the flag is checked."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from test_processor_cache import IMAGE, VIDEO, png, processor

from mmserve.config import ServerArgs


@pytest.fixture(scope="module")
def in_processes(tiny_qwen2_vl_dir):
    proc = processor(tiny_qwen2_vl_dir, mm_processor_pool="process", mm_processor_workers=2, mm_processor_cache_mb=0)
    proc.inline_when_alone = False  # every item through the processes
    yield proc
    proc.close()


def test_processes_give_what_threads_give(tiny_qwen2_vl_dir, in_processes):
    threads = processor(tiny_qwen2_vl_dir, mm_processor_pool="thread", mm_processor_cache_mb=0)
    assert threads.processes is None and in_processes.processes is not None
    frames = np.random.RandomState(5).randint(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    text = f"Look at {IMAGE} and {IMAGE}, then {VIDEO}."
    # the second image is 3 pixels high: as a bare array its height would pass for a channel count
    media = [("image", png(90, 60, 1)), ("image", png(40, 3, 2)), ("video", frames)]
    blocks = set(os.listdir("/dev/shm"))
    ids, mm = in_processes.process(text, media)
    assert set(os.listdir("/dev/shm")) == blocks  # the shared-memory blocks of the tasks are gone
    ref_ids, ref_mm = threads.process(text, media)
    threads.close()
    assert ids == ref_ids
    assert len(mm.items) == len(ref_mm.items) == 3
    for item, ref in zip(mm.items, ref_mm.items, strict=True):
        assert (item.modality, item.offset, item.length, item.hash) == (ref.modality, ref.offset, ref.length, ref.hash)
        assert item.features.keys() == ref.features.keys()
        for name, value in item.features.items():
            assert torch.equal(value, ref.features[name]), name


def test_a_dead_worker_is_replaced(in_processes):
    _, before = in_processes.process(IMAGE, [("image", png(48, 32, 3))])  # the processes are up
    old = in_processes.processes._pool
    for pid in list(old._processes):
        os.kill(pid, signal.SIGKILL)
    _, after = in_processes.process(IMAGE, [("image", png(48, 32, 4))])  # the same size, other pixels
    assert in_processes.processes._pool is not old
    assert after.items[0].length == before.items[0].length > 0
    assert not torch.equal(after.items[0].features["pixel_values"], before.items[0].features["pixel_values"])


def test_a_script_without_a_main_guard(tiny_qwen2_vl_dir, tmp_path):
    """A user's script that builds the processor at its top level: the worker processes do not run it again."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_processor_cache import IMAGE, png, processor\n"
        f"proc = processor({str(tiny_qwen2_vl_dir)!r}, mm_processor_pool='process', mm_processor_workers=1)\n"
        "proc.inline_when_alone = False\n"
        "ids, mm = proc.process(IMAGE, [('image', png(32, 32, 1))])\n"
        "proc.close()\n"
        "print('tokens', mm.items[0].length)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("tokens") == 1


def test_the_pool_flag_is_checked():
    with pytest.raises(ValueError, match="mm_processor_pool must be auto, thread or process"):
        ServerArgs(mm_processor_pool="fork")
