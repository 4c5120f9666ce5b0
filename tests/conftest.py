"""Shared fixtures: real servers, started once per test session.

Each server comes from an environment variable when .ci/run (or a developer) already started one,
otherwise the fixture starts its own on a free loopback port with a temporary store:
VIGIL_TEST_NATS_URL, VIGIL_TEST_DATABASE_URL (PostgreSQL), VIGIL_TEST_KEYCLOAK_URL (+ the client
secrets VIGIL_EHR_CLIENT_SECRET, VIGIL_DEVICE_CLIENT_SECRET and VIGIL_DEVICE_OTHER_CLIENT_SECRET it was
started with, and VIGIL_TEST_KEYCLOAK_ADMIN_PASSWORD, the bootstrap admin's password, which the security
tests use to register client keys and a test user through the admin API: no key or password is in the
repository). The Keycloak also has the test-only realm "other" (tests/keycloak/other-realm.json).
"""
from __future__ import annotations

import json
import os
import secrets
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

from vigil import devservers


@pytest.fixture(scope="session")
def nats_url():
    if os.environ.get("VIGIL_TEST_NATS_URL"):
        yield os.environ["VIGIL_TEST_NATS_URL"]
        return
    with devservers.start_nats() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_url():
    if os.environ.get("VIGIL_TEST_DATABASE_URL"):
        yield os.environ["VIGIL_TEST_DATABASE_URL"]
        return
    with devservers.start_postgres() as server:
        yield server.url


@pytest.fixture
def fresh_postgres_url(postgres_url):
    """A new, empty database on the session's PostgreSQL server for one test."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Keycloak:
    url: str
    ehr_secret: str
    device_secret: str
    device_other_secret: str = ""
    admin_password: str = ""

    @property
    def issuer(self) -> str:
        return f"{self.url}/realms/vigil"

    def admin_token(self) -> str:
        """A master-realm admin token (admin-cli, password grant) for the admin REST API."""
        if not self.admin_password:
            pytest.skip("VIGIL_TEST_KEYCLOAK_ADMIN_PASSWORD not set: cannot use the Keycloak admin API")
        data = urllib.parse.urlencode({"grant_type": "password", "client_id": "admin-cli", "username": "admin",
                                       "password": self.admin_password}).encode()
        with urllib.request.urlopen(f"{self.url}/realms/master/protocol/openid-connect/token", data,
                                    timeout=10) as r:
            return json.load(r)["access_token"]

    def token(self, client_id: str = "vigil-ehr", secret: str | None = None) -> str:
        if secret is None and client_id == "vigil-device-other":
            secret = self.device_other_secret
        secret = secret or (self.device_secret if client_id.startswith("vigil-device") else self.ehr_secret)
        data = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                       "client_secret": secret}).encode()
        with urllib.request.urlopen(f"{self.issuer}/protocol/openid-connect/token", data, timeout=10) as r:
            return json.load(r)["access_token"]


@pytest.fixture(scope="session")
def keycloak():
    if os.environ.get("VIGIL_TEST_KEYCLOAK_URL"):
        yield Keycloak(os.environ["VIGIL_TEST_KEYCLOAK_URL"], os.environ["VIGIL_EHR_CLIENT_SECRET"],
                       os.environ["VIGIL_DEVICE_CLIENT_SECRET"], os.environ.get("VIGIL_DEVICE_OTHER_CLIENT_SECRET", ""),
                       os.environ.get("VIGIL_TEST_KEYCLOAK_ADMIN_PASSWORD", ""))
        return
    ehr, dev, other = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(16)
    kc_admin = secrets.token_hex(16)
    with devservers.start_keycloak(env={"VIGIL_EHR_CLIENT_SECRET": ehr, "VIGIL_DEVICE_CLIENT_SECRET": dev,
                                        "VIGIL_DEVICE_OTHER_CLIENT_SECRET": other,
                                        "KC_BOOTSTRAP_ADMIN_USERNAME": "admin",
                                        "KC_BOOTSTRAP_ADMIN_PASSWORD": kc_admin},
                                   extra_realm_files=(devservers.OTHER_REALM_FILE,)) as s:
        yield Keycloak(s.url, ehr, dev, other, kc_admin)
