// Reads, searches and pages a Vigil FHIR gateway with the unmodified fhir-kit-client.
// usage: node check.mjs <baseUrl> <patientId> <codeToken> [bearerToken]; prints one JSON line.
import { Client } from 'fhir-kit-client';

const [baseUrl, patientId, code, token] = process.argv.slice(2);
const client = new Client({ baseUrl, ...(token ? { bearerToken: token } : {}) });

const cs = await client.capabilityStatement();
const patient = await client.read({ resourceType: 'Patient', id: patientId });
const first = await client.search({
  resourceType: 'Observation',
  searchParams: { subject: `Patient/${patientId}`, code, _count: 3 },
});
const ids = (first.entry || []).map((e) => e.resource.id);
let page = first;
let last = first;
let pages = 1;
while ((page = await client.nextPage({ bundle: page }))) {
  ids.push(...(page.entry || []).map((e) => e.resource.id));
  last = page;
  pages += 1;
}
const prev = await client.prevPage({ bundle: last });
console.log(JSON.stringify({
  fhirVersion: cs.fhirVersion,
  patient: { id: patient.id, gender: patient.gender, versionId: patient.meta.versionId },
  total: first.total,
  pages,
  ids,
  previousCount: prev ? (prev.entry || []).length : null,
}));
