{{/*
Names and labels shared by every object of the chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "fedllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else the release name.
fedllm.deploy.provision.fullname computes the same, so Secret names agree.
*/}}
{{- define "fedllm.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "fedllm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods. */}}
{{- define "fedllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "fedllm.labels" -}}
helm.sh/chart: {{ include "fedllm.chart" . }}
{{ include "fedllm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedllm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Server labels: call with (dict "root" $). */}}
{{- define "fedllm.serverLabels" -}}
{{ include "fedllm.labels" .root }}
app.kubernetes.io/component: server
fedllm.io/site: {{ .root.Values.server.name }}
{{- end }}

{{- define "fedllm.serverSelectorLabels" -}}
{{ include "fedllm.selectorLabels" .root }}
app.kubernetes.io/component: server
{{- end }}

{{/* Site labels: call with (dict "root" $ "site" $site). */}}
{{- define "fedllm.siteLabels" -}}
{{ include "fedllm.labels" .root }}
app.kubernetes.io/component: site
fedllm.io/site: {{ .site.name }}
{{- end }}

{{- define "fedllm.siteSelectorLabels" -}}
{{ include "fedllm.selectorLabels" .root }}
app.kubernetes.io/component: site
fedllm.io/site: {{ .site.name }}
{{- end }}

{{/* Resource names. */}}
{{- define "fedllm.serverName" -}}
{{- printf "%s-server" (include "fedllm.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Site resource name: call with (dict "root" $ "site" $site). */}}
{{- define "fedllm.siteName" -}}
{{- printf "%s-%s" (include "fedllm.fullname" .root) .site.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Startup-kit Secret names (fedllm.deploy.provision.secret_name computes the same). */}}
{{- define "fedllm.serverKitSecret" -}}
{{- default (printf "%s-server-startup-kit" (include "fedllm.fullname" .)) .Values.server.startupKitSecret }}
{{- end }}

{{- define "fedllm.adminKitSecret" -}}
{{- default (printf "%s-admin-startup-kit" (include "fedllm.fullname" .)) .Values.admin.startupKitSecret }}
{{- end }}

{{- define "fedllm.siteKitSecret" -}}
{{- default (printf "%s-%s-startup-kit" (include "fedllm.fullname" .root) .site.name) .site.startupKitSecret }}
{{- end }}

{{/* The ServiceAccount every pod of the release runs as. */}}
{{- define "fedllm.serviceAccountName" -}}
{{- include "fedllm.fullname" . }}
{{- end }}

{{/*
The server pod's resources: server.resources, with a memory request derived from
server.modelBytes where it gives none (and then a limit of twice that where it gives none).
The rule is fedllm.federation.memory.server_memory_request's: 1Gi + 2 x modelBytes, rounded
up to a whole Mi, computed in integers as ceil((2^30 + 2 x modelBytes) / 2^20) Mi.
*/}}
{{- define "fedllm.serverResources" -}}
{{- $resources := deepCopy (default dict .Values.server.resources) }}
{{- $requests := default dict $resources.requests }}
{{- if not (hasKey $requests "memory") }}
{{- $mi := div (add 1073741824 (mul 2 (int64 (default 0 .Values.server.modelBytes))) 1048575) 1048576 }}
{{- $_ := set $requests "memory" (printf "%dMi" $mi) }}
{{- $_ := set $resources "requests" $requests }}
{{- $limits := default dict $resources.limits }}
{{- if not (hasKey $limits "memory") }}
{{- $_ := set $limits "memory" (printf "%dMi" (mul 2 $mi)) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* The image, tag defaulting to appVersion. */}}
{{- define "fedllm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
A site's image: each field of its own `image` that is set, else the chart-wide image's
(tag: then appVersion). Call with (dict "root" $ "site" $site).
*/}}
{{- define "fedllm.siteImage" -}}
{{- $own := default dict .site.image }}
{{- $chart := .root.Values.image }}
{{- printf "%s:%s" (default $chart.repository $own.repository) (default (default .root.Chart.AppVersion $chart.tag) $own.tag) }}
{{- end }}

{{/* A site's image pull policy: its own, else the chart-wide one. Call as fedllm.siteImage. */}}
{{- define "fedllm.siteImagePullPolicy" -}}
{{- default .root.Values.image.pullPolicy (default dict .site.image).pullPolicy }}
{{- end }}

{{/* host and port of a remote server (server.enabled false): call with $. */}}
{{- define "fedllm.remoteHost" -}}
{{- (splitList ":" (required "server.remoteAddress (host:port) is required when server.enabled is false" .Values.server.remoteAddress)) | first }}
{{- end }}

{{- define "fedllm.remotePort" -}}
{{- (splitList ":" .Values.server.remoteAddress) | last }}
{{- end }}

{{/* S3 (MinIO) endpoint and credentials as container env. */}}
{{- define "fedllm.s3Env" -}}
{{- if .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.credentialsSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.credentialsSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}

{{/* Env every participant container gets: writable caches on the workspace volume. */}}
{{- define "fedllm.commonEnv" -}}
- name: HOME
  value: /workspace/home
- name: HF_HOME
  value: /workspace/home/.cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- /* fedllm's JSON event lines go straight to the container's stdout (PID 1), so
       `kubectl logs` shows them bare even from NVFlare's job subprocesses, which
       re-log their own stdout with prefixes; the prefixed copy is switched off. */}}
- name: FEDLLM_EVENTS_FILE
  value: /proc/1/fd/1
- name: FEDLLM_QUIET_EVENTS
  value: "1"
{{- with .Values.provisioning.rootCASha256 }}
- name: FEDLLM_ROOT_CA_SHA256
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The pod template NVFlare's K8sJobLauncher starts each job of a site from (launcher k8s):
the site's scheduling and the chart's security settings. The labels differ from the
site Deployment's selector on purpose: its ReplicaSet would otherwise adopt job pods.
Call with (dict "root" $ "site" $site).
*/}}
{{- define "fedllm.jobPodTemplate" -}}
metadata:
  labels:
    app.kubernetes.io/name: {{ include "fedllm.name" .root }}
    app.kubernetes.io/instance: {{ .root.Release.Name }}
    app.kubernetes.io/component: job
    fedllm.io/site: {{ .site.name }}
    {{- with include "fedllm.kueueQueueLabels" .root }}
    {{- . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  {{- with .site.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .site.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: nvflare_job
      securityContext:
        {{- toYaml .root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- end }}

{{/* Comma-separated site names. */}}
{{- define "fedllm.siteNames" -}}
{{- $names := list }}
{{- range .Values.sites }}{{ $names = append $names .name }}{{ end }}
{{- join "," $names }}
{{- end }}

{{/*
Kueue (kueue.enabled). The queue label on every pod-owning object and every pod; the pod
group of the federation (its server and sites) on their pod templates. The group is named
for the release, is as large as the pods this release runs, and is a serving group: a
Deployment's replacement pod rejoins the admitted workload instead of ending it.
*/}}
{{- define "fedllm.kueueQueueLabels" -}}
{{- if .Values.kueue.enabled -}}
kueue.x-k8s.io/queue-name: {{ .Values.kueue.queueName | quote }}
{{- with .Values.kueue.priorityClass }}
kueue.x-k8s.io/priority-class: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedllm.kueueGroupLabels" -}}
{{- if .Values.kueue.enabled -}}
{{ include "fedllm.kueueQueueLabels" . }}
kueue.x-k8s.io/pod-group-name: {{ printf "%s-federation" (include "fedllm.fullname" .) | trunc 63 | trimSuffix "-" | quote }}
{{- end }}
{{- end }}

{{/* The pods of the Kueue group: the server (when in this release) and every site. */}}
{{- define "fedllm.kueueGroupSize" -}}
{{- add (ternary 1 0 .Values.server.enabled) (len .Values.sites) }}
{{- end }}

{{/* Annotations of the server and site pods: podAnnotations, and Kueue's pod group. */}}
{{- define "fedllm.participantPodAnnotations" -}}
{{- $annotations := deepCopy (default dict .Values.podAnnotations) }}
{{- if .Values.kueue.enabled }}
{{- $_ := set $annotations "kueue.x-k8s.io/pod-group-total-count" (include "fedllm.kueueGroupSize" .) }}
{{- $_ := set $annotations "kueue.x-k8s.io/pod-group-serving" "true" }}
{{- end }}
{{- with $annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}
