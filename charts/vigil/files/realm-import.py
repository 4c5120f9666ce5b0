"""Import the Vigil realm into an existing Keycloak through the admin REST API, once: an existing realm is
left as it is (change it in Keycloak or by a deliberate re-import, never by an upgrade). ${VAR}
placeholders in the realm file are filled from the environment; an unfilled one is an error."""
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request


def call(method, url, data=None, token=None, form=False):
    headers = {}
    body = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if data is not None:
        if form:
            body = urllib.parse.urlencode(data).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def prepare(text: str, env) -> dict:
    """The realm to import: test-only clients (attribute vigil.test-only) removed, then every ${VAR}
    filled from `env`; an unfilled placeholder is an error (never a guessable literal secret)."""
    realm = json.loads(text)
    realm["clients"] = [c for c in realm.get("clients", [])
                        if c.get("attributes", {}).get("vigil.test-only") != "true"]
    text = json.dumps(realm)
    text = re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: env.get(m.group(1), m.group(0)), text)
    left = sorted(set(re.findall(r"\$\{([A-Z0-9_]+)\}", text)))
    if left:
        raise SystemExit(f"realm file placeholders without a value: {', '.join(left)}")
    return json.loads(text)


def main() -> None:
    base = os.environ["KEYCLOAK_URL"].rstrip("/")
    realm_file = os.environ.get("REALM_FILE", "/realm/vigil-realm.json")
    with open(realm_file, encoding="utf-8") as fh:
        realm = prepare(fh.read(), os.environ)

    status, body = call("POST", f"{base}/realms/{os.environ.get('KEYCLOAK_ADMIN_REALM', 'master')}"
                        "/protocol/openid-connect/token",
                        {"grant_type": "password",
                         "client_id": os.environ.get("KEYCLOAK_ADMIN_CLIENT_ID", "admin-cli"),
                         "username": os.environ["KEYCLOAK_ADMIN_USER"],
                         "password": os.environ["KEYCLOAK_ADMIN_PASSWORD"]}, form=True)
    if status != 200:
        sys.exit(f"admin token: HTTP {status}: {body[:300]!r}")
    token = json.loads(body)["access_token"]

    name = realm["realm"]
    status, _ = call("GET", f"{base}/admin/realms/{urllib.parse.quote(name)}", token=token)
    if status == 200:
        print(f"realm {name!r} exists: left unchanged")
        sys.exit(0)
    if status != 404:
        sys.exit(f"GET realm {name!r}: HTTP {status}")
    status, body = call("POST", f"{base}/admin/realms", realm, token=token)
    if status not in (201, 204):
        sys.exit(f"create realm {name!r}: HTTP {status}: {body[:300]!r}")
    print(f"realm {name!r} created")


if __name__ == "__main__":
    main()
