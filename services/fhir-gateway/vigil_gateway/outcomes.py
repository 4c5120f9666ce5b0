"""OperationOutcome responses: every error the gateway returns is one.

https://hl7.org/fhir/R4/operationoutcome.html and https://hl7.org/fhir/R4/http.html#summary
(issue codes: https://hl7.org/fhir/R4/valueset-issue-type.html).
"""
from __future__ import annotations

import orjson
from starlette.responses import Response

FHIR_JSON = "application/fhir+json"


class FhirJSONResponse(Response):
    """orjson-serialised FHIR JSON with media type application/fhir+json."""

    media_type = FHIR_JSON

    def __init__(self, content=None, status_code: int = 200, headers=None, media_type=None, background=None,
                 *, pretty: bool = False):
        self._pretty = pretty
        super().__init__(content, status_code, headers, media_type, background)

    def render(self, content) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content, option=orjson.OPT_INDENT_2 if getattr(self, "_pretty", False) else 0)


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict:
    """An OperationOutcome with one issue (severity error unless given)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


class FhirError(Exception):
    """Raise in a handler to answer `status` with an OperationOutcome of issue `code`."""

    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None, *,
                 issues: list[dict] | None = None):
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.headers = status, code, diagnostics, headers or {}
        self.issues = issues  # several issues (validation): the OperationOutcome lists these instead

    def response(self) -> FhirJSONResponse:
        body = operation_outcome(self.code, self.diagnostics)
        if self.issues:
            body["issue"] = self.issues
        return FhirJSONResponse(body, status_code=self.status, headers=self.headers)


# HTTP status -> the closest issue type, for errors raised by the framework itself (404 route, 405...)
STATUS_ISSUE_CODE = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
    406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly",
    415: "not-supported", 422: "processing", 429: "throttled", 500: "exception", 501: "not-supported",
    503: "transient",
}
