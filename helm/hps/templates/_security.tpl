{{/*
Security settings built from values: server TLS/mTLS, bearer tokens, Redis TLS. Secrets are mounted as
whole folders (no subPath), so certificates and tokens renewed in their Secret reach the running pods.
*/}}

{{- define "hps.tlsDir" -}}/etc/hps-tls{{- end }}
{{- define "hps.clientCADir" -}}/etc/hps-client-ca{{- end }}
{{- define "hps.authDir" -}}/etc/hps-auth{{- end }}
{{- define "hps.redisTlsDir" -}}/etc/hps-redis-tls{{- end }}

{{/* Where the client CA lives: its own Secret's folder, or the server certificate's. */}}
{{- define "hps.clientCAFile" -}}
{{- if .Values.tls.clientCA.secretName }}{{ include "hps.clientCADir" . }}/ca.crt{{ else }}{{ include "hps.tlsDir" . }}/ca.crt{{ end }}
{{- end }}

{{/* Adds the security keys to the config's server and volatile_db sections (dicts taken by reference). */}}
{{- define "hps.securityConfig" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" (include "hps.tlsDir" .root)) "key_file" (printf "%s/tls.key" (include "hps.tlsDir" .root)) }}
{{- if $v.tls.clientCA.enabled }}
{{- $_ := set $tls "client_ca_file" (include "hps.clientCAFile" .root) }}
{{- end }}
{{- $_ := set .server "tls" $tls }}
{{- end }}
{{- if $v.auth.enabled }}
{{- $_ := set .server "auth" (dict "tokens_file" (printf "%s/%s" (include "hps.authDir" .root) $v.auth.tokensSecretKey)) }}
{{- end }}
{{- if and $v.redis.enabled $v.redis.tls }}
{{- $_ := set .volatile "tls_check_hostname" $v.redis.tlsCheckHostname }}
{{- if $v.redis.tlsSecretName }}
{{- $_ := set .volatile "tls_ca_file" (printf "%s/ca.crt" (include "hps.redisTlsDir" .root)) }}
{{- if $v.redis.tlsClientCert }}
{{- $_ := set .volatile "tls_cert_file" (printf "%s/tls.crt" (include "hps.redisTlsDir" .root)) }}
{{- $_ := set .volatile "tls_key_file" (printf "%s/tls.key" (include "hps.redisTlsDir" .root)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* volumeMounts of the Secrets above, for every container that reads the hps config. */}}
{{- define "hps.securityVolumeMounts" -}}
{{- if .Values.tls.enabled }}
- name: server-tls
  mountPath: {{ include "hps.tlsDir" . }}
  readOnly: true
{{- if and .Values.tls.clientCA.enabled .Values.tls.clientCA.secretName }}
- name: client-ca
  mountPath: {{ include "hps.clientCADir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth-tokens
  mountPath: {{ include "hps.authDir" . }}
  readOnly: true
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.tls .Values.redis.tlsSecretName }}
- name: redis-tls
  mountPath: {{ include "hps.redisTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "hps.securityVolumes" -}}
{{- if .Values.tls.enabled }}
- name: server-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- if and .Values.tls.clientCA.enabled .Values.tls.clientCA.secretName }}
- name: client-ca
  secret:
    secretName: {{ .Values.tls.clientCA.secretName }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth-tokens
  secret:
    secretName: {{ .Values.auth.tokensSecretName }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.tokensSecretKey }}
        path: {{ .Values.auth.tokensSecretKey }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.tls .Values.redis.tlsSecretName }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tlsSecretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
The probes: native gRPC while the server speaks plaintext; with TLS an exec probe (Kubernetes' gRPC probes
speak no TLS) that dials 127.0.0.1, checks the certificate against the CA in the TLS Secret's ca.crt under
the name tls.serverName (default: the Service's <name>.<namespace>.svc), and shows the server's own
certificate where client certificates are required.
*/}}
{{- define "hps.probeAction" -}}
{{- if .Values.tls.enabled }}
{{- $dir := include "hps.tlsDir" . }}
{{- $args := list "python" "-m" "hps_server.healthcheck" (printf "127.0.0.1:%d" (int .Values.service.grpcPort)) "--tls-ca-file" (printf "%s/ca.crt" $dir) }}
{{- $name := .Values.tls.serverName | default (printf "%s.%s.svc" (include "hps.fullname" .) .Release.Namespace) }}
{{- $args = concat $args (list "--tls-server-name" $name) }}
{{- if .Values.tls.clientCA.enabled }}
{{- $args = concat $args (list "--tls-cert-file" (printf "%s/tls.crt" $dir) "--tls-key-file" (printf "%s/tls.key" $dir)) }}
{{- end }}
exec:
  command:
    {{- toYaml $args | nindent 4 }}
timeoutSeconds: 5
{{- else }}
grpc:
  port: {{ .Values.service.grpcPort }}
{{- end }}
{{- end }}
