{{/*
Names, labels and the pieces of the generic per-service template (services.yaml).
*/}}

{{- define "voice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voice.fullname" -}}
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

{{- define "voice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object of the release. */}}
{{- define "voice.commonLabels" -}}
helm.sh/chart: {{ include "voice.chart" . }}
app.kubernetes.io/name: {{ include "voice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: voice-platform
{{- end }}

{{/* The component name of a service key: llmBackend -> llm-backend. */}}
{{- define "voice.component" -}}
{{- kebabcase . -}}
{{- end }}

{{/* Context: dict "root" $ "key" $key. */}}
{{- define "voice.serviceName" -}}
{{- printf "%s-%s" (include "voice.fullname" .root) (include "voice.component" .key) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voice.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ include "voice.component" .key }}
{{- end }}

{{- define "voice.labels" -}}
{{ include "voice.commonLabels" .root }}
app.kubernetes.io/component: {{ include "voice.component" .key }}
{{- end }}

{{/* The image reference of a service: [registry/]repository:tag. Context: dict "root" "svc". */}}
{{- define "voice.image" -}}
{{- $repo := .svc.image.repository }}
{{- with .root.Values.imageRegistry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}{{ end }}
{{- printf "%s:%s" $repo .svc.image.tag }}
{{- end }}

{{- define "voice.secretName" -}}
{{- default (printf "%s-secrets" (include "voice.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "voice.agentsConfigMap" -}}
{{- default (printf "%s-agents" (include "voice.fullname" .)) .Values.agents.existingConfigMap }}
{{- end }}

{{/* Whether the gateway mounts an agent file from a ConfigMap. */}}
{{- define "voice.agentsMounted" -}}
{{- if or .Values.agents.existingConfigMap .Values.agents.default }}true{{ end }}
{{- end }}

{{/*
Checks the rules the schema cannot express; each failure names the service and the fix.
Context: dict "root" $ "key" $key "svc" $svc.
*/}}
{{- define "voice.validate" -}}
{{- $key := .key }}
{{- $svc := .svc }}
{{- $hpa := dig "autoscaling" "hpa" "enabled" false $svc }}
{{- $keda := dig "autoscaling" "keda" "enabled" false $svc }}
{{- if and $hpa $keda }}
{{- fail (printf "services.%s: autoscaling.hpa.enabled and autoscaling.keda.enabled are both true; a Deployment takes one autoscaler (KEDA creates its own HPA): disable one of them" $key) }}
{{- end }}
{{- if and $keda (ne $svc.role "worker") }}
{{- fail (printf "services.%s: autoscaling.keda scales workers on their JetStream consumer lag; a %s has no consumer: use autoscaling.hpa" $key $svc.role) }}
{{- end }}
{{- if and (dig "autoscaling" "hpa" "activeSessions" "enabled" false $svc) (not .root.Values.metricsAdapter.enabled) }}
{{- fail (printf "services.%s: autoscaling.hpa.activeSessions needs a metrics adapter serving pods metrics: set metricsAdapter.enabled=true once one is installed" $key) }}
{{- end }}
{{- if eq (toString $svc.image.tag) "latest" }}
{{- fail (printf "services.%s: image.tag \"latest\" is not allowed: pin a version" $key) }}
{{- end }}
{{- $needed := add $svc.drain.preStopSeconds (default 0 $svc.drain.waitForSessionsSeconds) $svc.drain.graceSeconds 5 }}
{{- if lt (int $svc.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "services.%s: terminationGracePeriodSeconds=%d is shorter than the drain (preStopSeconds + waitForSessionsSeconds + graceSeconds + 5 s = %d): calls would be cut" $key (int $svc.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- if not (hasKey $svc.ports (toString $svc.health.port)) }}
{{- fail (printf "services.%s: health.port %q is not one of its ports (%s)" $key (toString $svc.health.port) (keys $svc.ports | sortAlpha | join ", ")) }}
{{- end }}
{{- if and (eq $svc.role "worker") (or (not (hasKey $svc.ports "grpc")) (not (hasKey $svc.ports "metrics"))) }}
{{- fail (printf "services.%s: a worker needs ports.grpc and ports.metrics" $key) }}
{{- end }}
{{- if and (eq $svc.role "gateway") (not (hasKey $svc.ports "http")) }}
{{- fail (printf "services.%s: the gateway needs ports.http" $key) }}
{{- end }}
{{- if dig "models" "enabled" false $svc }}
{{- if not (or $svc.models.claimName $svc.models.hostPath (dig "models" "create" "size" "" $svc)) }}
{{- fail (printf "services.%s: models.enabled needs models.claimName (an existing PVC), models.hostPath or models.create.size" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* One probe. Context: dict "svc" $svc "kind" ("startup"|"readiness"|"liveness"). */}}
{{- define "voice.probe" -}}
{{- $svc := .svc }}
{{- $timing := get $svc.probes .kind }}
{{- if eq $svc.health.type "grpc" }}
grpc:
  port: {{ get $svc.ports (toString $svc.health.port) }}
{{- else }}
httpGet:
  path: {{ ternary $svc.health.livenessPath $svc.health.readinessPath (eq .kind "liveness") }}
  port: {{ $svc.health.port }}
{{- end }}
{{- toYaml $timing | nindent 0 }}
{{- end }}

{{/* Environment of a service's container. Context: dict "root" $ "key" $key "svc" $svc. */}}
{{- define "voice.env" -}}
{{- $root := .root }}
{{- $svc := .svc }}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: HOME
  value: /tmp
- name: LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
{{- if ne $svc.role "backend" }}
- name: NATS_URL
  value: {{ $root.Values.nats.url | quote }}
- name: NATS_STREAM_REPLICAS
  value: {{ $root.Values.nats.streamReplicas | default 1 | quote }}
- name: NATS_WORK_STORAGE
  value: {{ $root.Values.nats.workStorage | default "memory" | quote }}
{{- if $root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $root.Values.otel.protocol | quote }}
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,service.instance.id=$(K8S_POD_NAME),k8s.namespace.name=%s,k8s.pod.name=$(K8S_POD_NAME),k8s.node.name=$(K8S_NODE_NAME)" $root.Release.Namespace $root.Release.Namespace | quote }}
{{- range $name, $value := $root.Values.otel.extraEnv }}
- name: {{ $name }}
  value: {{ tpl (toString $value) $root | quote }}
{{- end }}
{{- end }}
{{- if eq $svc.role "worker" }}
- name: GRPC_PORT
  value: {{ $svc.ports.grpc | quote }}
- name: METRICS_PORT
  value: {{ $svc.ports.metrics | quote }}
- name: {{ printf "%s_CONCURRENCY" (upper $svc.bus.consumer) }}
  value: {{ $svc.concurrency | quote }}
- name: DRAIN_GRACE_SECONDS
  value: {{ $svc.drain.graceSeconds | quote }}
{{- else if eq $svc.role "gateway" }}
- name: GATEWAY_HOST
  value: 0.0.0.0
- name: GATEWAY_PORT
  value: {{ $svc.ports.http | quote }}
{{- if include "voice.agentsMounted" $root }}
- name: GATEWAY_DEFAULT_AGENT_FILE
  value: /etc/voice/agents/default.json
{{- end }}
{{- end }}
{{- range $name, $value := $svc.env }}
- name: {{ $name }}
  value: {{ tpl (toString $value) $root | quote }}
{{- end }}
{{- range $svc.secretEnv }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "voice.secretName" $root }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}
