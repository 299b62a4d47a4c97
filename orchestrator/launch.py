"""Starting a run's workers on its boxes: one launcher for a single box and for a cluster.

A single box is a cluster of one node: its run records one worker, and is started, resumed
and stopped by the same steps as a cluster's. Several nodes each get a TF_CONFIG naming a
free port on every node; one node needs none.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from infra.errors import InfraError  # no AWS library behind it: cheap to import
from trainer.cluster import TF_CONFIG_ENV, tf_config  # no TensorFlow behind it

from . import events, parallel, records, runs, signals
from .boxkind import Box
from .errors import CommandTimedOut, DlboxError, LostContact, UsageError
from .humanize import Say
from .machine import Machine

# Asks the box's Python for a free TCP port: the worker's collective endpoint binds it.
FREE_PORT = ("import socket, sys; s = socket.socket(socket.AF_INET6 if sys.argv[1] == '6' "
             "else socket.AF_INET); s.bind(('', 0)); print(s.getsockname()[1])")
PORT_TRIES = 5  # probes of a node that answered a port another node of its host got
# SIGTERM -> checkpoint -> exit, then SIGKILL: a worker blocked in a collective whose peer
# died never gets to its signal handler, so the wait is short.
STOP_GRACE_S = 10
STOP_POLL_S = 0.2
NODE_ANSWER_TIMEOUT_S = 30  # a node silent this long has failed the run
EXIT_NOT_STARTED = 1  # a run whose workers could not all be started
MESSAGE_CHARS = 400  # of a node's failure line (remote stderr can run to pages)


@dataclass(frozen=True)
class Worker:
    """One node's part of a run, as run.json records it."""

    node: int
    box: str
    remote_dir: str
    address: str  # host:port its collective endpoint listens on ("" on a single box)
    code: str  # the trainer's code on that node
    data: str
    test: str | None


def one_line(text: str) -> str:
    """Remote text (stderr, a log's last line) as one printable line of bounded length."""
    line = "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 1] + "…"


def workers(run: runs.Run) -> list[Worker]:
    """The run's workers, chief first (a single box's run recorded by an older dlbox: its
    one node, where its code and data are not known)."""
    if not run.nodes:
        return [Worker(0, run.box, run.remote_dir, "", "", "", None)]
    try:
        return [records.build(Worker, w) for w in run.nodes]
    except ValueError as exc:
        raise UsageError(f"runs/{run.run_id}/{runs.RUN_FILE}: its nodes are damaged ({exc})") \
            from exc


def hourly(nodes: list[Box]) -> float | None:
    """What the boxes cost together per hour (None: one of them has no price)."""
    prices = [b.hourly_usd for b in nodes]
    return None if any(p is None for p in prices) else sum(prices)


def start(project_dir: Path, nodes: list[Box], machines: list[Machine], model: str, data: str,
          test: str | None, trainer_args: list[str], say: Say,
          progress: Callable[[int, int], None] | None = None,
          pip_args: tuple[str, ...] = ()) -> runs.Run:
    """Ship code and data to every node at once, start a worker on each; return the run."""
    runs.check_trainer_args(trainer_args)

    def ship(k: int) -> runs.Shipped:
        tell = say if k == 0 else (lambda line: say(f"node {k}: {line}"))
        return runs.ship(nodes[k], machines[k], data, test, tell, progress if k == 0 else None,
                         pip_args)

    shipped = parallel.each(ship, range(len(nodes)))
    run_id, chief_dir = runs.reserve_on_box(project_dir, machines[0], nodes[0].workdir, model)
    dirs = [chief_dir] + [runs.reserve_folder(machines[k], nodes[k].workdir, run_id)
                          for k in range(1, len(nodes))]
    run = runs.Run(run_id=run_id, model=model, box=nodes[0].name, remote_dir=chief_dir, args=[],
                   started_at=runs.now(), usd_per_hour=hourly(nodes), data=data, test=test,
                   trainer_args=tuple(trainer_args), rented=nodes[0].rented)
    team = [Worker(k, box.name, dirs[k], "", shipped[k].code, shipped[k].data, shipped[k].test)
            for k, box in enumerate(nodes)]
    run = launch(project_dir, run, nodes, machines, team, say, events.STARTED,
                 {"nodes": len(nodes), "boxes": [b.name for b in nodes], "model": model})
    where = nodes[0].label if len(nodes) == 1 else \
        f"{len(nodes)} nodes ({', '.join(b.label for b in nodes)})"
    say(f"run {run_id} started on {where}")
    return run


def _endpoints(nodes: list[Box], machines: list[Machine]) -> list[str]:
    """Each node's collective endpoint, all different (one at a time: nodes on one host must
    differ in port)."""
    addresses: list[str] = []
    for k, box in enumerate(nodes):
        for _ in range(PORT_TRIES):
            address = _endpoint(box, machines[k])
            if address not in addresses:
                break
        else:
            raise DlboxError(f"{box.label}: no free port that no other node took; try again")
        addresses.append(address)
    return addresses


def _endpoint(box: Box, machine: Machine) -> str:
    """host:port for the node's collective endpoint: a port free on it now."""
    host = box.address or "127.0.0.1"
    family = "6" if ":" in host else "4"
    done = machine.run(f"{shlex.quote(box.python)} -c {shlex.quote(FREE_PORT)} {family}")
    port = done.stdout.strip()
    if done.exit_code != 0 or not port.isdigit():
        raise DlboxError(f"{box.label}: could not find a free port for the workers to talk "
                         f"on ({one_line(done.stderr or done.stdout)})")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def launch(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine],
           team: list[Worker], say: Say, how: str = events.STARTED,
           details: dict[str, Any] | None = None) -> runs.Run:
    """Write each node's run.sh (with a TF_CONFIG when there are several), record the run
    with its workers, hold its results on every node and start every worker; log how it
    went (how: events.STARTED or RESUMED, with details) once all go. Ctrl-C once every
    worker was started leaves the run going; Ctrl-C or anything else before that stops the
    workers that were started and records the run failed, or, for a resume, interrupted
    again. The exception carries the run as recorded (.run)."""
    many = len(team) > 1
    addresses = _endpoints(nodes, machines) if many else [""]
    team = [replace(w, address=addresses[w.node]) for w in team]
    for w, box in zip(team, nodes, strict=True):
        shipped = runs.Shipped(w.code, w.data, w.test)
        args = runs.trainer_args(box, run, shipped, w.remote_dir)
        runs.write_script(box, machines[w.node], run.run_id, w.remote_dir, w.code, args,
                          env={TF_CONFIG_ENV: tf_config(addresses, w.node)} if many else None)
        if w.node == 0:
            run = replace(run, args=args)
    run = replace(run, nodes=tuple(asdict(w) for w in team))
    runs.save(project_dir, run)
    begun = 0  # workers whose start is done (a Ctrl-C waits for the one in progress)
    try:
        runs.hold(project_dir, list(zip(nodes, machines, strict=True)), run.run_id, say)
        for w, box in zip(team, nodes, strict=True):
            try:
                runs.start_script(box, machines[w.node], w.remote_dir)
            except KeyboardInterrupt:
                begun += 1  # it came during this start, and was acted on once it was done
                raise
            begun += 1
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and begun == len(team):
            exc.run = run  # every worker goes: the run goes on, and the caller can say which
            runs.note(project_dir, run.run_id, how, box=nodes[0].name, **(details or {}))
            raise
        # No worker waits for a missing peer, and no record says a run goes that does not;
        # nothing of it need be kept on the boxes. A node that stopped answering is left be.
        silent = isinstance(exc, CommandTimedOut | LostContact)
        tried = begun + (begun < len(team) and not silent)
        with signals.deferred():
            stop(run, nodes, machines, only=list(range(tried)))
            if not silent:
                _release(project_dir, run, nodes, machines)
            if how == events.RESUMED:  # it waits again, as before this resume: attach tries
                left = replace(run, status="interrupted", finished_at=runs.now())
                runs.save(project_dir, left)
            else:
                left = replace(run, status="failed", exit_code=EXIT_NOT_STARTED,
                               finished_at=runs.now())
                runs.save(project_dir, left)
                runs.ended(project_dir, left, "failed")
        exc.run = left  # recorded as not going on
        raise
    runs.note(project_dir, run.run_id, how, box=nodes[0].name, **(details or {}))
    return run


def _release(project_dir: Path, run: runs.Run, nodes: list[Box], machines: list[Machine]) -> None:
    """A run that did not start holds no results: every box may end on its own again."""
    for box, machine in zip(nodes, machines, strict=True):
        with contextlib.suppress(DlboxError, InfraError):  # best effort: it said so already
            box.release_results(project_dir, machine, run.run_id)


def _stop_command(remote_dir: str) -> str:
    """SIGTERM the worker's process group, SIGKILL what is left of it after STOP_GRACE_S;
    once the group is gone, a worker killed so gets exit status 137 (run.sh, killed too,
    cannot write it)."""
    polls = int(STOP_GRACE_S / STOP_POLL_S)
    alive = runs.GROUP_ALIVE
    return (f"cd {shlex.quote(remote_dir)} 2>/dev/null || exit 0; {runs.READ_PID} "
            f'if [ -n "$pid" ] && {alive}; then kill -TERM -- "-$pid" 2>/dev/null; '
            f"for i in $(seq {polls}); do {alive} || break; sleep {STOP_POLL_S}; done; "
            f'if {alive}; then kill -KILL -- "-$pid" 2>/dev/null; '
            f"for i in $(seq {polls}); do {alive} || break; sleep {STOP_POLL_S}; done; fi; fi; "
            "[ -e exit_code ] || { echo 137 > exit_code.tmp && mv exit_code.tmp exit_code; }")


def stop(run: runs.Run, nodes: list[Box], machines: list[Machine],
         only: list[int] | None = None) -> None:
    """End the run's worker on every node (or those listed) that still answers, all at once."""
    team = workers(run)

    def end(k: int) -> None:
        with contextlib.suppress(DlboxError):  # a node that does not answer runs nothing we reach
            machines[k].run(_stop_command(team[k].remote_dir),
                            timeout=2 * STOP_GRACE_S + NODE_ANSWER_TIMEOUT_S)

    parallel.each(end, [k for k in range(len(team)) if only is None or k in only])
