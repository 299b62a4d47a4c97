"""The run event log (runs/<id>/events.jsonl) and the timeline read from it: real files, a
real child process SIGKILLed while it appends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import events, timeline

APPENDER = """
import sys
from pathlib import Path
from orchestrator import events
run_dir = Path(sys.argv[1])
n = 0
while True:
    events.append(run_dir, events.EPOCH, epoch=n, phase="training", reason="x" * (n % 300))
    n += 1
    if n == 50:
        print("going", flush=True)
"""


def _lines(run_dir: Path) -> list[bytes]:
    return (run_dir / events.EVENTS_FILE).read_bytes().split(b"\n")


def test_events_are_appended_and_read_back_in_order(tmp_path):
    events.append(tmp_path, events.STARTED, box="b1", nodes=1, model="scratch")
    events.append(tmp_path, events.EPOCH, epoch=1, phase="training", val_accuracy=0.5)
    events.append(tmp_path, events.LOST, 1, box="b2", reason="spot\n\x1b[2Jreclaimed",
                  cost_usd=float("nan"))
    found = events.read(tmp_path)
    assert [(e.kind, e.node) for e in found] == [("started", None), ("epoch", None),
                                                 ("box-lost", 1)]
    assert found[0].details == {"box": "b1", "nodes": 1, "model": "scratch"}
    assert found[2].details["cost_usd"] is None  # not a number: not written as one
    assert b"\x1b" not in (tmp_path / events.EVENTS_FILE).read_bytes()  # escaped in JSON
    assert found[2].details["reason"] == "spot\n\x1b[2Jreclaimed"
    with pytest.raises(ValueError, match="unknown event kind"):
        events.append(tmp_path, "exploded")


def test_a_torn_last_line_is_skipped_and_the_next_event_starts_a_line_of_its_own(tmp_path):
    events.append(tmp_path, events.STARTED, box="b1")
    with open(tmp_path / events.EVENTS_FILE, "ab") as f:
        f.write(b'{"at":"2026-12-07T10:00:00+00:00","kind":"epo')  # a writer killed mid-line
    assert [e.kind for e in events.read(tmp_path)] == ["started"]
    events.append(tmp_path, events.DETACHED)
    assert [e.kind for e in events.read(tmp_path)] == ["started", "detached"]
    assert _lines(tmp_path)[1].endswith(b'"kind":"epo')  # kept as it was, on its own line


def test_a_sigkilled_writer_leaves_only_whole_events(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "going\n"
        time.sleep(0.05)  # the kill lands at some point of a stream of appends
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lines = _lines(tmp_path)
    assert lines[-1] == b"" and len(lines) > 50  # ends with a newline: no torn line
    written = [json.loads(line) for line in lines[:-1]]
    assert [w["epoch"] for w in written] == list(range(len(written)))
    events.append(tmp_path, events.ATTACHED)
    assert [e.kind for e in events.read(tmp_path)][-1] == "attached"


def test_a_detail_too_long_is_cut_and_an_event_stays_one_bounded_line(tmp_path):
    events.append(tmp_path, events.LOST, box="b", reason="r" * 100_000,
                  boxes=[f"box-{k}" * 40 for k in range(64)])
    [line, end] = _lines(tmp_path)
    assert end == b"" and len(line) < events.MAX_EVENT_BYTES
    [event] = events.read(tmp_path)
    assert event.kind == "box-lost"


def test_a_log_that_is_not_there_or_not_json_reads_as_no_events(tmp_path):
    assert events.read(tmp_path / "nowhere") == []
    (tmp_path / events.EVENTS_FILE).write_bytes(b"\xff\xfe\n[1, 2]\n{\"kind\": \"done\"}\n"
                                                + b"[" * 100_000 + b"\n")  # past json's depth
    assert events.read(tmp_path) == []


def _event(kind: str, at: str, node: int | None = None, **details) -> events.Event:
    return events.Event(at=f"2026-12-07T{at}+00:00", kind=kind, node=node, details=details)


def test_the_timeline_has_a_stretch_per_box_with_its_epochs_ending_and_cost():
    log = [_event("started", "10:00:00", box="b1", nodes=1),
           _event("epoch", "10:01:00", epoch=1), _event("epoch", "10:02:00", epoch=2),
           _event("detached", "10:02:30"), _event("attached", "10:02:40"),
           _event("notice", "10:02:50", action="terminate"),
           _event("box-lost", "10:03:00", box="b1", reason="spot reclaimed", cost_usd=0.25),
           _event("interrupted", "10:03:01"),
           _event("replaced", "10:04:00", box="b2", was="b1"),
           _event("resumed", "10:05:00", box="b2", epochs=2),
           _event("epoch", "10:06:00", epoch=3), _event("pulled", "10:06:30"),
           _event("done", "10:07:00")]
    first, second = timeline.stretches(log, usd_per_hour=1.2)
    assert (first.boxes, first.epochs, first.ending, first.cost_usd, first.notices) == (
        ["b1"], [1, 2], "lost b1: spot reclaimed", 0.25, 1)
    assert first.ended_at == "2026-12-07T10:03:00+00:00"
    assert (second.boxes, second.replaced, second.epochs, second.ending) == (
        ["b2"], ["b2"], [3], "done")
    assert second.cost_usd == pytest.approx(1.2 * 120 / 3600)
    assert timeline.boxes_lost(log) == 1 and timeline.last_epoch(log) == 3
    assert events.epochs_seen(log) == {(None, 3)}  # since the resume only


def test_a_cluster_stretch_names_every_node_and_adds_up_the_losses():
    log = [_event("started", "10:00:00", box="n0", nodes=2, boxes=["n0", "n1"]),
           _event("box-lost", "10:01:00", 1, box="n1", reason="gone", cost_usd=0.5),
           _event("box-lost", "10:01:00", 0, box="n0", reason="gone too", cost_usd=0.0)]
    [only] = timeline.stretches(log)
    assert only.boxes == ["n0", "n1"] and only.cost_usd == 0.5
    assert only.ending == "lost n1: gone; lost n0: gone too"
    assert only.seconds == 60


def test_a_run_ends_once_per_stretch_whoever_else_saw_it_end(tmp_path):
    log = [_event("started", "10:00:00"), _event("cancelled", "10:01:00")]
    assert events.has_ended(log)
    assert not events.has_ended([*log, _event("resumed", "10:02:00")])
    assert not events.has_ended(log[:1])


@pytest.mark.parametrize("left", [{}, {"exit_code": "0\n"}], ids=["starting", "ended"])
def test_a_cancel_that_signals_nothing_logs_no_end(tmp_path, left):
    """`dlbox cancel` logs the run's end as its signal leaves, and only then: a run not yet
    started (or ended already) is refused, and its real end is still logged later."""
    from orchestrator import runs
    from orchestrator.errors import UsageError
    from orchestrator.localmachine import LocalMachine

    folder = tmp_path / "box" / "runs" / "r"
    folder.mkdir(parents=True)
    for name, text in left.items():
        (folder / name).write_text(text)
    run = runs.Run(run_id="r", model="scratch", box="local", remote_dir=str(folder), args=[],
                   started_at=runs.now())
    signalled = []
    with pytest.raises(UsageError, match=r"not running|not started"):
        runs.cancel(run, LocalMachine(), print, on_signalled=lambda: signalled.append(1))
    assert signalled == []


def test_a_second_follower_logs_no_epoch_or_notice_twice(tmp_path):
    """Two dlbox following one run (`train` and `attach`), each with its own recorder."""
    from orchestrator import runs

    runs.note(tmp_path, "r", events.STARTED, box="b")
    first, second = runs.recorder(tmp_path, "r"), runs.recorder(tmp_path, "r")
    for record in (first, second):
        record(events.EPOCH, epoch=1, phase="training")
        record(events.NOTICE, action="terminate")
    runs.note(tmp_path, "r", events.RESUMED, box="b2")
    second(events.EPOCH, epoch=1, phase="training")  # redone on the new box: a new stretch
    kinds = [e.kind for e in events.read(tmp_path / runs.RUNS_DIR / "r")]
    assert kinds == ["started", "epoch", "notice", "resumed", "epoch"]
