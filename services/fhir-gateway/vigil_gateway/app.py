"""The FHIR R4 REST API (https://hl7.org/fhir/R4/http.html); docs/fhir-api.md lists what is supported.

Interactions: capabilities, read, vread, history-instance, history-type, search-type (GET and POST
_search) for every served type; create, conditional create (If-None-Exist) and update (also
update-as-create) for Patient and Encounter. Responses are application/fhir+json built with orjson
from the stored JSON. Every error is an OperationOutcome (https://hl7.org/fhir/R4/operationoutcome.html),
including unknown routes (404), wrong methods (405) and unexpected failures (500).

Authorization: every interaction calls `auth.authorize(request, resource_type, interaction, patient)`
in one place (`guard`) after authentication (`identify`, which runs before any request body is read);
SMART scopes are enforced there (vigil/smart.py), and a patient-level token's compartment
(request.state.confine) is applied here to reads, searches (with _include/_revinclude, on every page),
history and writes. Every FHIR interaction, refused ones included,
leaves an AuditEvent (audit_log.py); administrators search them at [base]/AuditEvent. See docs/security.md.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import urllib.parse
import uuid
from typing import Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vigil import smart
from vigil.audit import build_audit_event
from vigil.ids import is_fhir_id
from vigil.settings import Settings
from vigil.tokens import TokenValidator
from vigil_gateway.audit_log import AuditLog
from vigil_gateway.auth import (
    authenticate,
    authorize,
    forbidden,
    may_read_type,
    may_search_audit,
    require_scope,
)
from vigil_gateway.capability import capability_statement
from vigil_gateway.fhirindex import SUPPORTED_TYPES, WRITABLE_TYPES, date_range, normalise_reference
from vigil_gateway.outcomes import (
    FHIR_JSON,
    STATUS_ISSUE_CODE,
    FhirError,
    FhirJSONResponse,
    operation_outcome,
)
from vigil_gateway.search_params import ParsedSearch, non_negative_int, parse_search
from vigil_gateway.store import InvalidResource, PreconditionFailed, SearchResult, Store, now_instant
from vigil_gateway.validation import validate_resource

log = logging.getLogger("vigil.gateway")
SOFTWARE_VERSION = "0.2.0"
MAX_BODY = 1_000_000
_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}


class ConsumerHealth(Protocol):
    @property
    def running(self) -> bool: ...


def create_app(settings: Settings, store: Store, validator: TokenValidator | None, *,
               consumer: ConsumerHealth | None = None, outbox_event: asyncio.Event | None = None) -> FastAPI:
    """The gateway ASGI app. `validator` None means auth is off (the caller decides); `consumer`, when
    given, is part of /readyz; `outbox_event` is set after each accepted write (wakes the publisher)."""
    base = "/" + settings.fhir_base_path.strip("/")
    base_url = settings.fhir_base_url
    app = FastAPI(title="Vigil FHIR gateway", version=SOFTWARE_VERSION, docs_url=None, redoc_url=None,
                  openapi_url=None, default_response_class=FhirJSONResponse)
    app.state.settings, app.state.store, app.state.validator = settings, store, validator
    app.state.outbox_event = outbox_event
    app.state.allowed_clients = settings.allowed_clients
    audit = app.state.audit = AuditLog(store)
    app.router.on_shutdown.append(audit.close)
    app.add_middleware(AuditMiddleware, audit=audit, issuer=settings.oidc_issuer or None)
    app.add_middleware(HeadMiddleware)
    _install_error_handlers(app)
    started = now_instant()
    smart_config: dict = {}
    search_async = getattr(store, "search_query_async", None)

    async def identify(request: Request, resource_type: str | None, interaction: str, *,
                       scope: str | None = None) -> dict | None:
        """Content negotiation, the type check and authentication (once per request): the claims, or
        None with auth off. Runs before a request body is read, so a caller without a valid token
        learns nothing about what the gateway would have made of its body (401 first). `scope`: the
        SMART interaction whose scope is checked here too, before the body (403 before any 400)."""
        if getattr(request.state, "identified", False):
            return getattr(request.state, "claims", None)
        request.state.audit = {"interaction": interaction, "type": resource_type,
                               "id": request.path_params.get("resource_id"), "patient": None}
        negotiate(request)
        if resource_type is not None and resource_type not in SUPPORTED_TYPES:
            raise FhirError(404, "not-supported", f"resource type {resource_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
        claims = None
        if validator is not None:
            claims = await authenticate(request, validator)
            request.state.claims = claims
            if scope is not None and resource_type is not None:
                require_scope(claims, resource_type, scope)
        request.state.identified = True
        return claims

    async def guard(request: Request, resource_type: str | None, interaction: str,
                    patient: str | None = None) -> None:
        """`identify`, then the per-request authorization hook."""
        claims = await identify(request, resource_type, interaction)
        request.state.audit["patient"] = patient.removeprefix("Patient/") if patient else None
        await authorize(request, claims, resource_type, interaction, patient)

    def reply(request: Request, content, status: int = 200, headers: dict | None = None) -> Response:
        return FhirJSONResponse(content, status_code=status, headers=headers,
                                pretty=request.query_params.get("_pretty") == "true")

    @app.get(f"{base}/metadata")
    async def metadata(request: Request) -> Response:
        """capabilities interaction (no token needed)."""
        negotiate(request)
        return reply(request, capability_statement(base_url=base_url, auth_enabled=validator is not None,
                                                   software_version=SOFTWARE_VERSION, date=started))

    @app.get(f"{base}/.well-known/smart-configuration")
    async def smart_configuration(request: Request) -> Response:
        """SMART App Launch 2 discovery (https://hl7.org/fhir/smart-app-launch/conformance.html), built
        from the issuer's OpenID discovery document (fetched once, cached)."""
        if validator is None:
            raise FhirError(404, "not-found", "auth is off: there is no authorization server")
        if not smart_config:
            import httpx
            try:
                async with httpx.AsyncClient(timeout=5) as client:
                    r = await client.get(settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration")
                    r.raise_for_status()
                    oidc = r.json()
            except (httpx.HTTPError, ValueError):
                raise FhirError(503, "transient", "the authorization server's discovery document is "
                                "unavailable", headers={"Retry-After": "5"}) from None
            smart_config.update(smart_configuration_document(settings.oidc_issuer, oidc))
        return FhirJSONResponse(smart_config, media_type="application/json",
                                headers={"Cache-Control": "public, max-age=3600"})

    @app.get(f"{base}/AuditEvent")
    async def audit_search(request: Request) -> Response:
        """AuditEvent search for administrators (a system/ or user/ AuditEvent scope with s, e.g.
        system/AuditEvent.rs): date (lt/le/gt/ge/eq prefixes), agent (client id), patient, entity,
        outcome, action, _count, _offset. Newest first."""
        request.state.audit = {"interaction": "search-type", "type": "AuditEvent", "id": None, "patient": None}
        negotiate(request)
        claims = None
        if validator is not None:
            claims = request.state.claims = await authenticate(request, validator)
        if not may_search_audit(claims):
            raise forbidden("AuditEvents need an administrator scope such as system/AuditEvent.rs")
        qp = request.query_params
        request.state.audit["query"] = str(request.url.query)
        dates = []
        for value in qp.getlist("date"):
            op, rest = (value[:2], value[2:]) if value[:2] in ("lt", "le", "gt", "ge", "eq") else ("eq", value)
            rng = date_range(rest) if rest[:1].isdigit() else None
            if rng is None:
                raise FhirError(400, "invalid", "date must be a date or instant with an optional lt/le/gt/ge/eq "
                                "prefix (YYYY[-MM[-DD[Thh:mm[:ss[.fff]]]]][Z|+hh:mm])")
            # The value is a range (search.html#prefix: 2026-01-01 is the whole day, in UTC once its zone is
            # applied); AuditEvent.recorded is a UTC instant to the millisecond, compared as text in that form.
            low, high = rng[0][:23] + "Z", rng[1][:23] + "Z"
            dates += {"eq": [("ge", low), ("le", high)], "lt": [("lt", low)], "le": [("le", high)],
                      "gt": [("gt", high)], "ge": [("ge", low)]}[op]
        patient = qp.get("patient")
        if patient and not patient.startswith("Patient/"):
            patient = f"Patient/{patient}"
        count = _int_param(qp.get("_count"), 50, 1000, "_count")
        offset = _int_param(qp.get("_offset"), 0, 1_000_000, "_offset")
        await audit.flush()
        total, events = await run_in_threadpool(
            audit.search, date=dates, agent=qp.get("agent"), patient=patient, entity=qp.get("entity"),
            outcome=qp.get("outcome"), action=qp.get("action"), count=count, offset=offset)
        keep = [(k, v) for k, v in qp.multi_items() if k not in ("_offset", "_count")]

        def link(rel: str, off: int) -> dict:
            params = [*keep, ("_count", str(count)), ("_offset", str(off))]
            return {"relation": rel, "url": f"{base_url}/AuditEvent?{urllib.parse.urlencode(params)}"}

        links = [link("self", offset)]
        if offset + count < total:
            links.append(link("next", offset + count))
        return reply(request, {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": now_instant()},
                               "type": "searchset", "total": total, "link": links,
                               "entry": [{"fullUrl": f"{base_url}/AuditEvent/{e['id']}", "resource": e,
                                          "search": {"mode": "match"}} for e in events]})

    # --- interactions this server does not support (405, as the docs and CapabilityStatement say) ---
    # Registered before the type-level routes, which would otherwise take `_history` or `$op` for a
    # resource type or id and answer 404.

    def unsupported(what: str):
        async def endpoint(request: Request) -> Response:
            op = request.path_params.get("op")
            if op:
                what_ = f"the operation ${op}"
            elif request.url.path.rstrip("/") == base:  # [base] itself: batch/transaction or system search
                what_ = "batch/transaction" if request.method == "POST" else "system-level search"
            else:
                what_ = what
            raise FhirError(405, "not-supported", f"{what_} is not supported "
                            f"by this server ({request.method} {request.url.path}); see {base_url}/metadata")
        return endpoint

    app.add_api_route(base, unsupported("this interaction"),
                      methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    app.add_api_route(f"{base}/_search", unsupported("system-level search"), methods=["GET", "POST"],
                      include_in_schema=False)
    app.add_api_route(f"{base}/_history", unsupported("system-level history"), methods=["GET"],
                      include_in_schema=False)
    for path in (f"{base}/${{op}}", f"{base}/{{resource_type}}/${{op}}",
                 f"{base}/{{resource_type}}/{{resource_id}}/${{op}}",
                 f"{base}/{{resource_type}}/{{resource_id}}/_history/{{version_id}}/${{op}}"):
        app.add_api_route(path, unsupported("an operation"), methods=["GET", "POST"], include_in_schema=False)

    # --- search -------------------------------------------------------------------------------

    async def do_search(request: Request, resource_type: str, items: list[tuple[str, str]]) -> Response:
        await guard(request, resource_type, "search-type", _patient_of_query(resource_type, items))
        confine = getattr(request.state, "confine", None)
        if confine is not None:
            # The compartment filter is added on every request (every page): repeating a parameter is AND,
            # so whatever else the query (or a tampered paging link) says can only narrow it.
            items = [*items, _compartment_param(resource_type, confine)]
            request.state.audit["patient"] = confine
        request.state.audit["query"] = urllib.parse.urlencode(items)
        parsed = parse_search(resource_type, items, strict=_strict(request))
        if search_async is not None:  # PostgreSQL: on the event loop, no worker-thread hop
            result = await search_async(parsed.query)
        else:
            result = await run_in_threadpool(store.search_query, parsed.query)
        claims = getattr(request.state, "claims", None)
        if result.included and (claims is not None):
            result.included = [r for r in result.included if _may_see(claims, confine, r)]
        if confine is not None:
            result.keep(lambda r: smart.in_compartment(r, confine))
        pretty = request.query_params.get("_pretty") == "true"
        return reply(request, searchset_bundle(base_url, resource_type, parsed, result, stored=not pretty))

    @app.get(f"{base}/{{resource_type}}")
    async def search_type(resource_type: str, request: Request) -> Response:
        """search-type: https://hl7.org/fhir/R4/http.html#search"""
        return await do_search(request, resource_type, request.query_params.multi_items())

    @app.post(f"{base}/{{resource_type}}/_search")
    async def search_post(resource_type: str, request: Request) -> Response:
        """search-type by POST: form-encoded body parameters plus any in the URL."""
        await identify(request, resource_type, "search", scope="search-type")
        ctype = request.headers.get("content-type", "")
        body = await request.body()
        if body and not ctype.startswith("application/x-www-form-urlencoded"):
            raise FhirError(415, "not-supported", "POST _search needs application/x-www-form-urlencoded")
        items = request.query_params.multi_items() + urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
        return await do_search(request, resource_type, items)

    # --- history ------------------------------------------------------------------------------

    async def do_history(request: Request, resource_type: str, resource_id: str | None) -> Response:
        qp = request.query_params
        count = _int_param(qp.get("_count"), 50, 1000, "_count")
        offset = _int_param(qp.get("_offset"), 0, 1_000_000, "_offset")
        since = _instant_param(qp.get("_since"), "_since")
        snapshot = _instant_param(qp.get("_snapshot"), "_snapshot") or now_instant()
        total, versions = await run_in_threadpool(store.history, resource_type, resource_id, count=count,
                                                  offset=offset, since=since, snapshot=snapshot)
        if resource_id is not None and total == 0:
            # no version in the window (_since after the last change, or a page past the end): 404 only
            # when the resource has no version at all, else an empty history Bundle (http.html#history)
            known, _ = await run_in_threadpool(store.history, resource_type, resource_id, count=0, offset=0)
            if known == 0:
                raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
        confine = getattr(request.state, "confine", None)
        if confine is not None:  # an older version outside the compartment is not shown either
            versions = [(m, r) for m, r in versions if smart.in_compartment(r, confine)]
        path = f"{resource_type}/{resource_id}/_history" if resource_id else f"{resource_type}/_history"

        def link(rel: str, off: int) -> dict:
            params = [("_count", str(count)), ("_offset", str(off)), ("_snapshot", snapshot)]
            if since:
                params.insert(0, ("_since", since))
            return {"relation": rel, "url": f"{base_url}/{path}?{urllib.parse.urlencode(params)}"}

        links = [link("self", offset)]
        if offset + count < total:
            links.append(link("next", offset + count))
        if offset > 0:
            links.append(link("previous", max(0, offset - count)))
        entries = []
        for method, res in versions:
            meta = res.get("meta") or {}
            url = f"{res['resourceType']}/{res['id']}"
            entries.append({
                "fullUrl": f"{base_url}/{url}", "resource": res,
                "request": {"method": method, "url": url if method == "PUT" else res["resourceType"]},
                "response": {"status": "201 Created" if method == "POST" else "200 OK",
                             "etag": f'W/"{meta.get("versionId")}"', "lastModified": meta.get("lastUpdated")},
            })
        return reply(request, {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                               "meta": {"lastUpdated": now_instant()}, "type": "history", "total": total,
                               "link": links, "entry": entries})

    @app.get(f"{base}/{{resource_type}}/_history")
    async def history_type(resource_type: str, request: Request) -> Response:
        await guard(request, resource_type, "history-type")
        return await do_history(request, resource_type, None)

    @app.get(f"{base}/{{resource_type}}/{{resource_id}}/_history")
    async def history_instance(resource_type: str, resource_id: str, request: Request) -> Response:
        await guard(request, resource_type, "history-instance", _patient_of_id(resource_type, resource_id))
        _check_id(resource_type, resource_id)
        confine = getattr(request.state, "confine", None)
        if confine is not None:
            current = await run_in_threadpool(store.read, resource_type, resource_id)
            if current is None or not smart.in_compartment(current, confine):
                raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
            request.state.audit["patient"] = confine
        return await do_history(request, resource_type, resource_id)

    # --- read / vread -------------------------------------------------------------------------

    def versioned(request: Request, resource: dict, status: int = 200, extra: dict | None = None) -> Response:
        meta = resource.get("meta") or {}
        etag = f'W/"{meta.get("versionId", "1")}"'
        headers = {"ETag": etag, **(extra or {})}
        if meta.get("lastUpdated"):
            headers["Last-Modified"] = http_date(meta["lastUpdated"])
        if status == 200 and request.method == "GET" and _not_modified(request, etag, meta):
            return Response(status_code=304, headers=headers)
        return reply(request, resource, status, headers)

    @app.get(f"{base}/{{resource_type}}/{{resource_id}}")
    async def read(resource_type: str, resource_id: str, request: Request) -> Response:
        """read: https://hl7.org/fhir/R4/http.html#read (ETag, Last-Modified; If-None-Match or
        If-Modified-Since -> 304: https://hl7.org/fhir/R4/http.html#cread)."""
        await guard(request, resource_type, "read", _patient_of_id(resource_type, resource_id))
        _check_id(resource_type, resource_id)
        # on the event loop (PostgreSQL: one statement on an async connection; SQLite: inline)
        resource = await store.read_async(resource_type, resource_id)
        if resource is None:
            raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
        request.state.audit["patient"] = smart.patient_of(resource)
        await authorize(request, getattr(request.state, "claims", None), resource_type, "read",
                        _patient_of_resource(resource), resource=resource)
        return versioned(request, resource)

    @app.get(f"{base}/{{resource_type}}/{{resource_id}}/_history/{{version_id}}")
    async def vread(resource_type: str, resource_id: str, version_id: str, request: Request) -> Response:
        """vread: https://hl7.org/fhir/R4/http.html#vread"""
        await guard(request, resource_type, "vread", _patient_of_id(resource_type, resource_id))
        _check_id(resource_type, resource_id)
        if not version_id.isdigit():
            raise FhirError(404, "not-found", f"{version_id!r} is not a version of {resource_type}/{resource_id}")
        resource = await store.vread_async(resource_type, resource_id, int(version_id))
        if resource is None:
            raise FhirError(404, "not-found", f"{resource_type}/{resource_id}/_history/{version_id} is not known")
        request.state.audit["patient"] = smart.patient_of(resource)
        await authorize(request, getattr(request.state, "claims", None), resource_type, "vread",
                        _patient_of_resource(resource), resource=resource)
        return versioned(request, resource)

    # --- create / update (Patient, Encounter) -------------------------------------------------

    async def body_resource(request: Request, resource_type: str) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in ("application/fhir+json", "application/json", "application/json+fhir"):
            raise FhirError(415, "not-supported", f"unsupported content type {ctype!r}: send application/fhir+json")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise FhirError(413, "too-costly", f"request body larger than {MAX_BODY} bytes")
        try:
            resource = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise FhirError(400, "structure", f"body is not JSON: {exc}") from None
        if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
            raise FhirError(400, "invalid", f"body must be a {resource_type} resource")
        return resource

    def check_writable(resource_type: str) -> None:
        if resource_type not in WRITABLE_TYPES:
            raise FhirError(405, "not-supported", f"{resource_type} is read-only here (it comes from the "
                            f"pipeline); create/update are supported for {', '.join(WRITABLE_TYPES)}")

    def check_valid(resource: dict, *, create: bool) -> None:
        """Basic FHIR validation of a body to store (validation.py): 400 with one issue per problem."""
        issues = validate_resource(resource, create=create)
        if issues:
            raise FhirError(400, issues[0]["code"], issues[0]["diagnostics"], issues=issues)

    def prefer_return(request: Request) -> str:
        for part in request.headers.get("prefer", "").split(","):
            k, _, v = part.strip().partition("=")
            if k.strip() == "return":
                return v.strip()
        return "representation"

    def written(request: Request, result, status: int) -> Response:
        res = result.resource
        loc = f"{base_url}/{res['resourceType']}/{res['id']}/_history/{res['meta']['versionId']}"
        if result.outcome in ("created", "updated") and app.state.outbox_event is not None:
            app.state.outbox_event.set()
        pref = prefer_return(request)
        if pref == "minimal":
            meta = res["meta"]
            return Response(status_code=status, headers={"Location": loc, "ETag": f'W/"{meta["versionId"]}"',
                                                         "Last-Modified": http_date(meta["lastUpdated"])})
        if pref == "OperationOutcome":
            meta = res["meta"]
            return reply(request, operation_outcome("informational", f"{result.outcome} {loc}", "information"),
                         status, {"Location": loc, "ETag": f'W/"{meta["versionId"]}"'})
        return versioned(request, res, status, {"Location": loc})

    @app.post(f"{base}/{{resource_type}}")
    async def create(resource_type: str, request: Request) -> Response:
        """create and conditional create (If-None-Exist): https://hl7.org/fhir/R4/http.html#create"""
        await identify(request, resource_type, "create", scope="create")
        resource = await body_resource(request, resource_type)
        await guard(request, resource_type, "create", _patient_of_resource(resource))
        check_writable(resource_type)
        check_valid(resource, create=True)
        condition = None
        ine = request.headers.get("if-none-exist")
        if ine:
            items = urllib.parse.parse_qsl(ine.split("?", 1)[-1], keep_blank_values=True)
            parsed = parse_search(resource_type, items, strict=True)
            if not parsed.query.filters:
                raise FhirError(400, "invalid", "If-None-Exist has no search criteria")
            condition = parsed.query
        try:
            result = await run_in_threadpool(store.write, resource, create=True, if_none_exist=condition)
        except PreconditionFailed as exc:
            raise FhirError(412, "multiple-matches" if condition is not None else "conflict", str(exc)) from None
        except InvalidResource as exc:
            raise FhirError(400, "invalid", str(exc)) from None
        return written(request, result, 200 if result.outcome == "exists" else 201)

    @app.put(f"{base}/{{resource_type}}/{{resource_id}}")
    async def update(resource_type: str, resource_id: str, request: Request) -> Response:
        """update and update-as-create: https://hl7.org/fhir/R4/http.html#update (If-Match -> 412)."""
        await identify(request, resource_type, "update", scope="update")
        resource = await body_resource(request, resource_type)
        await guard(request, resource_type, "update", _patient_of_resource(resource))
        check_writable(resource_type)
        if not is_fhir_id(resource_id):  # a create by PUT of a bad id is a bad request, not "not found"
            raise FhirError(400, "invalid", f"{resource_id!r} is not a valid FHIR id ([A-Za-z0-9\\-.]{{1,64}})")
        confine = getattr(request.state, "confine", None)
        if confine is not None:  # a patient-level token may not take over another patient's resource
            existing = await run_in_threadpool(store.read, resource_type, resource_id)
            if existing is not None and not smart.in_compartment(existing, confine):
                raise forbidden("a patient-level token writes only into its own patient's compartment")
        if resource.get("id") != resource_id:
            raise FhirError(400, "invalid", f"the body's id ({resource.get('id')!r}) must equal the URL's "
                            f"({resource_id!r})")
        check_valid(resource, create=False)
        if_match = None
        if request.headers.get("if-match"):
            tags = _etags(request.headers["if-match"])
            try:
                if_match = int(tags[0].removeprefix("W/").strip('"'))
            except (ValueError, IndexError):
                raise FhirError(400, "invalid", "If-Match must be an ETag like W/\"3\"") from None
        try:
            result = await run_in_threadpool(store.write, resource, create=False, if_match=if_match)
        except PreconditionFailed as exc:
            raise FhirError(412, "conflict", str(exc)) from None
        except InvalidResource as exc:
            raise FhirError(400, "invalid", str(exc)) from None
        return written(request, result, 201 if result.outcome == "created" else 200)

    # --- health -------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return FhirJSONResponse({"status": "ok"}, media_type="application/json")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        problems = []
        try:
            store_ok = await run_in_threadpool(store.ping)
        except Exception:
            log.exception("store ping failed")
            store_ok = False
        if not store_ok:
            problems.append("store unreachable")
        if consumer is not None and not consumer.running:
            problems.append("bus consumer not running")
        if problems:
            raise FhirError(503, "transient", "not ready: " + "; ".join(problems))
        return FhirJSONResponse({"status": "ready"}, media_type="application/json")

    return app


# --- helpers ----------------------------------------------------------------------------------------

def negotiate(request: Request) -> None:
    """Content negotiation: JSON only (application/fhir+json). _format wins over Accept."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _JSON_FORMATS:
            raise FhirError(406, "not-supported", f"_format={fmt!r}: only JSON (application/fhir+json) is served")
        return
    accept = request.headers.get("accept")
    if not accept:
        return
    kinds = [a.split(";")[0].strip().lower() for a in accept.split(",")]
    if any(k in _JSON_FORMATS or k in ("*/*", "application/*", "") for k in kinds):
        return
    raise FhirError(406, "not-supported", f"cannot produce {accept!r}: only application/fhir+json is served")


def _strict(request: Request) -> bool:
    return any(p.strip().replace(" ", "") == "handling=strict" for p in request.headers.get("prefer", "").split(","))


def _not_modified(request: Request, etag: str, meta: dict) -> bool:
    """RFC 9110 13.2.2: If-None-Match decides when present; otherwise If-Modified-Since, true when the
    resource's lastUpdated (to the second, as Last-Modified carries it) is not after the date. An
    unparsable date is ignored, as the RFC says."""
    inm = request.headers.get("if-none-match")
    if inm:
        return inm.strip() == "*" or etag in _etags(inm)
    ims = request.headers.get("if-modified-since")
    if not ims or not meta.get("lastUpdated"):
        return False
    try:
        since = email.utils.parsedate_to_datetime(ims)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:
        return False
    modified = dt.datetime.fromisoformat(meta["lastUpdated"]).replace(microsecond=0)
    return modified <= since


def _etags(header: str) -> list[str]:
    return [t.strip() if t.strip().startswith("W/") else "W/" + t.strip() for t in header.split(",") if t.strip()]


def _check_id(resource_type: str, resource_id: str) -> None:
    if not is_fhir_id(resource_id):
        raise FhirError(404, "not-found", f"{resource_id!r} is not a valid FHIR id")


def _int_param(value: str | None, default: int, maximum: int, name: str) -> int:
    return default if value is None else non_negative_int(name, value, maximum)


def _instant_param(value: str | None, name: str) -> str | None:
    if not value:
        return None
    rng = date_range(value)
    if rng is None:
        raise FhirError(400, "invalid", f"{name} must be an instant")
    return rng[0]


def _patient_of_id(resource_type: str, resource_id: str) -> str | None:
    return f"Patient/{resource_id}" if resource_type == "Patient" else None


def _patient_of_resource(resource: dict | None) -> str | None:
    if not resource:
        return None
    if resource.get("resourceType") == "Patient":
        return f"Patient/{resource.get('id')}"
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            target = normalise_reference(ref["reference"])
            if target.startswith("Patient/"):
                return target
    return None


def _compartment_param(resource_type: str, patient: str) -> tuple[str, str]:
    """The search parameter that confines `resource_type` to `patient`'s compartment."""
    if resource_type == "Patient":
        return ("_id", patient)
    path = smart.PATIENT_COMPARTMENT[resource_type][0]
    return ("patient" if path == "patient" else "subject", f"Patient/{patient}")


def _may_see(claims: dict, confine: str | None, resource: dict) -> bool:
    """An _include/_revinclude result: its type must be readable with the token's scopes, and, for a
    patient-level token, it must be in the token's compartment."""
    decision = may_read_type(claims, resource.get("resourceType", ""))
    if not decision.allowed:
        return False
    patient = decision.patient or confine
    return patient is None or smart.in_compartment(resource, patient)


def smart_configuration_document(issuer: str, oidc: dict) -> dict:
    """[base]/.well-known/smart-configuration from the issuer's OpenID configuration."""
    doc = {
        "issuer": oidc.get("issuer", issuer),
        "jwks_uri": oidc.get("jwks_uri"),
        "authorization_endpoint": oidc.get("authorization_endpoint"),
        "token_endpoint": oidc.get("token_endpoint"),
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["openid", "fhirUser", "launch/patient", "patient/*.read", "patient/*.rs",
                             "patient/Observation.rs", "patient/RiskAssessment.rs", "user/*.read", "user/*.rs",
                             "system/*.read", "system/*.rs", "system/Patient.write", "system/Encounter.write",
                             "system/Patient.cud", "system/Encounter.cud", "system/AuditEvent.rs"],
        "capabilities": ["launch-standalone", "client-public", "client-confidential-asymmetric",
                         "client-confidential-symmetric", "context-standalone-patient", "permission-patient",
                         "permission-user", "permission-v1", "permission-v2", "sso-openid-connect"],
    }
    for key in ("introspection_endpoint", "revocation_endpoint", "userinfo_endpoint"):
        if oidc.get(key):
            doc[key] = oidc[key]
    return {k: v for k, v in doc.items() if v is not None}


class HeadMiddleware:
    """HEAD on every GET interaction (read, vread, search, history, capabilities: R4 http.html says
    servers should support it, https://hl7.org/fhir/R4/http.html#general): the app answers the GET;
    the client gets its status and headers, Content-Length and ETag included, and no body. Outermost,
    so the audit trail records the interaction the GET is (the HTTP method is not part of an
    AuditEvent's interaction)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the rest of the body follows; only its end is passed on, empty
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class AuditMiddleware:
    """Records one AuditEvent per FHIR interaction (whatever its outcome) once the response has started.

    Pure ASGI (no body buffering); the event is queued in memory and written in the background."""

    def __init__(self, app, audit: AuditLog, issuer: str | None):
        self.app, self.audit, self.issuer = app, audit, issuer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            info = (scope.get("state") or {}).get("audit")
            if info is not None:
                claims = (scope.get("state") or {}).get("claims") or {}
                client = scope.get("client")
                try:
                    self.audit.record(build_audit_event(
                        interaction=info["interaction"], resource_type=info["type"] or "", status=status[0],
                        client_id=claims.get("azp") or claims.get("client_id"), subject=claims.get("sub"),
                        issuer=self.issuer, resource_id=info.get("id"), query=info.get("query"),
                        patient=info.get("patient"), address=client[0] if client else None))
                except Exception:  # auditing must never break the response
                    log.exception("cannot build an audit event")


def _patient_of_query(resource_type: str, items: list[tuple[str, str]]) -> str | None:
    for name, value in items:
        if name in ("subject", "patient") and value and "," not in value:
            return normalise_reference(value)
        if resource_type == "Patient" and name == "_id" and value and "," not in value:
            return f"Patient/{value}"
    return None


def searchset_bundle(base_url: str, resource_type: str, parsed: ParsedSearch, result: SearchResult, *,
                     stored: bool = False) -> dict:
    """A searchset Bundle (https://hl7.org/fhir/R4/bundle.html#searchset) with self/next/previous links
    that carry the snapshot, so paging stays correct while data keeps arriving.

    stored=True: a match the store handed over as its stored JSON goes into the Bundle as those bytes
    (orjson.Fragment: not decoded, not encoded again) unless _elements needs the dict; only for
    compact output (orjson writes a Fragment as is, so _pretty uses the dicts)."""
    q = parsed.query
    # urlencode(a + b) == urlencode(a) + "&" + urlencode(b): the search's own parameters are encoded once
    common = urllib.parse.urlencode([*parsed.link_params, ("_count", str(q.count))])
    snapshot = urllib.parse.quote_plus(str(result.snapshot))

    def link(relation: str, offset: int) -> dict:
        return {"relation": relation,
                "url": f"{base_url}/{resource_type}?{common}&_offset={offset}&_snapshot={snapshot}"}

    bundle: dict = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": now_instant()},
                    "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    if parsed.summary_count:
        bundle["link"] = [{"relation": "self", "url": f"{base_url}/{resource_type}?"
                           f"{urllib.parse.urlencode(parsed.link_params)}"}]
        return bundle
    links = [link("self", q.offset)]
    if q.count > 0 and result.has_more:
        links.append(link("next", q.offset + q.count))
    if q.count > 0 and q.offset > 0:
        links.append(link("previous", max(0, q.offset - q.count)))
    bundle["link"] = links
    if stored and result.raw is not None and not parsed.elements:
        entries = _stored_entries(base_url, resource_type, result.raw)
    else:
        entries = [{"fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}",
                    "resource": _subset(r, parsed.elements), "search": {"mode": "match"}} for r in result.resources]
    entries += [{"fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                 "search": {"mode": "include"}} for r in result.included]
    bundle["entry"] = entries
    if parsed.ignored:
        bundle["entry"].append({"resource": operation_outcome(
            "not-supported", "search parameters ignored (not supported): " + ", ".join(parsed.ignored),
            "warning"), "search": {"mode": "outcome"}})
    return bundle


def _stored_entries(base_url: str, resource_type: str, raw: list[bytes]) -> list[dict]:
    """Match entries around stored JSON. The store writes every body as `{"resourceType":"T","id":"I",...`
    (store._stamp, compact orjson) and a FHIR id needs no escaping ([A-Za-z0-9.-]), so the fullUrl comes
    from that head; a body that does not start so is decoded for it."""
    head = f'{{"resourceType":"{resource_type}","id":"'.encode()
    n = len(head)
    mode = {"mode": "match"}
    entries = []
    for body in raw:
        end = body.find(b'"', n) if body.startswith(head) else -1
        if end > n:
            url = f"{base_url}/{resource_type}/{body[n:end].decode()}"
        else:
            r = orjson.loads(body)
            url = f"{base_url}/{r['resourceType']}/{r['id']}"
        entries.append({"fullUrl": url, "resource": orjson.Fragment(body), "search": mode})
    return entries


def _subset(resource: dict, elements: tuple[str, ...]) -> dict:
    """_elements: the listed top-level elements plus the mandatory ones, tagged SUBSETTED."""
    if not elements:
        return resource
    keep = {"resourceType", "id", "meta", *elements}
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                                              "code": "SUBSETTED", "display": "Resource encoded in summary mode"}]
    out["meta"] = meta
    return out


def http_date(instant: str) -> str:
    """FHIR instant -> RFC 9110 HTTP-date for Last-Modified."""
    t = dt.datetime.fromisoformat(instant)
    return email.utils.format_datetime(t.astimezone(dt.UTC), usegmt=True)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FhirError)
    async def fhir_error(request: Request, exc: FhirError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = STATUS_ISSUE_CODE.get(exc.status_code, "processing")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not supported on {request.url.path}"
        return FhirJSONResponse(operation_outcome(code, detail), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return FhirJSONResponse(operation_outcome("invalid", f"invalid request: {exc.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # The route template, never the path or query (they carry patient ids: no PHI in logs).
        route = getattr(request.scope.get("route"), "path", "?")
        log.exception("unhandled error on %s %s", request.method, route)
        return FhirJSONResponse(operation_outcome("exception", "internal server error"), status_code=500)


__all__ = ["FHIR_JSON", "create_app", "http_date", "searchset_bundle"]
