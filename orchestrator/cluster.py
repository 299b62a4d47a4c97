"""Runs on a cluster: the workers of the other nodes watched, stopped, their logs pulled and
let go together (launch.py starts every run; recovery.py resumes every run).

The chief (node 0) is the run as a single box has it: its folder holds the outputs, its
status is followed, its results pulled. The other nodes only train; each keeps its own log.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import follow, runs
from .atomic import write_atomic
from .boxkind import Box
from .errors import DlboxError
from .launch import NODE_ANSWER_TIMEOUT_S, one_line, stop, workers
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
                 code: int | None = None) -> None:
        super().__init__(one_line(f"node {node} ({label}) {why}"))
        self.node, self.label, self.why, self.resumable = node, label, why, resumable
        self.code = code  # its worker's exit status, if it ended with one


def state_command(remote_dir: str) -> str:
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
            done = machines[w.node].run(state_command(w.remote_dir),
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
                done = machines[w.node].run(state_command(w.remote_dir),
                                            timeout=NODE_ANSWER_TIMEOUT_S)
                states.append(done.stdout.split()[:1])
            except DlboxError:
                states.append(["gone"])
        if all(s and s[0] != "running" for s in states):
            return
        sleep(NODE_CHECK_S)
    stop(run, nodes, machines, only=[w.node for w in workers(run)[1:]])


def pull_logs(project_dir: Path, run: runs.Run, machines: list[Machine],
              only: list[int] | None = None) -> None:
    """Every other node's (or those listed) log and last status into runs/<id>/nodes/<k>/
    (what is there)."""
    for w in workers(run)[1:]:
        if only is not None and w.node not in only:
            continue
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
