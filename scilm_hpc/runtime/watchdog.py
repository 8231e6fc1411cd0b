"""Hung ranks: a heartbeat per rank and a watchdog that ends a job whose step is stuck.

A rank that hangs (a deadlocked collective, a peer lost with its node, a stuck
filesystem) would hold every other rank in its next all-reduce until the job's
time limit. Each training rank runs one ``Watchdog`` thread. The training loop
reports its progress (``beat``: the step just finished; ``phase``: evaluating,
saving, finishing; ``at_allreduce``: about to wait for the other ranks), which
costs two attribute writes; the thread rewrites the rank's heartbeat file
(``runtime.history``) every ``HEARTBEAT_S`` seconds and checks the clock.

When the step has not advanced for the limit, the rank

1. writes every thread's stack (``faulthandler``) to ``RUN_DIR/hangs/rank<N>-<time>.txt``,
2. appends a ``hung`` event (rank, step, phase, dump) to the run's history,
3. if it is the first rank to fire in this job (an ``O_EXCL`` marker file, which
   every other rank's watchdog also polls and then follows within a second): under
   Slurm requeues the job (``scontrol requeue``, counted against
   ``cluster.max_requeues``; the requeued job resumes from the last checkpoint),
   records the state ``requeued`` or ``hung``,
4. and ends the process with ``HANG_EXIT_CODE``. Locally the job then ends with that
   exit status and ``scilm resume`` continues from the last checkpoint.

The limit in the training phase is ``train.hang_timeout_s``, or (0, auto) 20 times
the median of five step times measured after three warm-up steps (the first one
unwatched, see below), at least ``AUTO_FLOOR_S``;
until it is measured, and while a rank evaluates, saves or exports, the limit is
the larger of that and ``cluster.collective_timeout_s`` (those phases legitimately
take many step times). Until a rank's first step has ended (its all-reduce waits for
ranks still loading or resuming), and outside training (start-up, compression between
recovery steps), nothing is watched: there the collectives' own timeout applies.

The training loop reaches the rank's watchdog through this module's functions
(``beat``, ``phase``, ``at_allreduce``), which do nothing where none is installed.

A lost rank (killed, OOM-killed, its node gone) ends the job the same way: the
survivors' next collective fails, ``on_exception`` asks ``runtime.lost`` whether a peer
vanished or failed on its own error, and for a vanished one the first survivor records
a ``rank_lost`` event per lost rank (its host, last heartbeat, the step and phase the
job was in), requeues under Slurm or says ``scilm resume`` locally, and every survivor
exits with ``HANG_EXIT_CODE``. A peer whose heartbeat stopped while this rank waits
(a node that vanished without closing its connections) is found by the watchdog
thread: ``PEER_SILENT_S`` without a new heartbeat, once this rank has itself made no
progress for that long.

Test hooks (tests only; both act on the last rank, and only in a job's first attempt,
so that a requeued job runs clean): ``SCILM_FAULT=hang_before_allreduce:N`` makes it
sleep for an hour just before its all-reduce of step N (the function
``_test_hang_before_allreduce``, so that the stack dump names it);
``SCILM_FAULT=kill_before_allreduce:N`` makes it SIGKILL itself there.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scilm_hpc.runtime.history import (
    append_event,
    fault_summary,
    heartbeats,
    job_id,
    read_events,
    write_heartbeat,
)
from scilm_hpc.runtime.lost import OWN_FAILURE, PEER_ERROR, broken_collective, find_lost
from scilm_hpc.runtime.preemption import requeue
from scilm_hpc.runtime.status import write_run_state

#: Exit status of a rank ended by its watchdog (and of ``scilm`` for a hung local job).
HANG_EXIT_CODE = 4
HANGS_DIR = "hangs"
HEARTBEAT_S = 5.0
AUTO_FLOOR_S = 120.0
AUTO_FACTOR = 20.0
WARMUP_STEPS = 2
MEASURED_STEPS = 5
WATCHED = ("train", "all-reduce")  # phases held to the step limit
PEER_SILENT_S = 30.0  # a peer's heartbeat older than this (6 missed beats) is lost
TEST_HOOKS = ("hang_before_allreduce", "kill_before_allreduce")


def _test_fault() -> tuple[str, int] | None:
    """The ``SCILM_FAULT`` test hook of this job attempt (first attempt only), or None."""
    point, _, step = os.environ.get("SCILM_FAULT", "").partition(":")
    if point not in TEST_HOOKS or not step.isdigit():
        return None
    return None if os.environ.get("SLURM_RESTART_COUNT", "0") != "0" else (point, int(step))


def _test_hang_before_allreduce(step: int) -> None:
    """Test hook (see the module docstring): hang this rank before its all-reduce."""
    print(f"test hook: sleeping before the all-reduce of step {step}", file=sys.stderr, flush=True)
    time.sleep(3600)


class Watchdog:
    """One rank's heartbeat and hang detector (see the module docstring).

    Args:
        run_dir: the run directory (heartbeat, dumps and events go there).
        rank: this rank.
        world: number of ranks (the test hook hangs the last one).
        hang_timeout_s: ``train.hang_timeout_s`` (0: auto).
        collective_timeout_s: ``cluster.collective_timeout_s``.
        max_requeues: ``cluster.max_requeues``.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world: int,
        hang_timeout_s: float,
        collective_timeout_s: float,
        max_requeues: int,
    ) -> None:
        self.run_dir, self.rank, self.world = Path(run_dir), rank, world
        self.hang_timeout_s = hang_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.max_requeues = max_requeues
        self.step, self.phase_name = 0, "start"
        self.since = time.monotonic()  # when the step (or phase) last changed
        self._train_beats = 0
        self._step_times: list[float] = []
        self._fault = _test_fault() if rank == world - 1 else None
        # every rank of one job (and one restart of it) shares this marker
        attempt = job_id() or os.environ.get("MASTER_PORT", "single")
        self.attempt = f"{attempt}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        self.marker = self.run_dir / HANGS_DIR / f".fired-{self.attempt}"
        self._fired = threading.Lock()
        self._peers_checked = 0.0
        self._phase_at_error: str | None = None
        self._allreduce_step: int | None = None  # the step whose all-reduce it waits in
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="scilm-watchdog", daemon=True)

    # --- what the training loop reports ------------------------------------------------

    def beat(self, step: int, phase: str = "train") -> None:
        """The rank finished ``step`` (or entered ``phase`` at ``step``)."""
        now = time.monotonic()
        if phase == "train" and self.phase_name in WATCHED and step == self.step + 1:
            self._train_beats += 1
            if self._train_beats > WARMUP_STEPS and len(self._step_times) < MEASURED_STEPS:
                self._step_times.append(now - self.since)
        self.step, self.phase_name, self.since = step, phase, now
        self._allreduce_step = None

    def at_allreduce(self, step: int) -> None:
        """The rank is about to wait for the others in step ``step``'s all-reduce."""
        if self._fault is not None and step == self._fault[1]:
            if self._fault[0] == "kill_before_allreduce":
                print(
                    f"test hook: SIGKILL before the all-reduce of step {step} at {time.time():.3f}",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)
            _test_hang_before_allreduce(step)
        if self.phase_name == "train":
            self.phase_name = "all-reduce"
        self._allreduce_step = step  # also in the unwatched first step (lost peers)

    # --- the limit ------------------------------------------------------------------------

    def step_limit(self) -> float | None:
        """Seconds a training step may take: explicit, measured (auto), or None (not yet)."""
        if self.hang_timeout_s > 0:
            return self.hang_timeout_s
        if len(self._step_times) < MEASURED_STEPS:
            return None
        return max(AUTO_FLOOR_S, AUTO_FACTOR * statistics.median(self._step_times))

    def limit(self) -> float | None:
        """Seconds without progress that count as a hang in the current phase (None: the
        phase is not watched)."""
        if self.phase_name in ("start", "idle"):
            return None
        step = self.step_limit()
        if self.phase_name in WATCHED and step is not None:
            return step
        return max(step or 0.0, float(self.collective_timeout_s))

    # --- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the rank is leaving normally); last heartbeat says so."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.phase_name = "ended"
        self._heartbeat()

    def _heartbeat(self, **extra: Any) -> None:
        try:
            write_heartbeat(
                self.run_dir,
                self.rank,
                {
                    "step": self.step,
                    "phase": self.phase_name,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "unix": round(time.time(), 3),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "step_limit_s": self.step_limit(),
                    "attempt": self.attempt,
                    **extra,
                },
            )
        except OSError:
            pass  # a full disk is reported by the writes that matter, not by this one

    def _watch(self) -> None:
        last_beat = 0.0
        while True:
            limit = self.limit()
            poll = 1.0 if limit is None else min(1.0, max(0.05, limit / 10))
            if self._stop.wait(poll):
                return
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                self._heartbeat()
                last_beat = now
            if limit is None:
                continue
            stalled = now - self.since
            if self.marker.exists():
                self.fire(f"another rank {self._marker_cause()}; ending with it")
            elif stalled > limit:
                self.fire(f"no progress for {stalled:.1f} s (limit {limit:.1f} s)")
            elif stalled > PEER_SILENT_S and self.world > 1:
                self._check_silent_peers(now)

    def _check_silent_peers(self, now: float) -> None:
        """While this rank waits, a peer whose heartbeat stopped is lost (its node
        vanished without closing its connections); checked once per heartbeat."""
        if now - self._peers_checked < HEARTBEAT_S:
            return
        self._peers_checked = now
        silent = [
            beat
            for beat in heartbeats(self.run_dir)
            if beat.get("attempt") == self.attempt
            and beat["rank"] != self.rank
            and beat.get("phase") not in ("ended", OWN_FAILURE, PEER_ERROR)
            and time.time() - float(beat.get("unix", time.time())) > PEER_SILENT_S
        ]
        if silent:
            self.lose(silent, f"no heartbeat for more than {PEER_SILENT_S:.0f} s")

    def _marker_lines(self) -> list[str]:
        try:
            return self.marker.read_text().strip().splitlines() or ["unknown rank"]
        except OSError:
            return ["unknown rank"]

    def _marker_text(self) -> str:
        return self._marker_lines()[0]

    def _marker_cause(self) -> str:
        """What the first rank to fire saw: ``hung (rank 1)`` or ``lost rank 1 (...)``."""
        lines = self._marker_lines()
        return lines[1] if len(lines) > 1 else f"hung ({lines[0]})"

    def peer_fired(self) -> bool:
        """Whether a rank of this job has been ended by its watchdog."""
        return self.marker.exists()

    # --- ending the rank -----------------------------------------------------------------

    def fire(self, cause: str) -> None:
        """Dump this rank's stacks, record the hang, requeue (first rank, Slurm) and exit."""
        if not self._fired.acquire(blocking=False):
            return
        if self._marker_lines()[1:2] and self._marker_lines()[1].startswith("lost"):
            # another rank found a lost peer: nothing hung here, no dump
            print(f"rank {self.rank}: {cause}", file=sys.stderr, flush=True)
            os._exit(HANG_EXIT_CODE)
        stalled = time.monotonic() - self.since
        phase = self.phase_name
        # the step it was working on: the next one while training, else the one it saves...
        step = self.step + 1 if phase in WATCHED else self.step
        dump = self.run_dir / HANGS_DIR / f"rank{self.rank}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            dump.parent.mkdir(parents=True, exist_ok=True)
            with dump.open("w") as fh:
                fh.write(
                    f"rank {self.rank} of {self.world} (pid {os.getpid()} on "
                    f"{socket.gethostname()}): step {step}, phase {phase}, {cause}\n\n"
                )
                fh.flush()
                faulthandler.dump_traceback(fh, all_threads=True)
        except OSError as exc:
            print(f"rank {self.rank}: could not write {dump}: {exc}", file=sys.stderr, flush=True)
        try:
            where = os.path.relpath(dump, self.run_dir)
            append_event(
                self.run_dir,
                "hung",
                rank=self.rank,
                step=step,
                phase=phase,
                stalled_s=round(stalled, 2),
                reason=cause,
                dump=where,
                attempt=self.attempt,
            )
            message = f"rank {self.rank} hung in {phase} at step {step}: {cause}; stacks in {dump}"
            if self._claim_marker():
                message += ": " + self._end_job(
                    "hung", message, step=step, rank=self.rank, phase=phase, dump=where
                )
            print(message, file=sys.stderr, flush=True)
        finally:
            os._exit(HANG_EXIT_CODE)

    def _end_job(self, state: str, message: str, **fields: Any) -> str:
        """First rank to fire: requeue (Slurm) and record the state. Returns what next."""
        requeued, why = False, f"continue with: scilm resume {self.run_dir}"
        if os.environ.get("SLURM_JOB_ID"):
            requeued, why = requeue(self.max_requeues)
        write_run_state(
            self.run_dir,
            "requeued" if requeued else state,
            event=requeued,  # the hang or loss itself is in the history already
            reason=f"{message}: {why}",
            **fields,
        )
        return why

    def lose(self, lost: list[dict[str, Any]], cause: str) -> None:
        """The ranks ``lost`` (their last heartbeats, ``runtime.lost``) are gone: record
        them (first survivor), requeue (Slurm) and exit like a hang."""
        if not self._fired.acquire(blocking=False):
            return
        phase = self._phase_at_error or self.phase_name
        step = self.step + 1 if phase in WATCHED else self.step
        if self._allreduce_step is not None:
            step, phase = self._allreduce_step, "all-reduce"
        names = ", ".join(
            f"rank {b['rank']}" + (f" ({b['host']})" if b.get("host") else "") for b in lost
        )
        message = f"lost {names or 'a peer'} in {phase} at step {step}: {cause}"
        try:
            if self._claim_marker(message.split(":")[0]):
                for beat in lost or [{}]:
                    append_event(
                        self.run_dir,
                        "rank_lost",
                        rank=beat.get("rank"),
                        step=step,
                        phase=phase,
                        host=beat.get("host"),
                        last_heartbeat={k: beat.get(k) for k in ("step", "phase", "time")},
                        reported_by=self.rank,
                        reason=cause,
                        attempt=self.attempt,
                    )
                ranks = [b["rank"] for b in lost]
                message += ": " + self._end_job("rank_lost", message, step=step, lost=ranks)
            else:
                message = f"{message} (another rank {self._marker_cause()} first)"
            print(f"rank {self.rank}: {message}", file=sys.stderr, flush=True)
        finally:
            os._exit(HANG_EXIT_CODE)

    def _claim_marker(self, cause: str = "") -> bool:
        """Create this job's marker; False if another rank created it first."""
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return True  # cannot tell: requeueing twice is harmless, never requeueing is not
        with os.fdopen(fd, "w") as fh:
            fh.write(f"rank {self.rank}\n{cause}\n" if cause else f"rank {self.rank}\n")
        return True

    def mark(self, phase: str, **extra: Any) -> None:
        """Enter ``phase`` and write the heartbeat now (``runtime.lost``'s ``failed`` and
        ``peer-error``: what the other ranks read when their collective breaks)."""
        self._phase_at_error = self._phase_at_error or self.phase_name
        self.phase_name = phase
        self._heartbeat(**extra)

    def on_exception(self, exc: BaseException | None = None) -> None:
        """Called when the rank fails. If another rank was ended by its watchdog (its
        exit broke this rank's collective), end this one the same way; if a peer is
        lost (``runtime.lost``), record it and end like a hang; otherwise mark this rank
        ``failed`` for the others to read, and return."""
        if self.peer_fired():
            self.fire(f"a collective failed after another rank {self._marker_cause()}")
        if exc is None:
            return
        if self.world > 1 and broken_collective(exc):
            self.mark(PEER_ERROR)
            lost = find_lost(self.run_dir, self.attempt, self.rank, self.world)
            if lost is not None:
                self.lose(lost, str(exc).splitlines()[0][:300] if str(exc) else repr(exc))
            return  # a peer failed on its own error first: this failure follows from it
        self.mark(OWN_FAILURE, error=(str(exc).splitlines() or [type(exc).__name__])[0][:300])


class HangError(Exception):
    """A local job ended by its ranks' watchdogs; ``scilm`` exits with ``HANG_EXIT_CODE``.
    Picklable like ``UserError`` (the message is the only argument)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.message,))


def hang_since(run_dir: Path, since: float) -> HangError | None:
    """A ``HangError`` describing the hang or lost rank recorded in ``run_dir`` after
    ``since`` (a ``time.time()``), or None if no rank recorded one."""
    events = [e for e in read_events(run_dir) if float(e.get("unix", 0)) >= since]
    summary = fault_summary(events)
    if summary is None:
        return None
    return HangError(
        f"{run_dir}: {summary}; the job ended (exit status {HANG_EXIT_CODE}); "
        f"continue from the last checkpoint with: scilm resume {run_dir}"
    )


_current: Watchdog | None = None


def install(watchdog: Watchdog | None) -> None:
    """Make ``watchdog`` the one ``beat`` / ``phase`` / ``at_allreduce`` report to
    (None: uninstall) and start its thread."""
    global _current
    _current = watchdog
    if watchdog is not None:
        watchdog.start()


def beat(step: int, phase: str = "train") -> None:
    """See ``Watchdog.beat`` (nothing without a watchdog)."""
    if _current is not None:
        _current.beat(step, phase)


def at_allreduce(step: int) -> None:
    """See ``Watchdog.at_allreduce`` (nothing without a watchdog)."""
    if _current is not None:
        _current.at_allreduce(step)


@contextmanager
def phase(name: str, step: int, then: str | None = None) -> Iterator[None]:
    """Report ``name`` while the block runs, then ``then`` (default: the phase before)."""
    before = _current.phase_name if _current is not None else "train"
    beat(step, name)
    try:
        yield
    finally:
        beat(step, then or before)


def current() -> Any:
    """The installed watchdog, or None."""
    return _current
