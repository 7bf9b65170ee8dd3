{{/* The chart's name. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, with the chart name unless it holds it. */}}
{{- define "outbox-relay.fullname" -}}
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

{{/* Labels of every object. */}}
{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of every pod: the selector labels and commonLabels. */}}
{{- define "outbox-relay.podLabels" -}}
{{ include "outbox-relay.selectorLabels" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the relay pods (the component keeps the migration Job's pods out). */}}
{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The relay's Secret. */}}
{{- define "outbox-relay.secretName" -}}
{{- default (include "outbox-relay.fullname" .) .Values.secret.name }}
{{- end }}

{{/* The service account of the relay pods. */}}
{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: [global.imageRegistry/]repository:tag[@digest], the tag
defaulting to the chart's appVersion. With a digest the kubelet pulls by
digest; the tag stays for people reading the manifest.
*/}}
{{- define "outbox-relay.image" -}}
{{- $repository := .Values.image.repository }}
{{- with (.Values.global | default dict).imageRegistry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- $ref := printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- with .Values.image.digest }}
{{- $ref = printf "%s@%s" $ref . }}
{{- end }}
{{- $ref }}
{{- end }}

{{/*
A value of .Values.config as an environment variable's string: YAML numbers
reach templates as float64, which would print as 1e+06; integers print as
integers.
*/}}
{{- define "outbox-relay.envString" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
true when the migration Job needs the chart's hook Secret for its URL:
migration.databaseURL is given, or the relay's own URL is to be used
(migration.useRelaySecret) and the chart creates that Secret, which exists
only after the pre-install hooks.
*/}}
{{- define "outbox-relay.migrationHookSecret" -}}
{{- if and .Values.migration.enabled (not .Values.migration.secretName) (or .Values.migration.databaseURL (and .Values.migration.useRelaySecret .Values.secret.create)) }}true{{ end }}
{{- end }}

{{/*
The Secret whose OUTBOX_DATABASE_URL the migration uses: migration.secretName;
else the hook Secret (migration.databaseURL); else, with
migration.useRelaySecret, the relay's; else <fullname>-admin, which the user
creates with the admin role's URL (README, "PostgreSQL permissions": the
relay role may not CREATE, so `migrate up` with its URL fails).
*/}}
{{- define "outbox-relay.migrationSecretName" -}}
{{- if .Values.migration.secretName }}
{{- .Values.migration.secretName }}
{{- else if eq (include "outbox-relay.migrationHookSecret" .) "true" }}
{{- printf "%s-migrate" (include "outbox-relay.fullname" .) }}
{{- else if .Values.migration.useRelaySecret }}
{{- include "outbox-relay.secretName" . }}
{{- else }}
{{- printf "%s-admin" (include "outbox-relay.fullname" .) }}
{{- end }}
{{- end }}

{{/* The pod-level settings the relay and the migration share. */}}
{{- define "outbox-relay.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.extraVolumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A Go duration (config.OUTBOX_SHUTDOWN_TIMEOUT: "30s", "1m30s", "1500ms",
"0") in seconds, as a float; values.schema.json has checked its form.
*/}}
{{- define "outbox-relay.durationSeconds" -}}
{{- $s := toString . }}
{{- $total := 0.0 }}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h)" $s -1 }}
{{- $unit := regexFind "(ns|us|µs|ms|s|m|h)$" . }}
{{- $number := trimSuffix $unit . | float64 }}
{{- $total = addf $total (mulf $number (get $units $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
The relay pods' terminationGracePeriodSeconds: above OUTBOX_SHUTDOWN_TIMEOUT,
so that a stopping relay finishes its transaction and releases its shards
before SIGKILL. Unset: the timeout rounded up, plus 15 seconds; set to a
value not above it: the render fails.
*/}}
{{- define "outbox-relay.terminationGracePeriodSeconds" -}}
{{- $shutdown := .Values.config.OUTBOX_SHUTDOWN_TIMEOUT | default "30s" | toString }}
{{- $seconds := include "outbox-relay.durationSeconds" $shutdown | float64 }}
{{- $grace := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- add (ceil $seconds | int64) 15 }}
{{- else if le (float64 $grace) $seconds }}
{{- fail (printf "terminationGracePeriodSeconds %v does not exceed config.OUTBOX_SHUTDOWN_TIMEOUT %s: the kubelet would kill a stopping relay in the middle of its transaction; raise it above %v seconds, or leave it unset (null) to derive it" (include "outbox-relay.envString" $grace) $shutdown $seconds) }}
{{- else }}
{{- include "outbox-relay.envString" $grace }}
{{- end }}
{{- end }}

{{/*
"true" when the SASL mechanism takes a user and password from the Secret
(PLAIN, SCRAM); AWS_MSK_IAM and OAUTHBEARER take none.
*/}}
{{- define "outbox-relay.saslPassword" -}}
{{- $m := upper (.Values.config.OUTBOX_KAFKA_SASL_MECHANISM | default "") -}}
{{- if has $m (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512") }}true{{ end -}}
{{- end }}

{{/*
"true" when OAUTHBEARER's client secret comes from the Secret: the token
endpoint is set and no client secret file is.
*/}}
{{- define "outbox-relay.oauthClientSecret" -}}
{{- $c := .Values.config -}}
{{- if and (eq (upper ($c.OUTBOX_KAFKA_SASL_MECHANISM | default "")) "OAUTHBEARER") $c.OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL (not $c.OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE) }}true{{ end -}}
{{- end }}
