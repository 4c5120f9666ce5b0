{{/*
Probes. The defaults live here, not in values.yaml: Helm deep-merges user values into the chart's
values, so a default `tcpSocket` in values.yaml plus a user's `grpc` would give a probe with two handlers,
which Kubernetes rejects. values.yaml has {} for every probe; "vigil.probes" picks, per probe:
  - {} or unset: the default below (none for the worker);
  - a value with a handler (exec, httpGet, tcpSocket, grpc): that value as given, nothing of the default;
  - a value without a handler: merged over the default (timings only; its handler is kept);
  - {enabled: false}: no probe.
*/}}

{{/* Default probes of ingest: gRPC health for startup/readiness, TCP for liveness (see values.yaml).
With ingest.tls the gRPC probes go to the plaintext health-only listener on 50052
(VIGIL_GRPC_HEALTH_LISTEN): the kubelet's gRPC probe cannot dial TLS. */}}
{{- define "vigil.probes.ingest" -}}
{{- $port := ternary 50052 50051 (ne .Values.ingest.tls.secretName "") }}
startupProbe:
  grpc: {port: {{ $port }}}
  periodSeconds: 5
  failureThreshold: 24
livenessProbe:
  tcpSocket: {port: grpc}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  grpc: {port: {{ $port }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{- define "vigil.probes.gateway" -}}
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 5
  failureThreshold: 24
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{- define "vigil.probes.model" -}}
startupProbe:
  httpGet: {path: /livez, port: http}
  periodSeconds: 5
  failureThreshold: 36
livenessProbe:
  httpGet: {path: /livez, port: http}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{- define "vigil.probes.worker" -}}
startupProbe:
  httpGet: {path: /healthz, port: health}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: health}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: health}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/*
The probes of one container; call with (dict "root" $ "component" "ingest").
With gateway or model TLS an httpGet probe that sets no scheme gets scheme HTTPS; with ingest TLS a gRPC probe
goes to the plaintext health port 50052, or else must be grpc.mode TLS (Kubernetes >= 1.37, alpha), and
with mTLS only the health port can be probed over gRPC (the kubelet has no client certificate).
*/}}
{{- define "vigil.probes" -}}
{{- $root := .root }}
{{- $name := .component }}
{{- $c := index $root.Values $name }}
{{- $defaults := fromYaml (include (printf "vigil.probes.%s" $name) $root) | default dict }}
{{- $handlers := list "exec" "httpGet" "tcpSocket" "grpc" }}
{{- $httpsOn := and (has $name (list "gateway" "model")) (ne $c.tls.secretName "") }}
{{- $grpcTls := and (eq $name "ingest") (ne $c.tls.secretName "") }}
{{- range $kind := list "startupProbe" "livenessProbe" "readinessProbe" }}
{{- $raw := index $c $kind | default dict }}
{{- if not (and (hasKey $raw "enabled") (not $raw.enabled)) }}
{{- /* The user's keys without `enabled` and without null values (`tcpSocket: null`, the old workaround). */}}
{{- $user := dict }}
{{- range $k, $v := $raw }}
{{- if and (ne $k "enabled") (not (kindIs "invalid" $v)) }}{{ $_ := set $user $k $v }}{{ end }}
{{- end }}
{{- $given := list }}
{{- range $h := $handlers }}{{ if hasKey $user $h }}{{ $given = append $given $h }}{{ end }}{{ end }}
{{- if gt (len $given) 1 }}
{{- fail (printf "%s.%s sets %s: a probe takes exactly one handler (exec, httpGet, tcpSocket or grpc)" $name $kind (join ", " $given)) }}
{{- end }}
{{- $probe := deepCopy $user }}
{{- if not $given }}
{{- $probe = merge $probe (deepCopy (index $defaults $kind | default dict)) }}
{{- end }}
{{- if $probe }}
{{- $handler := "" }}
{{- range $h := $handlers }}{{ if hasKey $probe $h }}{{ $handler = $h }}{{ end }}{{ end }}
{{- if not $handler }}
{{- fail (printf "%s.%s has no handler: give one of exec, httpGet, tcpSocket, grpc (the %s has no default %s)" $name $kind $name $kind) }}
{{- end }}
{{- if and $httpsOn (eq $handler "httpGet") (not (hasKey $probe.httpGet "scheme")) }}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- if and $grpcTls (eq $handler "grpc") (ne (toString (dig "port" "" $probe.grpc)) "50052") }}
{{- if $c.tls.clientCaKey }}
{{- fail (printf "ingest.%s is a gRPC probe but ingest.tls.clientCaKey requires client certificates (mTLS), which the kubelet cannot present: probe the plaintext health port (grpc.port 50052) or use tcpSocket" $kind) }}
{{- else if ne (toString (dig "mode" "" $probe.grpc)) "TLS" }}
{{- fail (printf "ingest.%s is a gRPC probe but ingest.tls is on and the kubelet's gRPC probe dials plaintext: probe the health port (grpc.port 50052), use tcpSocket, or grpc.mode: TLS (Kubernetes >= 1.37 with the feature gate GRPCContainerProbeTLS)" $kind) }}
{{- end }}
{{- end }}
{{ $kind }}:
  {{- toYaml $probe | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
