"""SMART on FHIR scopes: what a token may do, and to which patients' data.

Scopes follow SMART App Launch v1 (`patient/Observation.read`, `user/*.write`, `system/*.*`) and v2
(`patient/Observation.rs`, permissions c r u d s in that order), see
https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html . A v2 scope with query
constraints (`?category=...`) is not supported and grants nothing (fail closed).

A request is allowed when some scope covers its resource type and interaction. If only `patient/`
scopes cover it, the request is confined to the compartment of the token's `patient` claim
(https://hl7.org/fhir/R4/compartmentdefinition-patient.html).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Interaction -> SMART v2 permission letter.
INTERACTION_PERMISSION = {
    "read": "r", "vread": "r", "history-instance": "r",
    "search-type": "s", "history-type": "s", "search-system": "s",
    "create": "c", "update": "u", "patch": "u", "delete": "d",
}
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([a-z*]+)$")

# Where each resource type points at its patient (R4 Patient compartment, for the types Vigil serves).
PATIENT_COMPARTMENT = {
    "Patient": ("id",),
    "Observation": ("subject",),
    "RiskAssessment": ("subject",),
    "Encounter": ("subject",),
    "Device": ("patient",),
    "AuditEvent": ("patient",),
}


@dataclass(frozen=True, slots=True)
class Scope:
    level: str  # patient | user | system
    resource_type: str  # a type or *
    permissions: str  # subset of "cruds"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    patient: str | None = None  # set: confine the request to this patient's compartment
    reason: str = ""


def parse_scope(text: str) -> Scope | None:
    """One scope string, or None for scopes that grant no FHIR access (openid, launch, constrained...)."""
    if "?" in text:
        return None
    m = _SCOPE.match(text)
    if not m:
        return None
    level, rtype, perms = m.groups()
    if perms in V1_PERMISSIONS:
        return Scope(level, rtype, V1_PERMISSIONS[perms])
    if re.fullmatch(r"c?r?u?d?s?", perms) and perms:
        return Scope(level, rtype, perms)
    return None


def parse_scopes(claim: str | list[str] | None) -> list[Scope]:
    items = claim.split() if isinstance(claim, str) else list(claim or [])
    return [s for s in (parse_scope(t) for t in items) if s is not None]


def decide(scopes: list[Scope], resource_type: str, interaction: str, patient_claim: str | None) -> Decision:
    """May a token with `scopes` do `interaction` on `resource_type`?"""
    letter = INTERACTION_PERMISSION.get(interaction)
    if letter is None:
        return Decision(False, reason=f"unknown interaction {interaction}")
    covering = [s for s in scopes if s.resource_type in ("*", resource_type) and letter in s.permissions]
    if any(s.level in ("system", "user") for s in covering):
        return Decision(True)
    if covering:
        if not patient_claim:
            return Decision(False, reason="patient-level scope without a patient in the launch context")
        if resource_type not in PATIENT_COMPARTMENT:
            return Decision(False, reason=f"{resource_type} is not in the Patient compartment")
        return Decision(True, patient=patient_claim)
    needed = f"{resource_type}.{letter}"
    return Decision(False, reason=f"no scope grants {needed} (e.g. system/{needed} or patient/{needed})")


def patient_of(resource: dict) -> str | None:
    """The patient id a resource belongs to (its Patient compartment), or None."""
    rtype = resource.get("resourceType")
    for path in PATIENT_COMPARTMENT.get(rtype, ()):
        if path == "id":
            return resource.get("id")
        ref = (resource.get(path) or {}).get("reference", "")
        if ref.startswith("Patient/"):
            return ref.split("/", 1)[1].split("/_history", 1)[0]
    return None


def in_compartment(resource: dict, patient: str) -> bool:
    return patient_of(resource) == patient
