{{/*
PRESHARD_* environment of the operator container, read by
preshard.core.config.OperatorConfig.from_env. Only names and plain settings: the
operator never receives S3 keys (conversion pods read them from the Secret themselves).
*/}}
{{- define "preshard.env" -}}
- name: PRESHARD_CONVERTER_IMAGE
  value: {{ include "preshard.image" (dict "image" .Values.converter.image "ctx" $) | quote }}
- name: PRESHARD_CONVERTER_CPU_IMAGE
  value: {{ include "preshard.image" (dict "image" .Values.converter.cpuImage "ctx" $) | quote }}
- name: PRESHARD_DEFAULT_ACCELERATOR
  value: {{ .Values.converter.accelerator | quote }}
- name: PRESHARD_DEFAULT_ENGINE
  value: {{ .Values.converter.engine | quote }}
- name: PRESHARD_CONVERTER_IMAGE_PULL_POLICY
  value: {{ .Values.converter.image.pullPolicy | quote }}
- name: PRESHARD_GPU_RESOURCE_NAME
  value: {{ .Values.converter.gpuResourceName | quote }}
- name: PRESHARD_JOB_SERVICE_ACCOUNT
  value: {{ .Values.converter.serviceAccount.name | quote }}
- name: PRESHARD_S3_ENDPOINT
  value: {{ .Values.s3.endpoint | quote }}
- name: PRESHARD_CREDENTIALS_SECRET
  value: {{ .Values.s3.credentialsSecret | quote }}
- name: PRESHARD_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: PRESHARD_JOB_TTL_SECONDS
  value: {{ .Values.jobTTLSeconds | int64 | toString | quote }}
- name: PRESHARD_METRICS_PORT
  value: {{ .Values.metrics.port | int | toString | quote }}
- name: PRESHARD_LIVENESS_ENDPOINT
  value: {{ include "preshard.livenessURL" . | quote }}
- name: PRESHARD_PROGRESS_POLL_SECONDS
  value: {{ .Values.converter.progressPollSeconds | int | toString | quote }}
- name: PRESHARD_RETRY_SECONDS
  value: {{ .Values.converter.retrySeconds | int | toString | quote }}
- name: PRESHARD_STEP_RETRY_SECONDS
  value: {{ .Values.converter.stepRetrySeconds | int | toString | quote }}
- name: PRESHARD_PREFLIGHT
  value: {{ ternary "1" "0" .Values.converter.preflight | quote }}
- name: PRESHARD_WORK_DIR_SIZE
  value: {{ .Values.converter.workDirSize | quote }}
- name: PRESHARD_CONVERTER_NODE_SELECTOR
  value: {{ .Values.converter.nodeSelector | toJson | quote }}
- name: PRESHARD_CONVERTER_TOLERATIONS
  value: {{ .Values.converter.tolerations | toJson | quote }}
- name: PRESHARD_NAMESPACE_SERVICE_ACCOUNTS
  value: {{ include "preshard.namespaceServiceAccounts" . | quote }}
- name: PRESHARD_ALLOWED_IMAGES
  value: {{ include "preshard.allowedImages" . | quote }}
- name: PRESHARD_ALLOWED_SERVICE_ACCOUNTS
  value: {{ .Values.converter.policy.allowedServiceAccounts | toJson | quote }}
- name: PRESHARD_ALLOWED_PRIORITY_CLASSES
  value: {{ .Values.converter.policy.allowedPriorityClasses | toJson | quote }}
- name: PRESHARD_ALLOWED_TOLERATIONS
  value: {{ .Values.converter.policy.allowedTolerations | toJson | quote }}
- name: PRESHARD_ALLOWED_NODE_SELECTOR
  value: {{ .Values.converter.policy.allowedNodeSelector | toJson | quote }}
- name: PRESHARD_OUTPUT_PREFIXES
  value: {{ .Values.converter.policy.outputPrefixes | toJson | quote }}
- name: PRESHARD_SECRET_CHECK
  value: {{ include "preshard.secretCheck" . | quote }}
- name: PRESHARD_CONVERTER_CPU_NODE_SELECTOR
  value: {{ .Values.converter.cpuNodeSelector | toJson | quote }}
- name: PRESHARD_CONVERTER_CPU_TOLERATIONS
  value: {{ .Values.converter.cpuTolerations | toJson | quote }}
- name: PRESHARD_COPY_TRUST
  value: {{ .Values.converter.policy.copyTrust | toJson | quote }}
- name: PRESHARD_OPERATOR_NAMESPACE
  value: {{ .Release.Namespace | quote }}
{{- end }}
