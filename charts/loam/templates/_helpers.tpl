{{/*
Shared pieces of the templates: labels, images, the kubelet directory.
*/}}

{{/* The labels of every object: deploy/'s part-of, plus Helm's own. */}}
{{- define "loam.labels" -}}
app.kubernetes.io/part-of: loam
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* `image:` and, when set, `imagePullPolicy:` of one container; called with an image value. */}}
{{- define "loam.image" -}}
image: {{ printf "%s:%s" .repository .tag | quote }}
{{- with .pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* The kubelet directory without a trailing slash (values.schema.json makes it absolute). */}}
{{- define "loam.kubeletDir" -}}
{{- trimSuffix "/" .Values.kubeletDir }}
{{- end }}

{{/* The name of the Secret holding the agent token. */}}
{{- define "loam.agentTokenSecret" -}}
{{- default "loam-agent-token" .Values.agentToken.existingSecret }}
{{- end }}

{{/* Arguments every `loam serve` gets from the values: log format, metrics. */}}
{{- define "loam.serveArgs" -}}
{{- if eq .Values.logFormat "json" }}
- --log-format=json
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-listen=0.0.0.0:{{ .Values.metrics.port }}
{{- end }}
{{- end }}
