"""Only the contiguous processed prefix of a partition is ever offered for commit."""

from __future__ import annotations

from reliable_messaging._kafka._offsets import OffsetTracker

TP = ("t", 0)
OTHER = ("t", 1)


def test_in_order_processing_advances_the_position() -> None:
    tracker = OffsetTracker()
    assert tracker.position(TP) is None
    for offset in (10, 11, 12):
        tracker.received(TP, offset)
    tracker.processed(TP, 10)
    assert tracker.position(TP) == 11
    tracker.processed(TP, 11)
    assert tracker.uncommitted() == {TP: 12}


def test_out_of_order_completion_never_skips_an_unfinished_record() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.received(TP, offset)
    tracker.processed(TP, 1)
    tracker.processed(TP, 2)
    assert tracker.position(TP) is None, "0 is unfinished: nothing may be committed"
    tracker.processed(TP, 0)
    assert tracker.position(TP) == 3, "0, 1, 2 form the prefix now"
    tracker.processed(TP, 4)
    assert tracker.position(TP) == 3, "3 is unfinished"
    tracker.processed(TP, 3)
    assert tracker.position(TP) == 5


def test_gaps_in_offsets_are_followed() -> None:
    tracker = OffsetTracker()
    for offset in (3, 7, 20):  # compaction / transaction markers leave gaps
        tracker.received(TP, offset)
    tracker.processed(TP, 7)
    assert tracker.position(TP) is None
    tracker.processed(TP, 3)
    assert tracker.position(TP) == 8
    tracker.processed(TP, 20)
    assert tracker.position(TP) == 21


def test_rewind_forgets_everything_from_the_offset_on() -> None:
    tracker = OffsetTracker()
    for offset in range(6):
        tracker.received(TP, offset)
    tracker.processed(TP, 0)
    tracker.processed(TP, 4)  # finished early, but 2 is rewound below: 4 is read again
    tracker.rewind(TP, 2)
    tracker.processed(TP, 1)
    assert tracker.position(TP) == 2
    # Re-read after the rewind.
    for offset in range(2, 6):
        tracker.received(TP, offset)
    tracker.processed(TP, 2)
    tracker.processed(TP, 3)
    assert tracker.position(TP) == 4, "4's earlier completion was forgotten by the rewind"
    tracker.processed(TP, 4)
    assert tracker.position(TP) == 5


def test_uncommitted_reports_only_moved_positions_per_partition() -> None:
    tracker = OffsetTracker()
    tracker.received(TP, 0)
    tracker.received(OTHER, 100)
    tracker.processed(TP, 0)
    tracker.processed(OTHER, 100)
    assert tracker.uncommitted() == {TP: 1, OTHER: 101}
    assert tracker.uncommitted([OTHER, ("missing", 0)]) == {OTHER: 101}
    tracker.committed({TP: 1})
    assert tracker.uncommitted() == {OTHER: 101}
    tracker.committed({OTHER: 50})  # an older commit acknowledged late does not move it back
    tracker.committed({OTHER: 101})
    tracker.committed({OTHER: 90})
    assert tracker.uncommitted() == {}


def test_forget_drops_revoked_partitions() -> None:
    tracker = OffsetTracker()
    tracker.received(TP, 0)
    tracker.processed(TP, 0)
    tracker.forget([TP])
    assert tracker.position(TP) is None
    assert tracker.uncommitted() == {}
    tracker.processed(TP, 1)  # a late completion for a revoked partition is ignored
    assert tracker.partitions() == []


def test_unhandled_is_the_first_received_offset_not_processed() -> None:
    """CommitMode.BEFORE commits back to it on close: the records after it were committed but never handled."""
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.received(TP, offset)
    tracker.received(OTHER, 3)
    tracker.processed(OTHER, 3)
    assert tracker.unhandled() == {TP: 10}, "OTHER has nothing left: no commit for it"
    tracker.processed(TP, 10)
    tracker.processed(TP, 12)  # out of order: 11 is still not handled
    assert tracker.unhandled() == {TP: 11}
    assert tracker.unhandled([OTHER]) == {}
    for offset in (11, 13, 14):
        tracker.processed(TP, offset)
    assert tracker.unhandled() == {}
