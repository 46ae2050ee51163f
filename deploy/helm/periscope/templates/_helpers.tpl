{{/*
Names and labels, in the usual Helm shape. The release "periscope" gives
objects named "periscope", as deploy/daemonset.yaml has them.
*/}}
{{- define "periscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "periscope.fullname" -}}
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

{{- define "periscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "periscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "periscope.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "periscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "periscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "periscope.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "periscope.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
A map as an OpenTelemetry `k=v,k2=v2` list (OTEL_EXPORTER_OTLP_HEADERS,
OTEL_RESOURCE_ATTRIBUTES), keys sorted. Values are taken literally: `%`
and `,` are percent-encoded (the agent decodes them), and `$` is doubled
so that Kubernetes does not expand `$(NAME)` inside them.
*/}}
{{- define "periscope.kvList" -}}
{{- $entries := list }}
{{- range $k, $v := . }}
{{- $value := toString $v | replace "%" "%25" | replace "," "%2C" | replace "$" "$$" }}
{{- $entries = append $entries (printf "%s=%s" $k $value) }}
{{- end }}
{{- join "," $entries }}
{{- end }}

{{/*
The agent's --config file (TOML; keys as in agent/src/control/config_file.rs),
empty when no value needs it. Strings and lists are written as JSON, which
is valid TOML for them.
*/}}
{{- define "periscope.configToml" -}}
{{- $f := .Values.filter }}
{{- if .Values.disabledFeatures }}
disabled_features = {{ toJson .Values.disabledFeatures }}
{{- end }}
{{- if not (kindIs "invalid" .Values.sampleRatio) }}
{{- $r := .Values.sampleRatio | float64 }}
sample_ratio = {{ if eq $r (floor $r) }}{{ printf "%.1f" $r }}{{ else }}{{ $r }}{{ end }}
{{- end }}
{{- if .Values.phaseSpansMinDuration }}
phase_spans_min_duration = {{ toJson .Values.phaseSpansMinDuration }}
{{- end }}
{{- if or $f.includeExes $f.excludeExes $f.includePorts $f.excludePorts $f.includeCgroups }}
[filter]
{{- with $f.includeExes }}
include_exes = {{ toJson . }}
{{- end }}
{{- with $f.excludeExes }}
exclude_exes = {{ toJson . }}
{{- end }}
{{- with $f.includePorts }}
include_ports = {{ toJson . }}
{{- end }}
{{- with $f.excludePorts }}
exclude_ports = {{ toJson . }}
{{- end }}
{{- with $f.includeCgroups }}
include_cgroups = {{ toJson . }}
{{- end }}
{{- end }}
{{- end }}
