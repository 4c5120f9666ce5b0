"""TLS certificates re-read while serving, so a renewal needs no restart.

cert-manager renews a certificate by rewriting its Secret; the kubelet then swaps the mounted files
(an atomic symlink change). Both servers notice within VIGIL_TLS_RELOAD_SECONDS (0 = read at start
only) and use the new pair for new connections; connections already open keep theirs. A new pair is
checked before it is used (the key must belong to the certificate, a client CA must parse): files
that changed into something unusable (half-copied by hand, key and certificate from different
renewals) are logged once and the previous pair stays in service.

- gateway (uvicorn): `watch_server_context` loads the files into the listening socket's SSLContext;
- ingest (gRPC): `GrpcCertificates` is the certificate fetcher of `grpc.dynamic_ssl_server_credentials`,
  which gRPC asks at each new TLS handshake.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time

log = logging.getLogger("vigil.tls")


class CertFiles:
    """The PEM files of one TLS endpoint; `changed()` says whether they differ from the last look."""

    def __init__(self, cert: str, key: str, ca: str = ""):
        self.cert, self.key, self.ca = cert, key, ca
        self._seen = self._fingerprint()

    def _fingerprint(self) -> tuple:
        out = []
        for path in (self.cert, self.key, self.ca):
            try:
                st = os.stat(path) if path else None  # follows the kubelet's symlinks
            except OSError:
                st = None
            out.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def changed(self) -> bool:
        now = self._fingerprint()
        if now == self._seen:
            return False
        self._seen = now
        return True

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None) as PEM, checked: the key belongs to the
        first certificate and the CA parses. Raises OSError or ValueError."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        with open(self.cert, "rb") as f:
            chain = f.read()
        with open(self.key, "rb") as f:
            key = f.read()
        ca = None
        if self.ca:
            with open(self.ca, "rb") as f:
                ca = f.read()
            x509.load_pem_x509_certificates(ca)
        leaf = x509.load_pem_x509_certificates(chain)[0]
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if leaf.public_key().public_bytes(*spki) != \
                serialization.load_pem_private_key(key, password=None).public_key().public_bytes(*spki):
            raise ValueError("the private key does not belong to the certificate")
        return chain, key, ca


def _unusable(files: CertFiles, exc: Exception) -> None:
    log.error("TLS files %s / %s changed but cannot be used (%s); still serving the previous certificate",
              files.cert, files.key, exc)


def reload_context(context: ssl.SSLContext, files: CertFiles) -> bool:
    """Load changed files into `context` (new handshakes use them). True when it did; unusable files
    are logged and leave the context as it was."""
    if not files.changed():
        return False
    try:
        files.read()  # checked first: a failed load_cert_chain may leave the context half-changed
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ValueError) as exc:
        _unusable(files, exc)
        return False
    log.info("TLS certificate reloaded from %s", files.cert)
    return True


async def watch_server_context(context: ssl.SSLContext, cert: str, key: str, every: float) -> None:
    """Until cancelled: every `every` seconds, `reload_context` (the gateway's HTTPS listener)."""
    files = CertFiles(cert, key)
    while True:
        await asyncio.sleep(every)
        reload_context(context, files)


class GrpcCertificates:
    """Server TLS credentials whose certificate follows the files: gRPC calls this object at each new
    handshake; it looks at the files at most every `every` seconds and hands over a new configuration
    only when they changed into a valid pair."""

    def __init__(self, cert: str, key: str, ca: str = "", every: float = 30.0):
        self.files, self.every = CertFiles(cert, key, ca), every
        self._next = time.monotonic() + every
        self._lock = threading.Lock()  # gRPC may ask from several of its threads

    def credentials(self):
        import grpc

        chain, key, ca = self.files.read()
        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca),
            self, require_client_authentication=ca is not None)

    def __call__(self):
        import grpc

        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return None
            self._next = now + self.every
            if not self.files.changed():
                return None
            try:
                chain, key, ca = self.files.read()
            except (OSError, ValueError) as exc:
                _unusable(self.files, exc)
                return None
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)
