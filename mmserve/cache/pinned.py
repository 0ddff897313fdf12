"""PinnedCache: the bookkeeping the engine's media caches share (the encoder-output cache and the cross-attention
slabs): entries by media hash in least-recently-used order, a lookup that counts hits and refreshes the order, and
pins counted per hash. A pinned entry is never evicted; what an unpin makes evictable is the subclass's to settle
(`_unpinned`)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from mmserve.multimodal.inputs import MultimodalItem

V = TypeVar("V")


def _as_they_are(items: list[MultimodalItem]) -> list[MultimodalItem]:
    return items


class PinnedCache(Generic[V]):
    def __init__(self) -> None:
        # Turns items as requests carry them into the encoder's inputs, for the misses only: the engine's image
        # processor where the API process sent decoded images (EngineImagePrep), else nothing to do
        self.prepare: Callable[[list[MultimodalItem]], list[Any]] = _as_they_are
        self._entries: OrderedDict[int, V] = OrderedDict()
        self._pins: Counter[int] = Counter()
        self.hits = 0  # lookups served
        self.stores = 0  # entries stored, i.e. encoder runs per item

    def get(self, key: int) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return value

    def pin(self, keys: Iterable[int]) -> None:
        self._pins.update(keys)

    def unpin(self, keys: Iterable[int]) -> None:
        """Undo one `pin` of each key."""
        keys = list(keys)
        self._pins.subtract(keys)
        self._pins = +self._pins  # drop the counts that reached zero
        self._unpinned(keys)

    def _unpinned(self, keys: list[int]) -> None:
        """After an unpin of `keys`: evict what is no longer held, as the subclass's budget says."""

    def pinned(self, key: int) -> bool:
        return self._pins[key] > 0

    def pin_count(self) -> int:
        """Pins held, over all keys (0 once every step and chunked prompt let go)."""
        return sum(self._pins.values())

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
