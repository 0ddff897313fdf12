"""Starting helper processes with the `spawn` method from inside a user's program."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def blank_main() -> Iterator[None]:
    """Processes spawned inside see an empty `__main__` (the parent's is put back after). They need nothing but
    mmserve, and a user's script that makes an Engine without an `if __name__ == "__main__":` guard would otherwise
    run again in each of them, which is how `spawn` prepares a child."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
