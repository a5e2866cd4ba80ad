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

{{/* The rules of the operator's role: exactly the requests fmforge.kube.client and kopf make.
kopf lists and watches the five kinds and the children; the reconcilers patch status, create
children (a 409 is read back with get), update InferenceServices in place, apply the OpenShift
Route of `expose: route` (server-side apply: create and patch) and delete it when expose turns
off, stop RayJobs of an older generation, and create each namespace's stage
ServiceAccount/Role/RoleBinding; the Role
grants get and patch of the status subresources, which the operator must hold itself. */}}
{{- define "fmforge.rules" -}}
- apiGroups: ["fmforge.io"]
  resources: [datapiles, trainingruns, modelcards, tunedmodels, deployments]
  verbs: [list, watch]
- apiGroups: ["fmforge.io"]
  resources: [datapiles/status, trainingruns/status, modelcards/status, tunedmodels/status, deployments/status]
  verbs: [get, patch]
- apiGroups: ["ray.io"]
  resources: [rayjobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: ["serving.kserve.io"]
  resources: [inferenceservices]
  verbs: [get, list, watch, create, patch]
- apiGroups: ["route.openshift.io"]
  resources: [routes]
  verbs: [create, patch, delete]
# A stage's plan: made with its RayJob, deleted with it when a card's model is made again.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [create]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: [roles, rolebindings]
  verbs: [create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
