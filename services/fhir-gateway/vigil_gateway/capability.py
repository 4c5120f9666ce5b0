"""The server's CapabilityStatement (https://hl7.org/fhir/R4/capabilitystatement.html,
https://hl7.org/fhir/R4/http.html#capabilities): exactly what this gateway supports."""
from __future__ import annotations

from vigil_gateway.search_params import SEARCH_PARAMS

_PARAM_DOCS = {
    "subject": ("reference", "http://hl7.org/fhir/SearchParameter/{t}-subject",
                "The subject: Patient/id or id"),
    "patient": ("reference", "http://hl7.org/fhir/SearchParameter/clinical-patient",
                "The patient: Patient/id or id"),
    "code": ("token", "http://hl7.org/fhir/SearchParameter/clinical-code",
             "system|code or code; comma-separated values are OR-ed"),
}


def capability_statement(*, base_url: str, auth_enabled: bool, software_version: str,
                         date: str) -> dict:
    resources = []
    for rtype, params in SEARCH_PARAMS.items():
        search_params = []
        for p in params:
            ptype, definition, doc = _PARAM_DOCS[p]
            search_params.append({"name": p, "definition": definition.format(t=rtype.lower()),
                                  "type": ptype, "documentation": doc})
        search_params.append({"name": "_count", "type": "number",
                              "documentation": "Page size, default 50, at most 1000"})
        resources.append({
            "type": rtype,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "versioning": "versioned",
            "readHistory": False,
            "updateCreate": False,
            "searchParam": search_params,
        })
    rest: dict = {"mode": "server", "resource": resources}
    if auth_enabled:
        rest["security"] = {
            "cors": False,
            "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                     "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                         "text": "OAuth2 bearer tokens (SMART Backend Services) from the configured issuer"}],
            "description": "Every request except /metadata needs Authorization: Bearer <access token>.",
        }
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "Vigil",
        "kind": "instance",
        "software": {"name": "Vigil FHIR gateway", "version": software_version},
        "implementation": {"description": "Vigil FHIR gateway (read-only)", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }
