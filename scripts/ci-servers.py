"""Start the real servers the test suite uses (NATS JetStream, PostgreSQL, Keycloak) and keep them up.

Writes `export VAR=value` lines to the file named by argv[1] once all are ready, then waits for
SIGTERM/SIGINT and stops them. Used by .ci/run; a developer can use it the same way.
"""
from __future__ import annotations

import pathlib
import secrets
import signal
import sys
import threading

from vigil import devservers


def main() -> int:
    env_file = pathlib.Path(sys.argv[1])
    ehr, dev, other = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(16)
    kc_admin = secrets.token_hex(16)  # Keycloak bootstrap admin (tests register keys and users through it)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    servers = []
    try:
        servers.append(nats := devservers.start_nats())
        print("ci-servers: NATS", nats.url, flush=True)
        servers.append(pg := devservers.start_postgres())
        print("ci-servers: PostgreSQL", pg.url, flush=True)
        servers.append(kc := devservers.start_keycloak(
            env={"VIGIL_EHR_CLIENT_SECRET": ehr, "VIGIL_DEVICE_CLIENT_SECRET": dev,
                 "VIGIL_DEVICE_OTHER_CLIENT_SECRET": other, "KC_BOOTSTRAP_ADMIN_USERNAME": "admin",
                 "KC_BOOTSTRAP_ADMIN_PASSWORD": kc_admin},
            extra_realm_files=(devservers.OTHER_REALM_FILE,)))
        print("ci-servers: Keycloak", kc.url, flush=True)
        tmp = env_file.with_suffix(".tmp")
        tmp.write_text(
            f"export VIGIL_TEST_NATS_URL={nats.url}\n"
            f"export VIGIL_TEST_DATABASE_URL={pg.url}\n"
            f"export VIGIL_TEST_KEYCLOAK_URL={kc.url}\n"
            f"export VIGIL_EHR_CLIENT_SECRET={ehr}\n"
            f"export VIGIL_DEVICE_CLIENT_SECRET={dev}\n"
            f"export VIGIL_DEVICE_OTHER_CLIENT_SECRET={other}\n"
            f"export VIGIL_TEST_KEYCLOAK_ADMIN_PASSWORD={kc_admin}\n")
        tmp.rename(env_file)
        stop.wait()
    finally:
        for s in reversed(servers):
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
