{{/* Names and labels shared by the templates. */}}
{{- define "fmforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "fmforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else if contains (include "fmforge.name" .) .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "fmforge.name" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fmforge.labels" -}}
{{ include "fmforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fmforge
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fmforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules of the operator's role: our kinds, their children, nothing more. */}}
{{- define "fmforge.rules" -}}
- apiGroups: ["fmforge.io"]
  resources: [datapiles, trainingruns, modelcards, tunedmodels, deployments]
  verbs: [get, list, watch, patch, update]
- apiGroups: ["fmforge.io"]
  resources: [datapiles/status, trainingruns/status, modelcards/status, tunedmodels/status, deployments/status]
  verbs: [get, patch, update]
- apiGroups: ["ray.io"]
  resources: [rayjobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: ["serving.kserve.io"]
  resources: [inferenceservices]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: ["events.k8s.io"]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.openshift.routes }}
- apiGroups: ["route.openshift.io"]
  resources: [routes]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: ["route.openshift.io"]
  resources: [routes/custom-host]
  verbs: [create]
{{- end }}
{{- end -}}
