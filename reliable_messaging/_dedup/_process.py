"""Who owns a claim: a store instance in a process, and whether that process still lives.

A claim left by a consumer that crashed must not hold its message back until a lease runs out.
So every store instance registers an *owner* record naming its process — host, boot id, pid and
the pid's start time — and a claim is only as live as its owner:

- on the same host and boot, the kernel answers exactly: the pid is gone, a zombie, or now a
  different process (another start time) means the owner is dead (:func:`process_state`);
- on another host (a Redis store shared across hosts, or a SQLite file on a volume two
  containers share, each with its own pid namespace) nobody can look: the owner renews a
  heartbeat and is dead once it stops (the stores' ``liveness``).

Why by hand: no library answers "is the process that wrote this record still the one running" —
psutil compares pids and start times the same way but is a compiled dependency for three reads
of ``/proc``.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

__all__ = ["ProcessIdentity", "new_instance_id", "process_state", "this_process"]

INSTANCE_ID_LENGTH = 16
"""Characters of an instance id (hex): the prefix of every owner token, ``<instance>:<thread>``."""


def new_instance_id() -> str:
    return uuid.uuid4().hex[:INSTANCE_ID_LENGTH]


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, identified so that a later reader can tell whether it still runs."""

    host: str
    boot: str
    """The kernel's boot id ('' where unknown): a record from before a reboot names a dead process."""
    pid: int
    start: str
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat``; '' where unknown):
    a pid reused by another process has another start time."""


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id").strip()


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of ``pid`` from ``/proc/<pid>/stat``; None if there is no such process or no /proc."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its last ')'.
    fields = text.rpartition(")")[2].split()
    if len(fields) < 20:
        return None
    return fields[0], fields[19]  # field 3 (state) and field 22 (starttime)


_cached: tuple[int, ProcessIdentity] | None = None


def this_process() -> ProcessIdentity:
    """This process's identity (computed again after a fork)."""
    global _cached
    pid = os.getpid()
    if _cached is None or _cached[0] != pid:
        stat = _stat(pid)
        _cached = (pid, ProcessIdentity(host=socket.gethostname(), boot=_boot_id(), pid=pid,
                                        start=stat[1] if stat else ""))
    return _cached[1]


def process_state(owner: ProcessIdentity) -> bool | None:
    """True if ``owner`` still runs, False if it is dead, None if this host cannot tell (another host)."""
    me = this_process()
    if owner.host != me.host:
        return None
    if owner.boot and me.boot and owner.boot != me.boot:
        return False  # the machine rebooted since
    if owner.pid == me.pid:
        return owner.start == me.start if owner.start and me.start else True
    stat = _stat(owner.pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):  # exited, not yet reaped by its parent
            return False
        return not (owner.start and start != owner.start)
    if os.path.isdir("/proc/self"):
        return False  # /proc works and has no such pid
    try:  # no /proc (macOS): the pid alone
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
