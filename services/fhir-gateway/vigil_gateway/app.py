"""The FHIR R4 REST API (read-only): metadata, read and search-type for Observation and RiskAssessment.

https://hl7.org/fhir/R4/http.html (RESTful API), https://hl7.org/fhir/R4/search.html (search),
https://hl7.org/fhir/R4/bundle.html (searchset Bundles). Responses are application/fhir+json built
with orjson from the stored JSON (no per-resource models). Every error is an OperationOutcome
(https://hl7.org/fhir/R4/operationoutcome.html), including unknown routes (404), wrong methods (405)
and unexpected failures (500).
"""
from __future__ import annotations

import datetime as dt
import email.utils
import logging
import urllib.parse
import uuid
from typing import Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vigil.ids import is_fhir_id
from vigil.settings import Settings
from vigil.tokens import TokenValidator
from vigil_gateway.auth import authenticate
from vigil_gateway.capability import capability_statement
from vigil_gateway.outcomes import STATUS_ISSUE_CODE, FhirError, FhirJSONResponse, operation_outcome
from vigil_gateway.search_params import SEARCH_PARAMS, SearchQuery, parse_search
from vigil_gateway.store import Store, now_instant

log = logging.getLogger("vigil.gateway")
SOFTWARE_VERSION = "0.1.0"
SUPPORTED_TYPES = tuple(SEARCH_PARAMS)


class ConsumerHealth(Protocol):
    @property
    def running(self) -> bool: ...


def create_app(settings: Settings, store: Store, validator: TokenValidator | None, *,
               consumer: ConsumerHealth | None = None) -> FastAPI:
    """The gateway ASGI app. `validator` None means auth is off (the caller decides);
    `consumer`, when given, is part of /readyz."""
    base = "/" + settings.fhir_base_path.strip("/")
    base_url = settings.fhir_base_url
    app = FastAPI(title="Vigil FHIR gateway", version=SOFTWARE_VERSION, docs_url=None, redoc_url=None,
                  openapi_url=None, default_response_class=FhirJSONResponse)
    app.state.settings, app.state.store, app.state.validator = settings, store, validator
    _install_error_handlers(app)

    async def require_token(request: Request) -> dict | None:
        if validator is None:
            return None
        claims = await authenticate(request, validator)
        request.state.claims = claims
        return claims

    started = now_instant()

    @app.get(f"{base}/metadata")
    async def metadata() -> Response:
        """capabilities interaction: https://hl7.org/fhir/R4/http.html#capabilities (no token needed)."""
        return FhirJSONResponse(capability_statement(base_url=base_url, auth_enabled=validator is not None,
                                                     software_version=SOFTWARE_VERSION, date=started))

    @app.get(f"{base}/{{resource_type}}", dependencies=[Depends(require_token)])
    async def search_type(resource_type: str, request: Request) -> Response:
        """search-type interaction: https://hl7.org/fhir/R4/http.html#search,
        answered with a searchset Bundle (https://hl7.org/fhir/R4/bundle.html#searchset)."""
        _check_type(resource_type)
        query = parse_search(resource_type, request.query_params.multi_items())
        if query.contradictory:
            total, resources = 0, []
        else:
            total, resources = await run_in_threadpool(
                store.search, resource_type, subject=query.subject, code=list(query.code) or None,
                count=query.count, offset=query.offset)
        return FhirJSONResponse(searchset_bundle(base_url, resource_type, query, total, resources))

    @app.get(f"{base}/{{resource_type}}/{{resource_id}}", dependencies=[Depends(require_token)])
    async def read(resource_type: str, resource_id: str, request: Request) -> Response:
        """read interaction: https://hl7.org/fhir/R4/http.html#read (ETag, Last-Modified, 404)."""
        _check_type(resource_type)
        if not is_fhir_id(resource_id):
            raise FhirError(404, "not-found", f"{resource_id!r} is not a valid FHIR id")
        resource = await run_in_threadpool(store.read, resource_type, resource_id)
        if resource is None:
            raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
        meta = resource.get("meta") or {}
        etag = f'W/"{meta.get("versionId", "1")}"'
        headers = {"ETag": etag}
        if meta.get("lastUpdated"):
            headers["Last-Modified"] = http_date(meta["lastUpdated"])
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return FhirJSONResponse(resource, headers=headers)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        """Liveness: the process serves HTTP."""
        return FhirJSONResponse({"status": "ok"}, media_type="application/json")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Readiness: the store answers and (when wired) the bus consumer runs."""
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


def _check_type(resource_type: str) -> None:
    if resource_type not in SUPPORTED_TYPES:
        raise FhirError(404, "not-supported",
                        f"resource type {resource_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")


def searchset_bundle(base_url: str, resource_type: str, query: SearchQuery, total: int,
                     resources: list[dict]) -> dict:
    """A searchset Bundle with total, self/next/previous links and entries in search mode `match`
    (https://hl7.org/fhir/R4/search.html#paging, https://hl7.org/fhir/R4/bundle.html)."""
    def link(relation: str, offset: int) -> dict:
        qs = urllib.parse.urlencode(query.link_params(offset=offset))
        return {"relation": relation, "url": f"{base_url}/{resource_type}?{qs}"}

    links = [link("self", query.offset)]
    if query.count > 0 and query.offset + query.count < total:
        links.append(link("next", query.offset + query.count))
    if query.count > 0 and query.offset > 0:
        links.append(link("previous", max(0, query.offset - query.count)))
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now_instant()},
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [{"fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in resources],
    }


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
            detail = f"{request.method} is not supported on {request.url.path} (this server is read-only)"
        return FhirJSONResponse(operation_outcome(code, detail), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return FhirJSONResponse(operation_outcome("invalid", f"invalid request: {exc.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return FhirJSONResponse(operation_outcome("exception", "internal server error"), status_code=500)
