"""The done journal: a file per store instance where a done record is safe the moment it is written.

A SQLite commit costs 20-50 microseconds, more than a consumer spends on a message; committing
done records in groups is cheap but leaves the records of a group unwritten if the process dies
before the group commit, and every one of those messages then runs again (a whole fetched batch,
measured). The journal closes that window: :meth:`DoneJournal.append` is one ``write(2)`` of the
key to a file opened with ``O_APPEND`` (about 2 microseconds). Once it returned, the kernel holds
the bytes: a process crash (SIGKILL, OOM kill, a segfault) loses nothing, a power loss can
(``fsync=True`` closes that too, at a disk flush per record). The store's writer thread copies
journaled records into the database in group commits; whoever finds a dead instance's journal
(see :mod:`._process`) replays it into the database before taking over that instance's claims.

Layout: ``<directory>/<instance>.<sequence>.done``, one key per line (a key holding a newline,
a backslash or starting with a double quote is written as a JSON string). The writer rotates to
a new segment now and then and deletes a segment once every key in it is in the database, so
the journal holds seconds of records, not days.

Why by hand: this is a write-ahead log of one record type with one reader (recovery), and the
only libraries that offer it are databases whose commits are what costs too much here.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

__all__ = ["DoneJournal", "journal_segments", "read_segment"]

_SUFFIX = ".done"

SEGMENT_BYTES = 1 << 20
"""Bytes of a segment (about 25,000 uuid-sized keys); the writer starts a new one when it is nearly full."""

_ROOM = 64 * 1024
"""Bytes left in a segment when the writer rotates: room for the records appended until it does."""


def _line(key: str) -> bytes:
    if "\n" in key or "\\" in key or key[:1] == '"' or "\0" in key:
        return (json.dumps(key) + "\n").encode("utf-8")
    return (key + "\n").encode("utf-8")


def read_segment(path: Path) -> list[str]:
    """The keys in a segment. A last line without its newline (the write never completed) is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    keys: list[str] = []
    lines = data.rstrip(b"\0").split(b"\n")
    for raw in lines[:-1]:  # the piece after the last newline is incomplete (or empty)
        if not raw:
            continue
        text = raw.decode("utf-8", "replace")
        if text.startswith('"'):
            try:
                text = json.loads(text)
            except ValueError:
                continue
        keys.append(text)
    return keys


def journal_segments(directory: Path) -> dict[str, list[Path]]:
    """Every segment in ``directory``, by instance id, oldest first."""
    found: dict[str, list[tuple[int, Path]]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    for entry in entries:
        name = entry.name
        if not name.endswith(_SUFFIX):
            continue
        instance, _, sequence = name[: -len(_SUFFIX)].partition(".")
        if not sequence.isdigit():
            continue
        found.setdefault(instance, []).append((int(sequence), Path(entry.path)))
    return {instance: [path for _seq, path in sorted(paths)] for instance, paths in found.items()}


class DoneJournal:
    """This instance's journal segments. Not thread-safe: the store calls it under its lock.

    A segment is a file of :data:`SEGMENT_BYTES`, allocated up front (``posix_fallocate``) and
    mapped into memory (``MAP_SHARED``): appending a record copies its bytes into the mapping — no
    system call, so the consumer thread keeps the GIL — and the kernel owns those pages from that
    moment, so they reach the file even if the process is killed the next instant. Where the file
    system cannot allocate up front, records are appended with ``write(2)`` instead (about 2 µs).
    """

    def __init__(self, directory: Path, instance: str, *, fsync: bool = False) -> None:
        self.directory = directory
        self.instance = instance
        self.fsync = fsync
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sequence = 0
        self._fd = -1
        self._map: mmap.mmap | None = None
        self.size = 0
        self.path = self._open_next()

    def _open_next(self) -> Path:
        self._sequence += 1
        path = self.directory / f"{self.instance}.{self._sequence}{_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fd, self._map, self.size = fd, None, 0
        try:
            os.posix_fallocate(fd, 0, SEGMENT_BYTES)
            self._map = mmap.mmap(fd, SEGMENT_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, AttributeError, ValueError):  # no fallocate here: plain appends
            os.ftruncate(fd, 0)
        if self.fsync:
            _fsync_directory(self.directory)
        return path

    @property
    def full(self) -> bool:
        return self.size >= SEGMENT_BYTES - _ROOM

    def append(self, key: str) -> None:
        """Write ``key``'s line; raises OSError (disk full, I/O error) if it could not be written whole."""
        line = _line(key)
        size = len(line)
        mapped = self._map
        if mapped is not None and self.size + size <= SEGMENT_BYTES:
            start = self.size
            mapped[start:start + size] = line
            self.size = start + size
            if self.fsync:
                mapped.flush()
            return
        if mapped is not None:  # this segment is full (the writer rotates soon): the rest as plain writes
            self._unmap()
        written = os.write(self._fd, line)
        if written != size:  # a short write to a regular file: the disk is full
            raise OSError(f"short write to the done journal {self.path} ({written} of {size} bytes)")
        if self.fsync:
            os.fsync(self._fd)
        self.size += written

    def _unmap(self) -> None:
        """Stop mapping the current segment; later records are appended after what the mapping holds."""
        mapped, self._map = self._map, None
        if mapped is not None:
            mapped.close()
            os.ftruncate(self._fd, self.size)  # O_APPEND writes go after the mapped records

    def rotate(self) -> Path:
        """Start a new segment; returns the previous one (delete it once its keys are in the database)."""
        old = self.path
        self.close()
        self.path = self._open_next()
        return old

    def close(self) -> Path | None:
        """Close the current segment; returns its path (None if already closed)."""
        if self._fd < 0:
            return None
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)
        self._fd = -1
        return self.path


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
