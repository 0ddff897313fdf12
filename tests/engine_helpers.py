"""Checks shared by the engine and scheduler tests."""

from __future__ import annotations

from mmserve import Engine


def assert_pool_consistent(engine: Engine) -> None:
    """With nothing running, every KV slot is either free or held by the prefix cache, and nothing is locked."""
    sched = engine.scheduler
    assert not sched.has_work()
    assert sched.tree.protected_size() == 0
    assert engine.runner.kv_pool.available_size() + sched.tree.total_size() == engine.runner.kv_pool.size
    assert engine.runner.req_to_token_pool.available_size() == engine.runner.req_to_token_pool.size
