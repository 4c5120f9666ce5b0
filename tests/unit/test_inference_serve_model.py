"""`vigil serve-model`'s TLS settings become the BentoML service's own configuration."""
from __future__ import annotations

import pytest
from vigil_inference.cli import model_server_env

from vigil.settings import Settings


def test_serve_model_refuses_half_a_tls_setting(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    for settings, message in ((Settings(model_tls_cert=str(cert)), "go together"),
                              (Settings(model_tls_cert=str(cert), model_tls_key=str(tmp_path / "nope.key")),
                               "does not exist")):
        with pytest.raises(SystemExit, match=message):
            model_server_env(settings, {})
    env = model_server_env(Settings(model_tls_cert=str(cert), model_tls_key=str(cert)),
                           {"BENTOML_CONFIG_OPTIONS": "api_server.workers=2"})
    assert env["BENTOML_CONFIG_OPTIONS"].startswith("api_server.workers=2 services.\"vigil-sepsis-risk\".ssl.enabled=true")
    assert model_server_env(Settings(), {"A": "1"}) == {"A": "1"}
