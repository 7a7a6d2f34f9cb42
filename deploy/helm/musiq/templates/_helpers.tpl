{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "musiq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "musiq.fullname" -}}
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

{{- define "musiq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "musiq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "musiq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "musiq.labels" -}}
helm.sh/chart: {{ include "musiq.chart" . }}
{{ include "musiq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: musiq
{{- end }}

{{- define "musiq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "musiq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference; the tag defaults to <appVersion>-<flavor>. */}}
{{- define "musiq.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) .Values.image.tag }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: use a versioned tag, not latest" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* MUSIQ_MODELS: a JSON list of the model files under models.mountPath. */}}
{{- define "musiq.modelPaths" -}}
{{- $paths := list }}
{{- range .Values.models.files }}
{{- $paths = append $paths (printf "%s/%s" (trimSuffix "/" $.Values.models.mountPath) .) }}
{{- end }}
{{- toJson $paths }}
{{- end }}
