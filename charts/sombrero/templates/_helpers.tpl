{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "sombrero.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless the release already holds it. */}}
{{- define "sombrero.fullname" -}}
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

{{/*
The full name with a suffix ("-metrics", "-controller"), the full name cut so the whole stays a
63-character DNS label: `(dict "ctx" $ "suffix" "metrics")`.
*/}}
{{- define "sombrero.suffixedName" -}}
{{- $room := int (sub 62 (len .suffix)) }}
{{- printf "%s-%s" (include "sombrero.fullname" .ctx | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{- define "sombrero.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sombrero.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sombrero.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sombrero.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "sombrero.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sombrero.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sombrero.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Leader election is forced on with more than one replica. */}}
{{- define "sombrero.leaderElection" -}}
{{- if or .Values.controller.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
The controller's rules, the same in the ClusterRole (rbac.scope: cluster) and in each watched
namespace's Role (rbac.scope: namespaced). Exactly the verbs the controller uses.
*/}}
{{- define "sombrero.controllerRules" -}}
# GoldenImages: watched; patched to add/remove the cleanup finalizer and to drop the
# rebuild annotation.
- apiGroups: ["images.sombrero.dev"]
  resources: ["goldenimages"]
  verbs: ["get", "list", "watch", "patch"]
# TemplateRetentions: watched and read, never written (no finalizer; only their status).
- apiGroups: ["images.sombrero.dev"]
  resources: ["templateretentions"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["images.sombrero.dev"]
  resources: ["goldenimages/status", "templateretentions/status"]
  verbs: ["patch"]
# The output ConfigMap's ownerReference has blockOwnerDeletion: where the
# OwnerReferencesPermissionEnforcement admission plugin runs, that needs `update` (only) on the
# owner GoldenImage's finalizers. Nothing points at a TemplateRetention.
- apiGroups: ["images.sombrero.dev"]
  resources: ["goldenimages/finalizers"]
  verbs: ["update"]
# The Terraform hand-off ConfigMap of each GoldenImage (spec.output.configMapName): watched,
# written by server-side apply (a patch, which needs `create` while it does not exist yet).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "watch", "create", "patch"]
# Proxmox credentials named by spec.proxmox.secretRef: read and watched, never written.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Events (kube-runtime's Recorder creates, then patches event series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
