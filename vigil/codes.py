"""Code systems and fixed codes shared by every service (FHIR R4 terminology URIs)."""

LOINC = "http://loinc.org"
MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
VITAL_SIGNS_PROFILE = "http://hl7.org/fhir/StructureDefinition/vitalsigns"

# Vigil's own identifiers and code systems.
VIGIL_BASE = "https://vigil.dev/fhir"
READING_IDENTIFIER_SYSTEM = f"{VIGIL_BASE}/NamingSystem/device-reading"
DATA_QUALITY_SYSTEM = f"{VIGIL_BASE}/CodeSystem/data-quality"
PHYSIONET_PATIENT_SYSTEM = "https://physionet.org/content/challenge-2019/"

# Sepsis outcome for RiskAssessment.prediction.outcome (SNOMED CT 91302008).
SEPSIS = {"system": SNOMED, "code": "91302008", "display": "Sepsis (disorder)"}

CATEGORY_DISPLAY = {"vital-signs": "Vital Signs", "laboratory": "Laboratory"}
