"""Each Vigil service in its own process (`python -m vigil.cli <cmd>`, as in production), plus peak RSS.

Peak RSS is /proc/<pid>/status VmHWM (the high-water mark of the resident set), read just before the
process is stopped; for a service that forks workers (BentoML) the sum over its process tree is also
given (an upper bound: shared pages are counted once per process).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

from vigil import devservers


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of a live process, in bytes."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def peak_rss(pid: int) -> dict:
    own = vm_hwm(pid)
    tree = [own or 0] + [vm_hwm(c) or 0 for c in descendants(pid)]
    return {"peak_rss_bytes": own, "tree_peak_rss_bytes": sum(tree), "processes": len(tree)}


class Services:
    """Started processes, stopped in reverse order; `memory` collects peak RSS as they stop."""

    def __init__(self, log_dir: pathlib.Path, env: dict[str, str], memory: dict, scenario: str):
        self.log_dir, self.env, self.memory, self.scenario = log_dir, env, memory, scenario
        self.procs: list[tuple[str, subprocess.Popen, pathlib.Path]] = []
        self.servers: list[devservers.Server] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.log_dir / f"{self.scenario}-{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", *args], env={**self.env, **(extra_env or {})},
                                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def spawn_cmd(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.log_dir / f"{self.scenario}-{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def add_server(self, server: devservers.Server) -> devservers.Server:
        self.servers.append(server)
        return server

    def check(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}; log tail:\n{tail}")

    def wait_http(self, url: str, timeout: float) -> None:
        devservers.wait_http_ok(url, timeout, self.check, interval=0.2)

    def wait_port(self, port: int, timeout: float) -> None:
        devservers.wait_port_open(port, timeout, self.check)

    def record_memory(self) -> None:
        for name, proc, _ in self.procs:
            if proc.poll() is None:
                self.memory[f"{self.scenario}/{name}"] = peak_rss(proc.pid)
        for s in self.servers:
            if s.proc.poll() is None:
                self.memory[f"{self.scenario}/{s.name}"] = peak_rss(s.proc.pid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.record_memory()
        for _name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _name, proc, _ in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for s in reversed(self.servers):
            with contextlib.suppress(Exception):
                s.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
