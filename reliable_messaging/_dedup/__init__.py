"""Dedup stores for idempotent consumers: the contract and three implementations.

==========================  =================================  ==========================================
store                       remembers across                   use when
==========================  =================================  ==========================================
:class:`MemoryDedupStore`   nothing: one process, while it      duplicates arrive while the consumer runs
                            runs (bounded LRU)
:class:`SQLiteDedupStore`   restarts; processes on one host     the embedded default: a file next to the
                            sharing the file                    consumer
:class:`RedisDedupStore`    restarts and hosts                  several consumer instances share a queue
                                                                or a consumer group
==========================  =================================  ==========================================

redis-py is imported only when a :class:`RedisDedupStore` is constructed.
"""

from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore
from ._memory import MemoryDedupStore
from ._redis import RedisDedupStore
from ._sqlite import SQLiteDedupStore

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "ClaimResult",
    "DedupStore",
    "MemoryDedupStore",
    "RedisDedupStore",
    "SQLiteDedupStore",
]
