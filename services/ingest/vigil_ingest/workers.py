"""`vigil ingest --workers N`: N serving processes on one listen port (SO_REUSEPORT), one supervisor.

One ingest process is one Python event loop, so it uses about one core however many the machine has.
With N workers the kernel spreads incoming connections over N processes, each a complete ingest
service (its own NATS connection, device registry cache and in-flight budget), exactly like N replicas
behind a Service: batches stay idempotent by their `Nats-Msg-Id`, registry writes are compare-and-set
on the key-value bucket, device health is merged across writers. A gRPC stream is one connection, so
balance comes from many device connections (as from a real fleet), not from one.

The supervisor forwards SIGTERM/SIGINT to every worker (each drains its in-flight batches) and exits
when they have; if the supervisor itself is killed, each worker gets SIGTERM (Linux parent-death
signal). When a worker dies on its own the supervisor stops the others and exits non-zero, so the
orchestrator restarts the whole unit rather than serving with less capacity than it believes.
With VIGIL_METRICS_PORT=P, worker i serves its Prometheus metrics on P + i.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

WORKER_ENV = "VIGIL_INGEST_WORKER"  # set by the supervisor in each worker: its index
WORKERS_ENV = "VIGIL_INGEST_WORKERS"
SUPERVISOR_ENV = "VIGIL_INGEST_SUPERVISOR_PID"


def worker_count(arg: int | None, env: dict[str, str] | None = None) -> int:
    """--workers, else VIGIL_INGEST_WORKERS, else 1; ValueError below 1."""
    env = os.environ if env is None else env
    n = arg if arg is not None else int(env.get(WORKERS_ENV, "").strip() or 1)
    if n < 1:
        raise ValueError(f"--workers / {WORKERS_ENV} must be at least 1, not {n}")
    return n


def listen_port(listen: str) -> int:
    """The port of a host:port listen address (0 when it has none)."""
    _, _, port = listen.rpartition(":")
    return int(port) if port.isdigit() else 0


def worker_env(env: dict[str, str], index: int) -> dict[str, str]:
    from vigil.settings import offset_metrics_port

    return {**offset_metrics_port(env, index), WORKER_ENV: str(index), WORKERS_ENV: "1",
            SUPERVISOR_ENV: str(os.getpid())}


def supervise(n: int, argv: list[str], *, grace: float = 10.0, env: dict[str, str] | None = None) -> int:
    """Run `python -m vigil.cli ingest <argv>` N times as workers until a signal or a worker's exit.

    Returns 0 after a requested stop in which every worker exited cleanly, otherwise 1."""
    env = dict(os.environ if env is None else env)
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen] = []
    try:
        for i in range(n):
            procs.append(subprocess.Popen([sys.executable, "-m", "vigil.cli", "ingest", *argv],
                                          env=worker_env(env, i)))
        print(f"vigil ingest: {n} workers (pids {', '.join(str(p.pid) for p in procs)})", file=sys.stderr,
              flush=True)
        failed = None
        while not stopping and failed is None:
            for p in procs:
                if p.poll() is not None:
                    failed = p
                    break
            else:
                time.sleep(0.2)
        if failed is not None:
            print(f"vigil ingest: worker pid {failed.pid} exited with {failed.returncode}; stopping the others",
                  file=sys.stderr, flush=True)
        code = _stop_all(procs, grace)
        return 1 if failed is not None else code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:  # never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()


def die_with_supervisor() -> None:
    """In a worker, at start: SIGTERM when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no worker keeps serving on its own; exit at once if it is gone already."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if supervisor and os.getppid() != supervisor:
        sys.exit(1)


def _stop_all(procs: list[subprocess.Popen], grace: float) -> int:
    """SIGTERM every live worker, wait up to `grace` s, SIGKILL what is left; 0 when all exited with 0."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return 0 if all(p.returncode == 0 for p in procs) else 1
