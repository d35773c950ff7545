"""`run --jobs N`: training chains in worker processes that never outlive the run.

Each (arm, seed) chain runs in a fresh interpreter (`python -m paratransfer.experiment.worker
RUN_DIR ARM seed=S`, so `ps` says which chain a process is), at most N at a time. Plain
subprocesses rather than a multiprocessing pool, for three reasons a pool cannot meet:

* a worker dies with the run, however the run ends: on Linux the kernel kills it when its
  parent dies (`prctl(PR_SET_PDEATHSIG)`, even after `kill -9` of the parent), elsewhere a
  watchdog thread sees the parent's pid go; an interrupted run (Ctrl-C, `kill`) stops its
  workers before it reports;
* a worker that is killed (the out-of-memory killer) is reported as that chain, in one line
  with the `--resume` hint, not as a broken pool that names none;
* no semaphores, queues or resource tracker, so nothing is reported "leaked" at exit.

A worker's log lines come back through its stdout and are passed on to the run's log; its last
line is its reply (marked with REPLY): the steps it ran and reused, or a UserError's message.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError

REPLY = "\x1eparatransfer-worker-reply "
PARENT_ENV = "PARATRANSFER_PARENT_PID"
#: Seconds a stopped worker gets to exit after SIGTERM before it is killed.
STOP_GRACE = 10.0


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed ({name}{'; out of memory?' if -code == signal.SIGKILL else ''})"
    return f"exited with code {code}"


class _Worker:
    """One chain's process, and the thread that reads its lines."""

    def __init__(self, chain: tuple[str, int], indices: list[int], payload: bytes, out: Path,
                 log: Callable[[str], None], done: queue.Queue):
        import paratransfer

        self.chain, self.reply = chain, None
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        package_root = str(Path(paratransfer.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        arm, seed = chain
        # Started from the main thread: PR_SET_PDEATHSIG follows the thread that forked.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paratransfer.experiment.worker", str(out), arm,
             f"seed={seed}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(payload)
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; its exit code says how
        self.reader = threading.Thread(target=self._read, args=(log, done), daemon=True)
        self.reader.start()

    def _read(self, log: Callable[[str], None], done: queue.Queue) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(REPLY):
                self.reply = json.loads(line[len(REPLY):])
            else:
                log(line)
        self.process.wait()
        done.put(self)

    def failure(self) -> str | None:
        """None if the chain completed; else the one line that says what happened to it."""
        arm, seed = self.chain
        if self.reply is not None and "error" in self.reply:
            return self.reply["error"]
        if self.reply is not None and self.process.returncode == 0:
            return None
        return (f"arm {arm} seed {seed}: its worker process {_describe(self.process.returncode)}"
                "; the finished steps are kept: continue with the same command plus --resume")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()


def run_chains(recipe, out: Path, chains: dict[tuple[str, int], list[int]], jobs: int,
               log: Callable[[str], None]) -> tuple[list[tuple[str, float]], list[str]]:
    """Every chain's steps (indices into the run's plan), `jobs` processes at a time, the CPU's
    threads split between them. Returns the steps run (with seconds) and those reused; the
    first failure stops the other workers and is raised as one UserError."""
    jobs = min(jobs, len(chains))
    import torch

    threads = max(1, torch.get_num_threads() // jobs)  # this run's threads (--threads), shared
    waiting = list(chains.items())
    running: list[_Worker] = []
    done: queue.Queue = queue.Queue()
    ran: list[tuple[str, float]] = []
    reused: list[str] = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                chain, indices = waiting.pop(0)
                payload = pickle.dumps((recipe, indices, threads))
                running.append(_Worker(chain, indices, payload, out, log, done))
            while True:
                try:
                    worker = done.get(timeout=0.5)
                    break
                except queue.Empty:
                    continue
            running.remove(worker)
            worker.reader.join()
            if worker.process.returncode in (130, -signal.SIGINT):
                raise KeyboardInterrupt  # Ctrl-C reached the worker first: an interruption
            problem = worker.failure()
            if problem is not None:
                raise UserError(problem)
            ran += [tuple(r) for r in worker.reply["ran"]]
            reused += worker.reply["reused"]
    finally:
        _stop_all(running)
    return ran, reused


def _stop_all(workers: list[_Worker]) -> None:
    """SIGTERM to every worker still running, then SIGKILL to any still there after the grace."""
    import time

    for w in workers:
        w.stop()
    deadline = time.monotonic() + STOP_GRACE
    for w in workers:
        try:
            w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait()


# --------------------------------------------------------------------------- in the worker


def die_with_parent(parent: int) -> None:
    """Make sure this process ends when `parent` does, however it ends (kill -9 included)."""
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:  # where there is no PR_SET_PDEATHSIG (and as a fallback)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def reply(message: dict[str, Any]) -> None:
    print(REPLY + json.dumps(message), flush=True)
