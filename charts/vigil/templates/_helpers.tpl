{{/* Chart name. */}}
{{- define "vigil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-scoped). */}}
{{- define "vigil.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vigil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels shared by every Vigil pod of this release (not the NATS subchart's pods). */}}
{{- define "vigil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vigil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vigil.labels" -}}
helm.sh/chart: {{ include "vigil.chart" . }}
{{ include "vigil.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vigil
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels for a component; call with (dict "root" $ "component" "ingest"). */}}
{{- define "vigil.componentLabels" -}}
{{ include "vigil.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "vigil.componentSelectorLabels" -}}
{{ include "vigil.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "vigil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vigil.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vigil.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Service names. */}}
{{- define "vigil.ingest.fullname" -}}{{ include "vigil.fullname" . | trunc 56 | trimSuffix "-" }}-ingest{{- end }}
{{- define "vigil.gateway.fullname" -}}{{ include "vigil.fullname" . | trunc 55 | trimSuffix "-" }}-gateway{{- end }}
{{- define "vigil.model.fullname" -}}{{ include "vigil.fullname" . | trunc 57 | trimSuffix "-" }}-model{{- end }}
{{- define "vigil.worker.fullname" -}}{{ include "vigil.fullname" . | trunc 56 | trimSuffix "-" }}-worker{{- end }}

{{/* NATS client URL (plain value; empty when it comes from a Secret). */}}
{{- define "vigil.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- $natsName := default "nats" .Values.nats.nameOverride }}
{{- $svc := printf "%s-%s" .Release.Name $natsName | trunc 63 | trimSuffix "-" }}
{{- if contains $natsName .Release.Name }}{{ $svc = .Release.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- $svc = default $svc .Values.nats.fullnameOverride }}
{{- printf "nats://%s.%s.svc:4222" $svc .Release.Namespace }}
{{- else }}
{{- .Values.externalNats.url }}
{{- end }}
{{- end }}

{{/* Common environment of every Vigil container. */}}
{{- define "vigil.natsEnv" -}}
{{- if and (not .Values.nats.enabled) .Values.externalNats.existingSecret }}
- name: VIGIL_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalNats.existingSecret }}
      key: {{ .Values.externalNats.urlKey }}
{{- else }}
- name: VIGIL_NATS_URL
  value: {{ include "vigil.natsUrl" . | quote }}
{{- end }}
- name: VIGIL_STREAM_REPLICAS
  value: {{ .Values.bus.streamReplicas | quote }}
- name: VIGIL_BUS_COMPRESSION
  value: {{ .Values.bus.compression | default "zstd" | quote }}
{{- end }}

{{- define "vigil.oidcEnv" -}}
- name: VIGIL_OIDC_ISSUER
  value: {{ .Values.keycloak.issuer | quote }}
- name: VIGIL_OIDC_AUDIENCE
  value: {{ .Values.keycloak.audience | quote }}
{{- end }}

{{/* VIGIL_DATABASE_URL (+ PGPASSWORD): see values.yaml, postgresql. */}}
{{- define "vigil.databaseEnv" -}}
{{- $pg := .Values.postgresql }}
{{- if $pg.urlKey }}
- name: VIGIL_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.urlKey }}
{{- else }}
- name: VIGIL_DATABASE_URL
  value: {{ printf "postgresql://%s@%s:%d/%s?sslmode=%s" $pg.username $pg.host (int $pg.port) $pg.database $pg.sslmode | quote }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.passwordKey }}
{{- end }}
{{- end }}

{{/* Environment that keeps Python and libraries off the read-only root filesystem. */}}
{{- define "vigil.runtimeEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}

{{/* OpenTelemetry / logging env of the Vigil services (ingest, worker, gateway); see docs/operations.md. */}}
{{- define "vigil.telemetryEnv" -}}
{{- $t := .root.Values.telemetry }}
- name: VIGIL_LOG_FORMAT
  value: {{ $t.logFormat | quote }}
{{- with $t.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if and (eq .component "gateway") .root.Values.serviceMonitor.enabled .root.Values.serviceMonitor.gateway }}
- name: OTEL_METRICS_EXPORTER
  value: {{ ternary "otlp,prometheus" "prometheus" (ne $t.otlpEndpoint "") | quote }}
{{- end }}
{{- with $t.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vigil.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "vigil.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Pod-level settings shared by all pods; call with (dict "root" $ "c" .Values.<component>). */}}
{{- define "vigil.podCommon" -}}
{{- $root := .root }}
serviceAccountName: {{ include "vigil.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.automountServiceAccountToken }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* TLS files of a component in the pod: (dict "root" $ "component" "gateway"|"ingest"). The Secret's
tls.crt and tls.key (plus ingest's client CA as client-ca.crt) in one read-only projected volume at
/etc/vigil/tls. Mode 0440 with the pod's fsGroup (the files' group), else 0444: never 0400 root-owned,
which uid 10001 could not read. */}}
{{- define "vigil.tlsMountPath" -}}/etc/vigil/tls{{- end }}
{{- define "vigil.tlsVolume" -}}
{{- $t := (index .root.Values .component).tls }}
{{- $caKey := dig "clientCaKey" "" $t }}
{{- $caSecret := dig "clientCaSecretName" "" $t | default $t.secretName -}}
- name: tls
  projected:
    defaultMode: {{ ternary 288 292 (hasKey .root.Values.podSecurityContext "fsGroup") }}
    sources:
      - secret:
          name: {{ $t.secretName }}
          items:
            - {key: tls.crt, path: tls.crt}
            - {key: tls.key, path: tls.key}
            {{- if and $caKey (eq $caSecret $t.secretName) }}
            - {key: {{ $caKey }}, path: client-ca.crt}
            {{- end }}
      {{- if and $caKey (ne $caSecret $t.secretName) }}
      - secret:
          name: {{ $caSecret }}
          items:
            - {key: {{ $caKey }}, path: client-ca.crt}
      {{- end }}
{{- end }}
{{- define "vigil.tlsMount" -}}
- name: tls
  mountPath: {{ include "vigil.tlsMountPath" . }}
  readOnly: true
{{- end }}

{{/* Fail early on configurations that cannot work. */}}
{{- define "vigil.validate" -}}
{{- if and (not .Values.nats.enabled) (not .Values.externalNats.url) (not .Values.externalNats.existingSecret) }}
{{- fail "nats.enabled=false needs externalNats.url or externalNats.existingSecret" }}
{{- end }}
{{- if and .Values.worker.enabled (gt (int .Values.worker.replicaCount) 1) (not .Values.worker.allowMultipleReplicas) }}
{{- fail "worker.replicaCount > 1: the worker keeps per-patient state in memory, so N replicas are N partitions of the patients (one Deployment each, `--partition i --partitions N`) and changing N replays the streams into new durable consumers; set worker.allowMultipleReplicas=true to confirm (docs/operations.md, Scaling)" }}
{{- end }}
{{- if and .Values.worker.enabled .Values.worker.autoscaling.enabled }}
{{- fail "worker.autoscaling.enabled: the worker's partition count is worker.replicaCount (one Deployment per partition); an HPA cannot re-partition patients, scale with worker.replicaCount (docs/operations.md, Scaling)" }}
{{- end }}
{{- range .Values.worker.extraArgs }}
{{- if hasPrefix "--partition" . }}
{{- fail (printf "worker.extraArgs %q: the chart derives --partition/--partitions from worker.replicaCount (one Deployment per partition); remove it" .) }}
{{- end }}
{{- end }}
{{- if .Values.nats.enabled }}
{{- $cluster := dig "config" "cluster" dict .Values.nats }}
{{- $servers := ternary (int (dig "replicas" 3 $cluster)) 1 (dig "enabled" false $cluster | eq true) }}
{{- if gt (int .Values.bus.streamReplicas) $servers }}
{{- fail (printf "bus.streamReplicas=%d but the bundled NATS runs %d JetStream server(s) (nats.config.cluster): the services could not create their streams; lower bus.streamReplicas (1 for a single server)" (int .Values.bus.streamReplicas) $servers) }}
{{- end }}
{{- end }}
{{- $np := .Values.networkPolicy }}
{{- if and $np.enabled .Values.gateway.enabled .Values.serviceMonitor.enabled .Values.serviceMonitor.gateway $np.ingress.gateway (not $np.ingress.monitoring) }}
{{- fail "serviceMonitor.gateway with networkPolicy.ingress.gateway peers needs networkPolicy.ingress.monitoring peers (Prometheus): the gateway serves /metrics on its API port 8080, so \"empty = anywhere\" would open the FHIR API to every pod" }}
{{- end }}
{{- if and .Values.ingest.tls.clientCaSecretName (not .Values.ingest.tls.clientCaKey) }}
{{- fail "ingest.tls.clientCaSecretName needs ingest.tls.clientCaKey (the key of the client CA bundle in it)" }}
{{- end }}
{{- if and .Values.ingest.tls.clientCaKey (not .Values.ingest.tls.secretName) }}
{{- fail "ingest.tls.clientCaKey (mTLS) needs ingest.tls.secretName (the server certificate)" }}
{{- end }}
{{- if and .Values.model.enabled (eq .Values.model.store.source "existingClaim") (not .Values.model.store.existingClaim) }}
{{- fail "model.store.source=existingClaim needs model.store.existingClaim" }}
{{- end }}
{{- end }}

{{/* NetworkPolicy peer: the pods of one component of this release. */}}
{{- define "vigil.np.fromComponent" -}}
- podSelector:
    matchLabels:
      {{- include "vigil.componentSelectorLabels" . | nindent 6 }}
{{- end }}

{{/* NetworkPolicy egress rule from (dict "ports" [...] "to" [...]); empty "to" = any destination. */}}
{{- define "vigil.np.egress" -}}
- ports:
    {{- range .ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* An Ingress to one component's Service: (dict "root" $ "component" "gateway"|"ingest" "port" <Service port
name> "paths" (list ...) "who" <who dials the host>). Host, className, annotations and tls.secretName come
from <component>.ingress; the render fails without a host. Every path is a Prefix to that port. */}}
{{- define "vigil.ingress" -}}
{{- $root := .root }}
{{- $i := (index $root.Values .component).ingress }}
{{- if not $i.host }}
{{- fail (printf "%s.ingress.enabled needs %s.ingress.host (the host name %s)" .component .component .who) }}
{{- end }}
{{- $fullname := include (printf "vigil.%s.fullname" .component) $root }}
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "vigil.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
  {{- with $i.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $i.className }}
  ingressClassName: {{ . }}
  {{- end }}
  {{- if $i.tls.secretName }}
  tls:
    - hosts: [{{ $i.host | quote }}]
      secretName: {{ $i.tls.secretName }}
  {{- end }}
  rules:
    - host: {{ $i.host | quote }}
      http:
        paths:
          {{- range $path := .paths }}
          - path: {{ $path }}
            pathType: Prefix
            backend:
              service:
                name: {{ $fullname }}
                port: {name: {{ $.port }}}
          {{- end }}
{{- end }}
