{{/*
Chart name, cut to 63 characters (a DNS label).
*/}}
{{- define "preshard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or the release name when it already contains the chart
name. Cut to 52 characters so suffixed names ("-metrics", "-cluster") stay within 63.
*/}}
{{- define "preshard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "preshard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the operator pod (never change after the first install: a
Deployment's selector is immutable).
*/}}
{{- define "preshard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "preshard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Standard labels. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "preshard.labels" -}}
app.kubernetes.io/name: {{ include "preshard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: preshard
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "preshard.chart" .ctx }}
{{- end }}

{{/*
Operator ServiceAccount name.
*/}}
{{- define "preshard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "preshard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"repository:tag" or "repository@digest" of an image values block. Call with
(dict "image" .Values.image "ctx" $).
*/}}
{{- define "preshard.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Namespaces that get the converter ServiceAccount, as a JSON list.
*/}}
{{- define "preshard.converterNamespaces" -}}
{{- $sa := .Values.converter.serviceAccount }}
{{- if $sa.namespaces }}
{{- toJson $sa.namespaces }}
{{- else if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
kopf's liveness endpoint, passed as --liveness and probed by the kubelet.
*/}}
{{- define "preshard.livenessURL" -}}
{{- printf "http://0.0.0.0:%d/healthz" (int .Values.probes.port) }}
{{- end }}

{{/*
The Secret existence check in effect: rbac.secretCheck, with "auto" meaning metadata when
the operator watches listed namespaces and off when it watches all of them.
*/}}
{{- define "preshard.secretCheck" -}}
{{- $mode := .Values.rbac.secretCheck | default "auto" }}
{{- if eq $mode "auto" }}
{{- if .Values.watchNamespaces }}metadata{{ else }}off{{ end }}
{{- else }}
{{- $mode }}
{{- end }}
{{- end }}

{{/*
Images a spec may name (converter.policy.allowedImages, default the converter image's
repository), as a JSON list.
*/}}
{{- define "preshard.allowedImages" -}}
{{- if .Values.converter.policy.allowedImages }}
{{- toJson .Values.converter.policy.allowedImages }}
{{- else }}
{{- toJson (list .Values.converter.image.repository) }}
{{- end }}
{{- end }}

{{/*
namespace -> converter ServiceAccount name of converter.serviceAccount.perNamespace, as
a JSON object.
*/}}
{{- define "preshard.namespaceServiceAccounts" -}}
{{- $out := dict }}
{{- range $ns, $id := .Values.converter.serviceAccount.perNamespace }}
{{- $_ := set $out $ns $id.name }}
{{- end }}
{{- toJson $out }}
{{- end }}
