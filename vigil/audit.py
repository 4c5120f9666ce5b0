"""AuditEvent for every FHIR read, search and write (R4 AuditEvent, after IHE Basic Audit Log Patterns).

https://hl7.org/fhir/R4/auditevent.html ; BALP: https://profiles.ihe.net/ITI/BALP/ . One AuditEvent per
REST interaction: who (the token's client and subject), what (the resource or the query), the patient
when known, when, and the outcome. AuditEvents are stored like other resources (searchable by an admin),
never written to logs, so no PHI reaches the logs.
"""
from __future__ import annotations

import base64
import datetime as dt

from vigil.ids import time_ordered_id

AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ACTION = {"read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "search-type": "E",
          "create": "C", "update": "U", "patch": "U", "delete": "D"}
# R4 AuditEvent.outcome: 0 success, 4 minor failure (client error), 8 serious failure (server error)
OUTCOME = {2: "0", 3: "0", 4: "4", 5: "8"}


def build_audit_event(
    *, interaction: str, resource_type: str, status: int, client_id: str | None, subject: str | None,
    issuer: str | None, resource_id: str | None = None, query: str | None = None,
    patient: str | None = None, source: str = "vigil-fhir-gateway", address: str | None = None,
    now: dt.datetime | None = None,
) -> dict:
    now = now or dt.datetime.now(dt.UTC)
    who: dict = {"display": client_id or "anonymous"}
    if client_id:
        who["identifier"] = {"system": issuer or "urn:vigil:no-issuer", "value": client_id}
    agent: dict = {
        "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153",
                             "display": "Source Role ID"}]},
        "who": who, "requestor": True,
    }
    if subject:
        agent["altId"] = subject
    if address:
        agent["network"] = {"address": address, "type": "2"}
    entities: list[dict] = []
    if resource_id:
        entities.append({"what": {"reference": f"{resource_type}/{resource_id}"},
                         "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}})
    if query is not None:
        entities.append({"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                         "description": resource_type,
                         "query": base64.b64encode(query.encode()).decode()})
    if patient:
        entities.append({"what": {"reference": f"Patient/{patient}"},
                         "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                         "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}})
    event = {
        "resourceType": "AuditEvent",
        "id": time_ordered_id(int(now.timestamp() * 1000)),  # appended in time order
        "type": {"system": AUDIT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": RESTFUL, "code": interaction}],
        "action": ACTION.get(interaction, "E"),
        "recorded": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": OUTCOME.get(status // 100, "8"),
        "agent": [agent],
        "source": {"observer": {"display": source},
                   "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}]},
    }
    if status >= 400:
        event["outcomeDesc"] = f"HTTP {status}"
    if entities:
        event["entity"] = entities
    return event
