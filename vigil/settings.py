"""Settings, read from the environment only when a service is wired (never at import time).

Every variable is VIGIL_<NAME>; defaults are the embedded single-machine set-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from vigil import gc_tuning


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    # sqlite:///path/to/file.db (embedded default) or postgresql://user@host:port/db
    database_url: str = "sqlite:///vigil-data/gateway.db"
    grpc_listen: str = "127.0.0.1:50051"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    fhir_base_path: str = "/fhir"
    public_base_url: str = ""  # e.g. https://vigil.example.org/fhir; defaults to http://host:port/fhir
    # OIDC issuer, e.g. http://127.0.0.1:8081/realms/vigil; empty = auth off (loopback only)
    oidc_issuer: str = ""
    oidc_audience: str = "vigil-fhir"
    # Comma-separated OAuth client ids (the token's azp) allowed to call; empty = any client of the realm.
    oidc_allowed_clients: str = ""
    oidc_leeway_seconds: int = 30  # clock skew tolerated on exp/nbf/iat
    # HTTPS for the gateway (PEM files); both set = TLS on.
    http_tls_cert: str = ""
    http_tls_key: str = ""
    bentoml_url: str = "http://127.0.0.1:3000"  # https://... when the model server has TLS
    # HTTPS for the model server (`vigil serve-model`; PEM files, both or neither), and the CA the worker
    # checks the model server's certificate against (empty: the system's trust store).
    model_tls_cert: str = ""
    model_tls_key: str = ""
    model_tls_ca: str = ""
    model_name: str = "vigil-sepsis"
    score_interval_seconds: int = 3600
    worker_name: str = "vigil-inference"
    # The worker's /healthz and /readyz (host:port, e.g. 0.0.0.0:8081; empty = none), and how long its
    # consume loop may go without finishing a fetch before /healthz says it is stuck.
    worker_health_listen: str = ""
    worker_stall_seconds: int = 120
    stream_replicas: int = 1  # JetStream replicas per stream (3 on a 3-node cluster)
    bus_compression: str = "zstd"  # Observation bodies on the bus: zstd (about 18x smaller) or none
    gateway_consumer_name: str = "vigil-gateway"
    # Device ingest API: token audience, and optional TLS (PEM files); with a client CA, mTLS is required.
    ingest_audience: str = "vigil-ingest"
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_client_ca: str = ""
    # A second, plaintext gRPC listener that serves grpc.health.v1 only (e.g. 0.0.0.0:50052): the
    # kubelet's gRPC probe dials plaintext, so it cannot probe a TLS device port. Empty = none.
    grpc_health_listen: str = ""
    # How often the TLS files above are looked at for a renewal (seconds; 0 = read at start only).
    tls_reload_seconds: int = 30
    # The garbage collector of the gateway, ingest and worker processes (vigil.gc_tuning): thresholds
    # gen0,gen1,gen2 after freezing what start-up created; empty = CPython's defaults.
    gc_thresholds: str = gc_tuning.DEFAULT
    extra: dict = field(default_factory=dict)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.oidc_issuer)

    @property
    def allowed_clients(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.oidc_allowed_clients.split(",") if c.strip())

    @property
    def http_tls(self) -> bool:
        return bool(self.http_tls_cert and self.http_tls_key)

    @property
    def fhir_base_url(self) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        scheme = "https" if self.http_tls else "http"
        return f"{scheme}://{self.http_host}:{self.http_port}{self.fhir_base_path}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"VIGIL_{f.name.upper()}")
            if raw is not None:
                values[f.name] = int(raw) if f.type in ("int", int) else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def offset_metrics_port(env: dict[str, str], offset: int) -> dict[str, str]:
    """A copy of `env` with VIGIL_METRICS_PORT moved up by `offset` (several processes on one machine,
    one Prometheus port each: `vigil up`'s services, `vigil ingest --workers`); unchanged when unset."""
    out = dict(env)
    port = out.get("VIGIL_METRICS_PORT", "").strip()
    if port:
        out["VIGIL_METRICS_PORT"] = str(int(port) + offset)
    return out
