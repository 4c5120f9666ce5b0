"""AuditEvent construction: valid R4 (fhir.resources R4B), who/what/patient/outcome recorded."""
import base64
import datetime as dt
import uuid

from fhir.resources.R4B.auditevent import AuditEvent

from vigil.audit import build_audit_event
from vigil.ids import is_fhir_id


def test_read_event_names_client_resource_and_patient():
    ev = build_audit_event(interaction="read", resource_type="Observation", resource_id="o1", status=200,
                           client_id="vigil-ehr", subject="sa-1", issuer="https://kc/realms/vigil",
                           patient="p1", address="127.0.0.1")
    AuditEvent.model_validate(ev)
    assert ev["action"] == "R" and ev["outcome"] == "0"
    assert ev["agent"][0]["who"]["identifier"]["value"] == "vigil-ehr"
    refs = [e["what"]["reference"] for e in ev["entity"] if "what" in e]
    assert refs == ["Observation/o1", "Patient/p1"]


def test_search_event_carries_the_query_and_a_refusal_is_a_failure():
    ev = build_audit_event(interaction="search-type", resource_type="Observation", status=403,
                           client_id="app", subject=None, issuer=None, query="subject=p2&code=8867-4")
    AuditEvent.model_validate(ev)
    assert ev["outcome"] == "4" and ev["outcomeDesc"] == "HTTP 403"
    (query,) = [e for e in ev["entity"] if "query" in e]
    assert base64.b64decode(query["query"]).decode() == "subject=p2&code=8867-4"


def test_server_error_and_anonymous():
    ev = build_audit_event(interaction="create", resource_type="Patient", status=500, client_id=None,
                           subject=None, issuer=None)
    AuditEvent.model_validate(ev)
    assert ev["outcome"] == "8" and ev["action"] == "C" and ev["agent"][0]["who"] == {"display": "anonymous"}


def test_event_ids_are_uuid7_in_the_order_of_recorded():
    """AuditEvent ids are time-ordered (UUID version 7 of `recorded`): the trail's primary-key index is
    appended at its end, not written at random places, however long the trail grows."""
    t0 = dt.datetime(2026, 12, 3, 8, 0, tzinfo=dt.UTC)
    events = [build_audit_event(interaction="read", resource_type="Observation", status=200, client_id=None,
                                subject=None, issuer=None,
                                now=t0 + dt.timedelta(milliseconds=i)) for i in range(0, 3000, 7)]
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids) and all(is_fhir_id(i) for i in ids)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)  # one millisecond apart or more: strictly in time order
    assert int(uuid.UUID(ids[0]).hex[:12], 16) == int(t0.timestamp() * 1000)
