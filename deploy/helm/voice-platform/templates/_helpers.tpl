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
{{- printf "%s:%s" $repo .svc.image.tag }}{{ with .svc.image.digest }}@{{ . }}{{ end }}
{{- end }}

{{- define "voice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "voice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The gateway's public paths (Ingress, HTTPRoute): a list of "pathType path" strings. Only what callers
must reach: the enabled carriers' webhooks and media sockets, the authenticated chat stream and REST API
(with raw PCM calls, whose URLs the API issues), Retell's secret path when enabled, and extraPaths.
Never /metrics, /ws, /ws/channels or the demo page. Context: the gateway's service values.
*/}}
{{- define "voice.publicPaths" -}}
{{- $expose := .ingress.expose }}
{{- range $expose.carriers }}
- {{ printf "Prefix /%s" . }}
{{- end }}
{{- if $expose.chat }}
- Exact /v1/chat/stream
{{- end }}
{{- if $expose.api }}
- Prefix /api
- Prefix /ws/pcm
{{- end }}
{{- if $expose.realtime }}
- Exact /v1/realtime
{{- end }}
{{- if $expose.retell.enabled }}
- {{ printf "Prefix /%s" $expose.retell.path }}
{{- end }}
{{- range .ingress.extraPaths }}
- {{ printf "Prefix %s" . }}
{{- end }}
{{- end }}

{{/* The drain's numbers of the gateway. Context: the gateway's service values. Returns JSON. */}}
{{- define "voice.drainMath" -}}
{{- $d := .drain }}
{{- $wait := max (int $d.preStopSeconds) (int (default 0 $d.waitForSessionsSeconds)) }}
{{- $needWait := add (int (default 0 .maxCallSeconds)) (int $d.preStopSeconds) }}
{{- $needGrace := add $wait (mul 2 (int $d.graceSeconds)) 10 }}
{{- dict "wait" $wait "needWait" $needWait "needGrace" $needGrace | toJson }}
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
{{- if eq $svc.role "gateway" }}
{{- $math := include "voice.drainMath" $svc | fromJson }}
{{- if not $svc.maxCallSeconds }}
{{- fail (printf "services.%s: maxCallSeconds (GATEWAY_MAX_CALL_SECONDS) is required: without a maximum call length no preStop wait covers the calls, and a drain cuts them" $key) }}
{{- end }}
{{- if lt (int (default 0 $svc.drain.waitForSessionsSeconds)) (int $math.needWait) }}
{{- fail (printf "services.%s: drain.waitForSessionsSeconds=%d is shorter than maxCallSeconds + preStopSeconds = %d: the preStop hook would give up on calls still running (docs/deploy.md, Drain math)" $key (int (default 0 $svc.drain.waitForSessionsSeconds)) (int $math.needWait)) }}
{{- end }}
{{- if lt (int $svc.terminationGracePeriodSeconds) (int $math.needGrace) }}
{{- fail (printf "services.%s: terminationGracePeriodSeconds=%d is shorter than the drain (preStop wait %d + 2 x graceSeconds + 10 s = %d): calls would be cut (docs/deploy.md, Drain math)" $key (int $svc.terminationGracePeriodSeconds) (int $math.wait) (int $math.needGrace)) }}
{{- end }}
{{- range $name, $value := default (dict) (dig "ingress" "annotations" (dict) $svc) }}
{{- if and (hasSuffix "proxy-read-timeout" $name) (regexMatch "^[0-9]+$" (toString $value)) (lt (int $value) (int $svc.maxCallSeconds)) }}
{{- fail (printf "services.%s: ingress annotation %s=%s is shorter than maxCallSeconds=%d: the ingress would cut calls the gateway allows" $key $name (toString $value) (int $svc.maxCallSeconds)) }}
{{- end }}
{{- end }}
{{- with dig "autoscaling" "hpa" "activeSessions" "averageValue" 0 $svc }}
{{- if and (dig "autoscaling" "hpa" "activeSessions" "enabled" false $svc) (gt (int .) (int $svc.maxSessions)) }}
{{- fail (printf "services.%s: autoscaling.hpa.activeSessions.averageValue=%d is above maxSessions=%d (GATEWAY_MAX_SESSIONS): the HPA would never scale before pods refuse calls" $key (int .) (int $svc.maxSessions)) }}
{{- end }}
{{- end }}
{{- if dig "ingress" "enabled" false $svc }}
{{- $retell := $svc.ingress.expose.retell }}
{{- if and $retell.enabled (not $retell.path) }}
{{- fail (printf "services.%s: ingress.expose.retell.enabled needs ingress.expose.retell.path, the same value as the Secret's OBFUSCATED_WS_PATH" $key) }}
{{- end }}
{{- range $svc.ingress.extraPaths }}
{{- if or (eq . "/") (hasPrefix "/metrics" .) (eq . "/ws") (hasPrefix "/ws/channels" .) }}
{{- fail (printf "services.%s: ingress.extraPaths %q would expose an unauthenticated or internal endpoint (/, /metrics, /ws, /ws/channels); see docs/security.md" $key .) }}
{{- end }}
{{- end }}
{{- end }}
{{- else }}
{{- $needed := add $svc.drain.preStopSeconds $svc.drain.graceSeconds 5 }}
{{- if lt (int $svc.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "services.%s: terminationGracePeriodSeconds=%d is shorter than the drain (preStopSeconds + graceSeconds + 5 s = %d): requests in flight would be cut" $key (int $svc.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- end }}
{{- range $kind := list "hpa" "keda" }}
{{- $a := dig "autoscaling" $kind (dict) $svc }}
{{- if and (dig "enabled" false $a) (gt (int (default 1 $a.minReplicas)) (int (default 1 $a.maxReplicas))) }}
{{- fail (printf "services.%s: autoscaling.%s.minReplicas=%d is above maxReplicas=%d" $key $kind (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and (hasKey (default (dict) $svc.pdb) "minAvailable") (hasKey (default (dict) $svc.pdb) "maxUnavailable") }}
{{- fail (printf "services.%s: pdb takes minAvailable or maxUnavailable, not both (maxUnavailable keeps working as the autoscaler adds pods)" $key) }}
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
{{- if not (or (dig "models" "image" "repository" "" $svc) $svc.models.claimName $svc.models.hostPath) }}
{{- fail (printf "services.%s: models.enabled needs models.image.repository (an image an init container copies the models from), models.claimName (a pre-provisioned PVC) or models.hostPath" $key) }}
{{- end }}
{{- if and (not (dig "models" "image" "repository" "" $svc)) (not $svc.models.requiredFiles) }}
{{- fail (printf "services.%s: a pre-provisioned model volume (claimName or hostPath) needs models.requiredFiles, the files an init container checks before the service starts" $key) }}
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
  value: {{ printf "service.namespace=%s,service.version=%s,deployment.environment=%s,deployment.environment.name=%s,service.instance.id=$(K8S_POD_NAME),k8s.namespace.name=%s,k8s.pod.name=$(K8S_POD_NAME),k8s.node.name=$(K8S_NODE_NAME)" $root.Release.Namespace (toString $svc.image.tag) $root.Values.environment $root.Values.environment $root.Release.Namespace | quote }}
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
- name: GATEWAY_MAX_SESSIONS
  value: {{ $svc.maxSessions | quote }}
- name: GATEWAY_MAX_CALL_SECONDS
  value: {{ $svc.maxCallSeconds | quote }}
- name: GATEWAY_DRAIN_TIMEOUT_SECONDS
  value: {{ $svc.drain.graceSeconds | quote }}
{{- $hosts := list }}
{{- if dig "ingress" "enabled" false $svc }}
{{- range $svc.ingress.hosts }}{{ $hosts = append $hosts .host }}{{ end }}
{{- end }}
{{- range dig "httpRoute" "hostnames" list $svc }}{{ $hosts = append $hosts . }}{{ end }}
{{- $hosts = concat $hosts (default list $svc.allowedHosts) }}
{{- if $hosts }}
{{- $service := include "voice.serviceName" . }}
{{- $ns := $root.Release.Namespace }}
{{- $hosts = concat $hosts (list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns)) }}
- name: GATEWAY_ALLOWED_HOSTS
  value: {{ $hosts | uniq | join "," | quote }}
{{- end }}
{{- $publicUrl := $svc.publicUrl }}
{{- if and (not $publicUrl) (dig "ingress" "enabled" false $svc) $svc.ingress.hosts }}
{{- $publicUrl = printf "%s://%s" (ternary "https" "http" (not (empty $svc.ingress.tls))) (first $svc.ingress.hosts).host }}
{{- end }}
{{- with $publicUrl }}
- name: GATEWAY_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- with dig "tools" "allowedNetworks" list $svc }}
- name: GATEWAY_TOOL_ALLOWED_NETWORKS
  value: {{ join "," . | quote }}
{{- end }}
{{- with dig "tools" "allowedHosts" list $svc }}
- name: GATEWAY_TOOL_ALLOWED_HOSTS
  value: {{ join "," . | quote }}
{{- end }}
{{- if include "voice.agentsMounted" $root }}
- name: GATEWAY_DEFAULT_AGENT_FILE
  value: /etc/voice/agents/default.json
{{- end }}
{{- end }}
{{- range $name, $value := $svc.env }}
- name: {{ $name }}
  value: {{ tpl (toString $value) $root | quote }}
{{- end }}
{{- range (include "voice.secretKeys" . | fromJson).required }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "voice.secretName" $root }}
      key: {{ . }}
      optional: false
{{- end }}
{{- range $svc.optionalSecretEnv }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "voice.secretName" $root }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}

{{/*
The Secret keys a service reads: {"required": [...]} (secretEnv, and OBFUSCATED_WS_PATH for a gateway
whose Ingress exposes Retell). Context: dict "root" $ "key" $key "svc" $svc. Returns JSON.
*/}}
{{- define "voice.secretKeys" -}}
{{- $keys := default list .svc.secretEnv }}
{{- if and (eq .svc.role "gateway") (dig "ingress" "expose" "retell" "enabled" false .svc) }}
{{- $keys = append $keys "OBFUSCATED_WS_PATH" }}
{{- end }}
{{- dict "required" ($keys | uniq) | toJson }}
{{- end }}

{{/* Every required Secret key of the enabled services, sorted. Context: $. Returns JSON {"keys": [...]}. */}}
{{- define "voice.allSecretKeys" -}}
{{- $root := . }}
{{- $keys := list }}
{{- range $key, $svc := .Values.services }}
{{- if $svc.enabled }}
{{- $keys = concat $keys (include "voice.secretKeys" (dict "root" $root "key" $key "svc" $svc) | fromJson).required }}
{{- end }}
{{- end }}
{{- dict "keys" ($keys | uniq | sortAlpha) | toJson }}
{{- end }}

{{/* Checks of the release as a whole (called once, from services.yaml). */}}
{{- define "voice.validateGlobal" -}}
{{- if .Values.secrets.existingSecret }}
{{- range $name, $value := .Values.secrets.values }}
{{- if $value }}
{{- fail (printf "secrets.values.%s is set beside secrets.existingSecret=%q, which the pods read instead: put the key in that Secret and remove secrets.values" $name $.Values.secrets.existingSecret) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not .Values.containerSecurityContext.readOnlyRootFilesystem) (not .Values.developmentMode) }}
{{- fail "containerSecurityContext.readOnlyRootFilesystem=false is refused: every service writes only to /tmp (an emptyDir); only a development loop (developmentMode: true) may make the root filesystem writable" }}
{{- end }}
{{- end }}

{{/* The API a feature needs is served by the cluster (else a warning in NOTES, or a failure with
capabilities.strict). Context: dict "root" $ "api" "keda.sh/v1alpha1/ScaledObject" "feature" "...". */}}
{{- define "voice.requireApi" -}}
{{- if not (.root.Capabilities.APIVersions.Has .api) }}
{{- if .root.Values.capabilities.strict }}
{{- fail (printf "%s needs the %s API, which this cluster does not serve: install its CRDs first (or disable it)" .feature .api) }}
{{- end }}
{{- printf "%s needs %s, which the cluster (or helm template) does not report; install its CRDs first." .feature .api }}
{{- end }}
{{- end }}
