{{/* Names, labels and the pieces every Ray pod shares. */}}

{{- define "splitserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayCluster's name and every object's prefix: the release name, with the chart's name
unless the release name already carries it. Short: KubeRay derives pod and Service names from it. */}}
{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The image: <appVersion>-ray<rayVersion>-<cpu | torch variant> unless image.tag is set. */}}
{{- define "splitserve.image" -}}
{{- $variant := ternary .Values.gpu.torchVariant "cpu" .Values.gpu.enabled -}}
{{- $tag := .Values.image.tag | default (printf "%s-ray%s-%s" .Chart.AppVersion .Values.rayVersion $variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "splitserve.entrypoint" -}}
/usr/local/bin/splitserve-entrypoint
{{- end -}}

{{/* The Ray resource that pins a pool to its worker group. */}}
{{- define "splitserve.poolResource" -}}
splitserve_{{ . }}
{{- end -}}

{{/* What serve reads from its environment: the Redis URL ($(SPLITSERVE_REDIS_URL), nothing
without Redis), the API keys (SPLITSERVE_API_KEY) and the KV links' shared secret
(SPLITSERVE_KV_AUTH_KEY; the head hands it to the workers it starts), each nothing without a
Secret for it. */}}
{{- define "splitserve.serveEnv" -}}
{{- with .Values.apiKeys.secretName }}
- name: SPLITSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKeys.secretKey }}
{{- end }}
{{- with .Values.kvAuth.secretName }}
- name: SPLITSERVE_KV_AUTH_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.kvAuth.secretKey }}
{{- end }}
{{- if eq .Values.redis.mode "bundled" }}
- name: SPLITSERVE_REDIS_URL
  value: {{ printf "redis://%s-redis:6379/0" (include "splitserve.fullname" .) | quote }}
{{- else if eq .Values.redis.mode "external" }}
- name: SPLITSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.secretName }}
      key: {{ .Values.redis.external.secretKey }}
{{- end }}
{{- end -}}

{{/* The flags the head's serve and every router replica must agree on (same store, mode,
model), plus each one's front ends. Kubernetes expands $(SPLITSERVE_REDIS_URL) from env. */}}
{{- define "splitserve.serveArgs" -}}
- --address
- auto
- --mode
- {{ .Values.mode }}
{{- if .Values.model.path }}
- --model
- {{ .Values.model.path | quote }}
{{- end }}
- --dtype
- {{ .Values.model.dtype }}
{{- if ne .Values.redis.mode "none" }}
- --redis-url
- $(SPLITSERVE_REDIS_URL)
{{- end }}
- --store-prefix
- {{ include "splitserve.fullname" . }}
- --grpc-host
- 0.0.0.0
- --grpc-port
- {{ .Values.serve.grpcPort | quote }}
- --http-host
- 0.0.0.0
- --http-port
- {{ .Values.serve.httpPort | quote }}
- --grace
- {{ .Values.drain.graceSeconds | quote }}
{{- with .Values.serve.sloTtftMs }}
- --slo-ttft-ms
- {{ . | quote }}
{{- end }}
{{- with .Values.serve.sloTpotMs }}
- --slo-tpot-ms
- {{ . | quote }}
{{- end }}
{{- range .Values.serve.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Threads (and Ray CPUs) per worker: serve.threadsPerWorker, or gpu.cpusPerGpu with GPUs. */}}
{{- define "splitserve.threadsPerWorker" -}}
{{- ternary .Values.gpu.cpusPerGpu .Values.serve.threadsPerWorker .Values.gpu.enabled -}}
{{- end -}}

{{- define "splitserve.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.drain.graceSeconds .Values.drain.shutdownSeconds -}}
{{- end -}}

{{- define "splitserve.podSecurity" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* Volumes of every Ray pod: /dev/shm in memory, the model volume if one is set, and an
external Redis's CA bundle if one is named (every process that reaches the store needs it). */}}
{{- define "splitserve.volumes" -}}
volumes:
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ .Values.shm.sizeLimit }}
{{- with .Values.model.volume }}
  - name: model
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- if include "splitserve.redisCA" . }}
  - name: redis-ca
    secret:
      secretName: {{ .Values.redis.external.caSecretName }}
      items:
        - key: {{ .Values.redis.external.caSecretKey }}
          path: ca.crt
{{- end }}
{{- end -}}

{{/* "true" when an external Redis's CA bundle is mounted, else empty. */}}
{{- define "splitserve.redisCA" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecretName }}true{{ end }}
{{- end -}}

{{- define "splitserve.volumeMounts" -}}
volumeMounts:
  - name: dshm
    mountPath: /dev/shm
{{- if .Values.model.volume }}
  - name: model
    mountPath: {{ .Values.model.mountPath }}
    readOnly: true
{{- end }}
{{- if include "splitserve.redisCA" . }}
  - name: redis-ca
    mountPath: /etc/splitserve/redis-ca
    readOnly: true
{{- end }}
{{- end -}}

{{/* A front end's ports (head or router): serve's, and Ray's metrics. */}}
{{- define "splitserve.frontendPorts" -}}
- name: grpc
  containerPort: {{ .Values.serve.grpcPort }}
- name: http
  containerPort: {{ .Values.serve.httpPort }}
- name: metrics
  containerPort: 8080
{{- end -}}

{{/* A front end's probes and drain. */}}
{{- define "splitserve.frontendContainerParts" -}}
startupProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
  timeoutSeconds: 3
readinessProbe:
  grpc:
    port: {{ .Values.serve.grpcPort }}
    service: ""
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  timeoutSeconds: 3
livenessProbe:
  httpGet:
    path: /livez
    port: http
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  timeoutSeconds: 3
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.drain.preStopSleepSeconds | quote }}]
{{- end -}}

{{/* A worker node's probes: its raylet's health check on the dashboard agent (public under
token authentication; success also means the GCS counts the raylet alive). */}}
{{- define "splitserve.workerProbes" -}}
ports:
  - name: metrics
    containerPort: 8080
startupProbe:
  httpGet:
    path: /api/local_raylet_healthz
    port: 52365
  periodSeconds: 5
  failureThreshold: 60
  timeoutSeconds: 3
readinessProbe:
  httpGet:
    path: /api/local_raylet_healthz
    port: 52365
  periodSeconds: 5
  failureThreshold: 2
  timeoutSeconds: 3
livenessProbe:
  httpGet:
    path: /api/local_raylet_healthz
    port: 52365
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  timeoutSeconds: 3
{{- end -}}

{{/* NCCL settings (and RDMA) for GPU worker pods. */}}
{{- define "splitserve.ncclEnv" -}}
{{- if .Values.gpu.enabled }}
- name: NCCL_DEBUG
  value: {{ .Values.gpu.nccl.debug | quote }}
- name: NCCL_IB_DISABLE
  value: {{ ternary "1" "0" .Values.gpu.nccl.ibDisable | quote }}
{{- with .Values.gpu.nccl.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- if not (hasPrefix "^" .) }}
- name: GLOO_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.gpu.nccl.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* What values.schema.json cannot say: ports must differ from each other and from Ray's, and
the startup probe must outlast the head's wait for worker pods. */}}
{{- define "splitserve.validate" -}}
{{- $startup := mul .Values.probes.startup.periodSeconds .Values.probes.startup.failureThreshold -}}
{{- if le (int $startup) (int .Values.serve.resourceWaitSeconds) -}}
{{- fail (printf "the startup probe gives up after %v s (probes.startup.periodSeconds x failureThreshold), before serve.resourceWaitSeconds (%v s) is over: a slow worker pod would restart the head" $startup .Values.serve.resourceWaitSeconds) -}}
{{- end -}}
{{- $ray := dict "6379" "Ray's GCS" "8265" "Ray's dashboard" "10001" "Ray's client server" "8080" "Ray's metrics" "52365" "Ray's dashboard agent" -}}
{{- if eq (int .Values.serve.grpcPort) (int .Values.serve.httpPort) -}}
{{- fail (printf "serve.grpcPort and serve.httpPort are both %v: give them different ports" .Values.serve.grpcPort) -}}
{{- end -}}
{{- range $name, $port := dict "serve.grpcPort" .Values.serve.grpcPort "serve.httpPort" .Values.serve.httpPort -}}
{{- with get $ray (toString (int $port)) -}}
{{- fail (printf "%s is %v, which %s uses in every Ray pod: choose another port" $name $port .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
