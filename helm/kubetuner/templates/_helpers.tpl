{{/* Name of the chart, overridable only through the release name. */}}
{{- define "kubetuner.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name of the release's objects. */}}
{{- define "kubetuner.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetuner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetuner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetuner.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubetuner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetuner
{{- end -}}

{{- define "kubetuner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetuner.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetuner.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Permissions on the namespaced objects the operator reconciles (ClusterRole or Role rules): exactly what
     the code calls (tests/helm/test_rbac.py derives them from the API client's call sites). */}}
{{- define "kubetuner.namespacedRules" -}}
- apiGroups: ["kubetuner.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["kubetuner.dev"]
  resources: ["trainingjobs/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["list", "watch", "create"]
{{- if .Values.networkPolicy.enabled }}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create"]
{{- end }}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* Name of the webhook's ValidatingWebhookConfiguration, Service and certificate. */}}
{{- define "kubetuner.webhookName" -}}
{{- printf "%s-webhook" (include "kubetuner.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "certManager" or "selfSigned": cert-manager when asked or (auto) when its API is present. */}}
{{- define "kubetuner.webhookTls" -}}
{{- if eq .Values.webhook.tls "auto" -}}
{{- if .Capabilities.APIVersions.Has "cert-manager.io/v1" -}}certManager{{- else -}}selfSigned{{- end -}}
{{- else -}}
{{- .Values.webhook.tls -}}
{{- end -}}
{{- end -}}


{{/* The operator's NetworkPolicy settings (KUBETUNER_NETWORK_POLICY): peers allowed on trainers' metrics port. */}}
{{- define "kubetuner.networkPolicyJson" -}}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "kubetuner.selectorLabels" . | fromYaml)) -}}
{{- dict "metricsFrom" (prepend (.Values.networkPolicy.metricsFrom | default list) $operator) | toJson -}}
{{- end -}}
