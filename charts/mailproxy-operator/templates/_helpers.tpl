{{- define "mailproxy-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mailproxy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The selector labels as key=value,key=value: the operator's POD_LABELS, by which each pool's
memcached admits the operator's pods.
*/}}
{{- define "mailproxy-operator.podLabels" -}}
{{- include "mailproxy-operator.selectorLabels" . | replace ": " "=" | replace "\n" "," -}}
{{- end -}}

{{- define "mailproxy-operator.labels" -}}
{{ include "mailproxy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "mailproxy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailproxy-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does with the cluster's objects (docs/operator.md, "RBAC"): in a ClusterRole
when it watches every namespace, in a Role of the watched namespace otherwise. It grants the
proxies get/list/watch on their route-table ConfigMap, which Kubernetes allows because it holds
those verbs itself: no escalate or bind. update on proxypools/finalizers: the children's owner
references set blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission
plugin (OpenShift) allows only with it.
*/}}
{{- define "mailproxy-operator.rules" -}}
- apiGroups: [mailproxy.io]
  resources: [mailboxservers]
  verbs: [get, list, watch, patch]
- apiGroups: [mailproxy.io]
  resources: [proxypools]
  verbs: [get, list, watch]
- apiGroups: [mailproxy.io]
  resources: [proxypools/finalizers]
  verbs: [update]
- apiGroups: [mailproxy.io]
  resources: [mailboxservers/status, proxypools/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
