{{/* Names and labels shared by every manifest of the chart. */}}
{{- define "hps.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hps.fullname" -}}
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

{{- define "hps.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hps.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hps.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "hps.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hps.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hps.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the Redis password, or "" when there is none. */}}
{{- define "hps.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else if .Values.redis.password }}
{{- printf "%s-redis" (include "hps.fullname" .) }}
{{- end }}
{{- end }}

{{- define "hps.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}

{{/* StatefulSet when each pod keeps its own RocksDB volume. */}}
{{/*
The /metrics ports, one per server process (worker i of `hps serve --processes N` serves metricsPort + i):
a YAML list of {name, port}, the first named "metrics".
*/}}
{{- define "hps.metricsPorts" -}}
{{- range $i := until (int (default 1 .Values.server.processes)) }}
- name: {{ if $i }}metrics-{{ $i }}{{ else }}metrics{{ end }}
  port: {{ add $.Values.service.metricsPort $i }}
{{- end }}
{{- end }}

{{- define "hps.statefulSet" -}}
{{- if and .Values.persistence.enabled .Values.persistence.perPod }}true{{ end }}
{{- end }}

{{/* The hps YAML config, built from values; the server reads it from /etc/hps/hps.yaml. */}}
{{- define "hps.config" -}}
{{- $server := merge (dict "address" (printf "0.0.0.0:%d" (int .Values.service.grpcPort)) "metrics_address" (printf "0.0.0.0:%d" (int .Values.service.metricsPort))) (deepCopy .Values.server) }}
{{- $volatile := deepCopy .Values.volatileDb.options }}
{{- if .Values.redis.enabled }}
{{- $_ := set $volatile "type" "redis_cluster" }}
{{- $_ := set $volatile "address" (join "," .Values.redis.addresses) }}
{{- $_ := set $volatile "user_name" .Values.redis.user }}
{{- $_ := set $volatile "tls" .Values.redis.tls }}
{{- $_ := set $volatile "num_partitions" (int .Values.redis.numPartitions) }}
{{- $_ := set $volatile "timeout_ms" (int .Values.redis.timeoutMs) }}
{{- end }}
{{- $persistent := deepCopy .Values.persistentDb.options }}
{{- if .Values.persistentDb.enabled }}
{{- $_ := set $persistent "type" "rocksdb" }}
{{- $_ := set $persistent "path" "/data/rocksdb" }}
{{- $_ := set $persistent "read_only" .Values.persistentDb.readOnly }}
{{- else }}
{{- $_ := set $persistent "type" "disabled" }}
{{- end }}
{{- $_ := include "hps.securityConfig" (dict "root" . "server" $server "volatile" $volatile) }}
{{- $config := dict "server" $server "persistent_db" $persistent "models" .Values.models }}
{{- if $volatile }}
{{- $_ := set $config "volatile_db" $volatile }}
{{- end }}
{{- if .Values.updates }}
{{- $_ := set $config "updates" .Values.updates }}
{{- end }}
{{- toYaml $config }}
{{- end }}
