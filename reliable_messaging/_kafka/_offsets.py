"""Which offsets a consumer may commit: per partition, only the contiguous processed prefix.

Kafka stores one committed offset per partition and group: "everything before
this offset is done". Committing offset ``n + 1`` after finishing message ``n``
while an earlier message ``m < n`` is still unfinished would tell the broker
that ``m`` is done: a crash then skips it for good. So the tracker remembers
the offsets handed out per partition, in order, and advances the committable
position only across messages that are finished.

Offsets are not contiguous numbers in a Kafka log (compaction, transaction
markers), so the prefix is over *received* offsets, not over ``n, n + 1, ...``.

Thread-confined: the consumer thread owns it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["OffsetTracker", "TopicPartitionKey"]

TopicPartitionKey = tuple[str, int]


class _Partition:
    __slots__ = ("committed", "done", "pending", "position")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # received, not yet in the processed prefix, in order
        self.done: set[int] = set()  # finished out of order, waiting for earlier ones
        self.position: int | None = None  # next offset to commit: last offset of the prefix + 1
        self.committed: int | None = None  # last position a commit succeeded for


class OffsetTracker:
    """Received and processed offsets per partition; the positions safe to commit."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _Partition] = {}

    def received(self, tp: TopicPartitionKey, offset: int) -> None:
        """The consumer handed out ``offset`` of ``tp``; it must finish before later ones count."""
        part = self._partitions.get(tp)
        if part is None:
            part = self._partitions[tp] = _Partition()
        part.pending.append(offset)

    def processed(self, tp: TopicPartitionKey, offset: int) -> None:
        """``offset`` of ``tp`` is finished (handled, retried elsewhere or dead-lettered)."""
        part = self._partitions.get(tp)
        if part is None or not part.pending:
            return  # revoked meanwhile, or already rewound: nothing to advance
        pending = part.pending
        if pending[0] == offset:  # the common, in-order case
            pending.popleft()
            position = offset + 1
            done = part.done
            while done and pending and pending[0] in done:
                head = pending.popleft()
                done.discard(head)
                position = head + 1
            part.position = position
        elif pending[0] < offset <= pending[-1]:  # finished out of order (not one rewound: it is read again)
            part.done.add(offset)

    def rewind(self, tp: TopicPartitionKey, offset: int) -> None:
        """Forget ``offset`` and everything after it in ``tp``: the consumer will read them again."""
        part = self._partitions.get(tp)
        if part is None:
            return
        while part.pending and part.pending[-1] >= offset:
            part.pending.pop()
        part.done = {o for o in part.done if o < offset}

    def highest_done(self, tp: TopicPartitionKey) -> int | None:
        """The highest offset of ``tp`` finished out of order (waiting for earlier ones), if any."""
        part = self._partitions.get(tp)
        return max(part.done) if part is not None and part.done else None

    def position(self, tp: TopicPartitionKey) -> int | None:
        """The offset to commit for ``tp`` (next to read), or None if nothing was processed."""
        part = self._partitions.get(tp)
        return None if part is None else part.position

    def unhandled(self, tps: Iterable[TopicPartitionKey] | None = None) -> dict[TopicPartitionKey, int]:
        """The first offset received and not yet processed, per partition that has one."""
        keys = self._partitions.keys() if tps is None else [tp for tp in tps if tp in self._partitions]
        return {tp: self._partitions[tp].pending[0] for tp in keys if self._partitions[tp].pending}

    def uncommitted(self, tps: Iterable[TopicPartitionKey] | None = None) -> dict[TopicPartitionKey, int]:
        """Positions that moved since their last successful commit."""
        keys = self._partitions.keys() if tps is None else [tp for tp in tps if tp in self._partitions]
        out: dict[TopicPartitionKey, int] = {}
        for tp in keys:
            part = self._partitions[tp]
            if part.position is not None and part.position != part.committed:
                out[tp] = part.position
        return out

    def committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        """A commit of ``positions`` succeeded."""
        for tp, position in positions.items():
            part = self._partitions.get(tp)
            if part is not None and (part.committed is None or position > part.committed):
                part.committed = position

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Drop partitions that were revoked or lost."""
        for tp in tps:
            self._partitions.pop(tp, None)

    def partitions(self) -> list[TopicPartitionKey]:
        return list(self._partitions)
