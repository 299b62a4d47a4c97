"""Runs on a cluster: the workers of every node watched, stopped, resumed and let go together
(launch.py starts them, as it starts every run).

The chief (node 0) is the run as a single box has it: its folder holds the outputs, its
status is followed, its results pulled. The other nodes only train; each keeps its own log.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from infra.errors import InfraError  # no AWS library behind it: cheap to import

from . import boxlock, checkpoints, events, follow, runs
from .atomic import write_atomic
from .boxkind import Box, Gone
from .errors import DlboxError, RunInterrupted, UsageError
from .humanize import Say
from .launch import NODE_ANSWER_TIMEOUT_S, Worker, hourly, launch, one_line, stop, workers
from .machine import Machine

NODE_CHECK_S = 3.0  # how often the other nodes are asked whether their worker still runs
WORKER_START_TIMEOUT_S = 120  # from the first check until its run.sh has begun
WORKERS_END_TIMEOUT_S = 120  # after the chief ended: the others end with it
# A worker that stopped with a checkpoint (exit 75): every worker stops at the same step, so
# the chief ends by itself (its checkpoint written) within this; a stop before that would
# kill it mid-write.
AGREED_STOP_TIMEOUT_S = 60
NODE_FILES = ("train.log", "stdout.log", "status.json")  # pulled into runs/<id>/nodes/<k>/
NODES_DIR = "nodes"
NODE_FILE_BYTES = 64 << 20  # of each, at most (the end of a longer log)
# A worker's exit statuses that leave the run resumable: stopped (75), a peer lost (69),
# killed (137, 143).
RESUMABLE_EXITS = (runs.EXIT_RESUMABLE, runs.EXIT_PEER_LOST, 137, 143)


class NodeFailed(DlboxError):
    """A node's worker failed or its box stopped answering: the run cannot go on as is.
    resumable: the node was lost (killed, silent, stopped), not failed by its own error."""

    def __init__(self, node: int, label: str, why: str, resumable: bool = True,
                 code: int | None = None, box_gone: bool = False) -> None:
        super().__init__(one_line(f"node {node} ({label}) {why}"))
        self.node, self.label, self.why, self.resumable = node, label, why, resumable
        self.code = code  # its worker's exit status, if it ended with one
        self.box_gone = box_gone  # the node's box itself is gone (nothing to pull from it)


def _state_command(remote_dir: str) -> str:
    """Prints "ended CODE", "running", "starting", "gone" (killed: no exit status) or
    "missing" (no folder) for the node's worker (runs.LIFE)."""
    return (f"cd {shlex.quote(remote_dir)} 2>/dev/null || {{ echo missing; exit 0; }}; "
            f'{runs.LIFE} if [ $life = ended ]; then echo "ended $(head -c 16 exit_code)"; '
            'else echo $life; fi')


def check(run: runs.Run, nodes: list[Box], machines: list[Machine],
          since: dict[tuple[str, int], float] | None = None) -> NodeFailed | None:
    """The first node (other than the chief) whose worker failed, stopped, was killed, never
    started or whose box has not answered for NODE_ANSWER_TIMEOUT_S; None while they all
    run or ended well. since: when each node was first seen not answering or not started
    (kept across calls); without it, one miss is enough."""
    def late(what: str, node: int, bound_s: float) -> bool:
        if since is None:
            return True
        return time.monotonic() - since.setdefault((what, node), time.monotonic()) >= bound_s

    for w in workers(run)[1:]:
        box = nodes[w.node]
        try:
            done = machines[w.node].run(_state_command(w.remote_dir),
                                        timeout=NODE_ANSWER_TIMEOUT_S)
            answer = done.stdout.split() if done.exit_code == 0 else []
            why = str(done.stderr)
        except DlboxError as exc:
            answer, why = [], str(exc)
        if since is not None and answer:
            since.pop(("silent", w.node), None)
        if not answer:
            if late("silent", w.node, NODE_ANSWER_TIMEOUT_S):
                return NodeFailed(w.node, box.label, f"does not answer ({why.strip()})")
            continue
        if answer[0] == "missing":
            return NodeFailed(w.node, box.label, f"lost the run's folder {w.remote_dir}")
        if answer[0] == "gone":
            return NodeFailed(w.node, box.label, "lost its worker (killed: no exit status)")
        if answer[0] == "starting" and late("starting", w.node, WORKER_START_TIMEOUT_S):
            return NodeFailed(w.node, box.label, f"did not start its worker within "
                              f"{WORKER_START_TIMEOUT_S} s (see {w.remote_dir}/stdout.log)")
        if answer[0] == "ended" and answer[1:] != ["0"]:
            code = answer[1] if len(answer) > 1 else "?"
            status = int(code) if code.isdigit() else None
            if status == runs.EXIT_RESUMABLE and not late("stopped", w.node,
                                                          AGREED_STOP_TIMEOUT_S):
                continue
            if status in RESUMABLE_EXITS:
                return NodeFailed(w.node, box.label, f"stopped its worker (exit status {code})",
                                  code=status)
            last = follow.last_words(machines[w.node], replace(run, remote_dir=w.remote_dir))
            return NodeFailed(w.node, box.label, f"had its worker fail (exit status {code})"
                              + (f": {last}" if last else ""), resumable=False, code=status)
    return None


def watcher(run: runs.Run, nodes: list[Box], machines: list[Machine]) -> Callable[[], None]:
    """For follow: raises NodeFailed once a node other than the chief has failed."""

    since: dict[tuple[str, int], float] = {}

    def peers() -> None:
        failed = check(run, nodes, machines, since)
        if failed is not None:
            raise failed

    return peers


def signal_workers(run: runs.Run, machines: list[Machine]) -> None:
    """SIGTERM the trainer of every node but the chief (runs.cancel does the chief), found in
    its run's own process group."""
    for w in workers(run)[1:]:
        with contextlib.suppress(DlboxError):  # a node that does not answer: stopped below
            machines[w.node].run(runs.cancel_command(w.remote_dir))


def wait_for_workers(run: runs.Run, nodes: list[Box], machines: list[Machine],
                     sleep: Callable[[float], None]) -> None:
    """After the chief ended: wait (bounded) until every other worker has ended; end those
    that have not."""
    deadline = time.monotonic() + WORKERS_END_TIMEOUT_S
    while time.monotonic() < deadline:
        states = []
        for w in workers(run)[1:]:
            try:
                done = machines[w.node].run(_state_command(w.remote_dir),
                                            timeout=NODE_ANSWER_TIMEOUT_S)
                states.append(done.stdout.split()[:1])
            except DlboxError:
                states.append(["gone"])
        if all(s and s[0] != "running" for s in states):
            return
        sleep(NODE_CHECK_S)
    stop(run, nodes, machines, only=[w.node for w in workers(run)[1:]])


def pull_logs(project_dir: Path, run: runs.Run, machines: list[Machine]) -> None:
    """Every other node's log and last status into runs/<id>/nodes/<k>/ (what is there)."""
    for w in workers(run)[1:]:
        here = project_dir / runs.RUNS_DIR / run.run_id / NODES_DIR / str(w.node)
        here.mkdir(parents=True, exist_ok=True)
        for name in NODE_FILES:
            try:  # a log past the bound: its end
                raw = machines[w.node].read(f"{w.remote_dir}/{name}", NODE_FILE_BYTES, tail=True)
            except DlboxError:
                break  # the node is gone: what was pulled before stays
            if raw is not None:
                write_atomic(here / name, raw)


def release(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine]) -> None:
    """The run's results are here: no node need keep them any more."""
    for w in workers(run)[1:]:
        with contextlib.suppress(DlboxError):  # a node that is gone holds nothing
            nodes[w.node].release_results(project_dir, machines[w.node], run.run_id)


def lost_nodes(project_dir: Path, nodes: list[Box], machines: list[Machine],
               run: runs.Run) -> list[tuple[int, Gone]]:
    """(node, why) for every node whose box is gone (terminated, reclaimed) or got an
    interruption notice (spot: it goes within two minutes); an owner that cannot be asked
    counts the box as there."""
    from . import spotwatch

    found = []
    for w in workers(run):
        box = nodes[w.node]
        try:
            why = box.gone(project_dir)
        except (DlboxError, InfraError):
            why = None
        if why is None and box.interruptible:
            with contextlib.suppress(DlboxError):
                notice = runs.read_json(machines[w.node].read(
                    f"{w.remote_dir}/{spotwatch.NOTICE_FILE}"))
                if isinstance(notice, dict):
                    why = Gone(f"EC2 interruption notice: {notice.get('action', '?')} at "
                               f"{notice.get('time', '?')}", reclaimed=True)
        if why is not None:
            found.append((w.node, why))
    return found


def record_losses(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
                  lost: list[tuple[int, Gone]]) -> runs.Run:
    """Each lost node recorded in the run's interruptions, as a single box's loss is: when,
    the epoch, why, work redone (from the chief's last heartbeat, if it still answers), and
    the cluster's cost until then (on the first one: every node billed). A loss recorded
    already (a second look at the same stopped run) is not recorded again."""
    from . import recovery
    from .errors import BoxLost

    waiting = {i["box"] for i in run.interruptions if i.get("downtime_s") is None}
    fresh = [(k, why) for k, why in lost if nodes[k].name not in waiting]
    if not fresh:
        return run
    status = {}
    with contextlib.suppress(DlboxError):  # the chief may be the one gone
        status = runs.read_json(machines[0].read(f"{run.remote_dir}/status.json")) or {}
    status = {k: v for k, v in status.items() if k in ("phase", "epoch", "step", "steps")
              and (k == "phase" or (isinstance(v, int) and not isinstance(v, bool)))}
    progress = follow.progress_of(status)
    for n, (k, why) in enumerate(fresh):
        loss = BoxLost(why.reason, status.get("epoch"), progress=progress,
                       reclaimed=why.reclaimed, ended_at=why.at)
        run = recovery.record_loss(project_dir, run, nodes[k], loss,
                                   usd_per_hour=(run.usd_per_hour or 0.0) if n == 0 else 0.0,
                                   node=k)
    return run


def replace_lost(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
                 lost: list[tuple[int, Gone]], say: Say,
                 pip_args: tuple[str, ...] = ()) -> runs.Run:
    """Each lost node made again (a box like it, its code and data synced, a folder for the
    run), in nodes and machines in place; the run records where its workers now are. Only
    a box its owner took back (spot) is replaced: one ended on purpose stops here."""
    team = workers(run)
    for k, why in lost:
        if not (why.reclaimed and nodes[k].replaceable):
            raise RunInterrupted(f"{nodes[k].label} has ended ({why.reason}) and is not "
                                 "replaced behind your back; `dlbox up` makes the cluster whole "
                                 f"again, then `dlbox attach {run.run_id}` resumes the run")
    for k, why in lost:
        say(f"{nodes[k].label} was lost ({why.reason}); replacing it")
        machines[k].close()
        was = nodes[k].name
        with boxlock.held(project_dir, say):
            nodes[k] = nodes[k].replacement(project_dir, say)
        runs.note(project_dir, run.run_id, events.REPLACED, k, box=nodes[k].name, was=was)
        machines[k] = nodes[k].machine(project_dir)
        shipped = runs.ship(nodes[k], machines[k], run.data or "", run.test, say, None, pip_args)
        remote = runs.reserve_folder(machines[k], nodes[k].workdir, run.run_id)
        team[k] = Worker(k, nodes[k].name, remote, "", shipped.code, shipped.data, shipped.test)
        if k == 0:
            run = replace(run, box=nodes[k].name, remote_dir=remote)
        run = replace(run, nodes=tuple(asdict(w) for w in team))
        runs.save(project_dir, run)  # each node as it is made: a cut-short replacement resumes
    return run


def resume(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
           say: Say) -> runs.Run:
    """Start a stopped cluster run again, from the chief's checkpoint (or the copy taken off
    it, for a new chief): every worker gets it (they must all resume from the same epoch)."""
    team = workers(run)
    if [w.box for w in team] != [b.name for b in nodes]:
        raise UsageError(f"run {run.run_id} ran on nodes {', '.join(w.box for w in team)}; "
                         "this project's cluster is not those any more, so it cannot resume")
    stop(run, nodes, machines)  # nothing of the run may still hold a port or a file
    for w in team:  # a node made again (or wiped) since: code, data and a folder first
        if machines[w.node].run(_state_command(w.remote_dir)).stdout.split()[:1] == ["missing"]:
            shipped = runs.ship(nodes[w.node], machines[w.node], run.data or "", run.test, say)
            remote = runs.reserve_folder(machines[w.node], nodes[w.node].workdir, run.run_id)
            team[w.node] = Worker(w.node, w.box, remote, "", shipped.code, shipped.data,
                                  shipped.test)
            if w.node == 0:
                run = replace(run, remote_dir=remote)
    copy = checkpoints.pull(project_dir, run, machines[0]) or \
        checkpoints.held(project_dir, run.run_id)
    for w in team:
        on_box = runs.read_json(machines[w.node].read(
            f"{w.remote_dir}/{checkpoints.REMOTE_DIR}/{checkpoints.STATE_FILE}"))
        if w.node == 0 and on_box is not None:
            continue  # the chief's own: what the copy was taken from
        machines[w.node].run(
            f"rm -rf -- {shlex.quote(f'{w.remote_dir}/{checkpoints.REMOTE_DIR}')}")
        if copy is not None:
            checkpoints.push(project_dir, run, machines[w.node], w.remote_dir, w.data)
    epoch = copy.completed if copy is not None else 0
    say(f"resuming run {run.run_id} on {len(nodes)} nodes from epoch {epoch}"
        + ("" if copy is not None else " (no checkpoint yet: from the start)"))
    run = replace(run, status="running", exit_code=None, finished_at=None)
    if any(i.get("downtime_s") is None for i in run.interruptions):  # back after a loss:
        now = datetime.now(timezone.utc)  # a new stretch begins, billed at today's nodes
        run = replace(run, segment_started_at=now.isoformat(timespec="seconds"),
                      usd_per_hour=hourly(nodes), interruptions=tuple(
                          i if i.get("downtime_s") is not None else {**i, "downtime_s": round(
                              (now - datetime.fromisoformat(i["at"])).total_seconds(), 1)}
                          for i in run.interruptions))
    # Same folders, same code and data, new endpoints (the old ports may be taken now).
    return launch(project_dir, run, nodes, machines, team, say, events.RESUMED,
                  {"nodes": len(nodes), "boxes": [b.name for b in nodes], "epochs": epoch})
