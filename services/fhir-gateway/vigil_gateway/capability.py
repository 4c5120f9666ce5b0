"""The server's CapabilityStatement (https://hl7.org/fhir/R4/capabilitystatement.html,
https://hl7.org/fhir/R4/http.html#capabilities): exactly what this gateway supports."""
from __future__ import annotations

from vigil_gateway.fhirindex import SEARCH_PARAMS, WRITABLE_TYPES

_COMMON = [
    {"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token",
     "documentation": "Logical id; comma = OR; :missing"},
    {"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
     "type": "date", "documentation": "meta.lastUpdated; prefixes eq ne lt gt le ge sa eb ap, partial dates"},
]
_DOCS = {
    "token": "system|code, code, |code or system|; comma = OR; modifiers :missing, :not",
    "reference": "Type/id or id; comma = OR; modifiers :missing and :[type]",
    "date": "prefixes eq ne lt gt le ge sa eb ap; partial dates (YYYY, YYYY-MM, YYYY-MM-DD); :missing",
    "string": "starts with, case and accent insensitive; modifiers :exact, :contains, :missing",
    "number": "prefixes eq ne lt gt le ge sa eb ap; eq/ne/ap use the value's precision (0.5 = [0.45, 0.55)); "
              ":missing",
    "quantity": "[prefix]number, [prefix]number|system|code or [prefix]number||code (code or unit); "
                "no unit conversion; comma = OR; :missing",
}


def capability_statement(*, base_url: str, auth_enabled: bool, software_version: str, date: str) -> dict:
    resources = []
    for rtype, params in SEARCH_PARAMS.items():
        interactions = ["read", "vread", "history-instance", "history-type", "search-type"]
        if rtype in WRITABLE_TYPES:
            interactions += ["create", "update"]
        includes = [f"{rtype}:{p.name}" for p in params.values() if p.kind == "reference"]
        revincludes = [f"{src}:{p.name}" for src, ps in SEARCH_PARAMS.items() for p in ps.values()
                       if p.kind == "reference" and rtype in p.targets]
        entry = {
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": c} for c in interactions],
            # If-Match on update is only meaningful where there is an update
            "versioning": "versioned-update" if rtype in WRITABLE_TYPES else "versioned",
            "readHistory": True,
            "updateCreate": rtype in WRITABLE_TYPES,
            "conditionalCreate": rtype in WRITABLE_TYPES,
            "conditionalRead": "full-support",  # read answers If-None-Match and If-Modified-Since with 304
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchInclude": includes,
            "searchRevInclude": revincludes,
            "searchParam": _COMMON + [{"name": p.name, "definition": p.definition, "type": p.kind,
                                       "documentation": _DOCS[p.kind]} for p in params.values()],
        }
        resources.append(entry)
    rest: dict = {
        "mode": "server",
        "documentation": "Search result parameters: _sort (_id, _lastUpdated, date; several keys; - = "
                         "descending), _count (default 50, max 1000), _total (none|estimate|accurate), "
                         "_summary=count, _elements, _include, _revinclude. Unknown parameters are ignored "
                         "unless Prefer: handling=strict. Paging links carry a snapshot (_snapshot).",
        "resource": resources,
    }
    if auth_enabled:
        rest["security"] = {
            "cors": False,
            "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                     "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                         "text": "OAuth2 bearer tokens (SMART App Launch 2 and Backend Services) from the "
                                 "configured issuer; endpoints in [base]/.well-known/smart-configuration"}],
            "description": "Every request except /metadata and /.well-known/smart-configuration needs "
                           "Authorization: Bearer <access token> with SMART scopes covering the interaction; "
                           "patient/ scopes are confined to the token's patient. AuditEvents (search only) "
                           "need system/AuditEvent.rs. See docs/security.md.",
        }
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "Vigil",
        "kind": "instance",
        "software": {"name": "Vigil FHIR gateway", "version": software_version},
        "implementation": {"description": "Vigil FHIR gateway", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }
