"""`vigil gateway` argument wiring (the command itself is exercised by test_gateway_bootstrap)."""
from __future__ import annotations

import argparse
import subprocess
import sys

from vigil_gateway.cli import add_commands, run_gateway_command


def test_gateway_subcommand_options():
    parser = argparse.ArgumentParser(prog="vigil")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gateway", "--http-port", "9090", "--database-url", "sqlite:///x.db",
                              "--nats-url", "nats://127.0.0.1:4333"])
    assert args.func is run_gateway_command
    assert (args.http_port, args.database_url, args.nats_url) == (9090, "sqlite:///x.db", "nats://127.0.0.1:4333")
    defaults = parser.parse_args(["gateway"])
    assert defaults.http_port is None and defaults.database_url is None


def test_imports_have_no_side_effects(tmp_path):
    code = ("import socket, os\n"
            "def no(*a, **k): raise AssertionError('network at import')\n"
            "socket.socket.connect = no\n"
            "import vigil.tokens, vigil_gateway.app, vigil_gateway.bootstrap, vigil_gateway.cli, "
            "vigil_gateway.consumer, vigil_gateway.postgres_store, vigil_gateway.sqlite_store\n"
            "assert not os.path.exists('vigil-data')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"VIGIL_DATABASE_URL": "bad"})
