{{/*
The RayCluster spec, shared by raycluster.yaml and rayjob.yaml (job.enabled), as in _cluster.j2.
Every template here is called with (dict "ctx" $ "s" $s ...), where $s is rollfleet.config parsed.
*/}}

{{/* An exec probe. (dict "cmd" "..." "period" 10 "failures" 3) */}}
{{- define "rollfleet.probe" -}}
exec:
  command: ["bash", "-c", {{ .cmd | quote }}]
periodSeconds: {{ .period }}
timeoutSeconds: 5
failureThreshold: {{ .failures | int64 }}
{{- end }}

{{/* Probe failures that tolerate `seconds` at one probe every 10 s. */}}
{{- define "rollfleet.failuresFor" -}}
{{- ceil (divf . 10) | int64 }}
{{- end }}

{{/* env, then ncclEnv (each sorted by name), then the Hugging Face token by reference only. */}}
{{- define "rollfleet.env" -}}
{{- $s := .s }}
{{- range $name := keys $s.env | sortAlpha }}
- name: {{ $name | quote }}
  value: {{ get $s.env $name | quote }}
{{- end }}
{{- range $name := keys $s.ncclEnv | sortAlpha }}
- name: {{ $name | quote }}
  value: {{ get $s.ncclEnv $name | quote }}
{{- end }}
{{- with $s.model.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}

{{/* Tolerations as the model dumps them without nulls. */}}
{{- define "rollfleet.tolerations" -}}
{{- range $given := . }}
{{- $toleration := dict }}
{{- range $k, $v := $given }}{{ if not (kindIs "invalid" $v) }}{{ $_ := set $toleration $k $v }}{{ end }}{{ end }}
- {{ toJson $toleration }}
{{- end }}
{{- end }}

{{/* Pod fields both groups share. */}}
{{- define "rollfleet.podCommon" -}}
{{- with .s.image.pullSecrets }}
imagePullSecrets:
{{- range $name := . }}
  - name: {{ $name | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* One worker group. (dict "ctx" $ "s" $s "group" "trainer") */}}
{{- define "rollfleet.workerGroup" -}}
{{- $s := .s }}
{{- $group := .group }}
{{- $pool := get $s.pools $group }}
{{- $selector := dict }}
{{- with $pool.gpuProduct }}{{ $_ := set $selector "nvidia.com/gpu.product" . }}{{ end }}
{{- $selector = merge (deepCopy $pool.nodeSelector) $selector }}
- groupName: {{ $group }}
  replicas: {{ $pool.nodes | int64 }}
  minReplicas: {{ $pool.nodes | int64 }}
  maxReplicas: {{ $pool.nodes | int64 }}
  numOfHosts: 1
  # KubeRay's CRD defaults it inside workerGroupSpecs, a list applied whole: rendered, so a re-apply is a no-op
  priority: 0
  rayStartParams: {}
  # Ray custom resource: actors pin to this pool with {"{{ $group }}": n}
  resources:
    {{ $group }}: {{ $pool.gpusPerNode | int64 | toString | quote }}
  template:
    metadata:
      labels:
        {{- include "rollfleet.labels" (dict "ctx" .ctx "component" $group "extra" $pool.labels) | nindent 8 }}
      {{- with $pool.annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with include "rollfleet.podCommon" . }}{{ . | trim | nindent 6 }}{{ end }}
      nodeSelector: {{ toJson $selector }}
      tolerations:
        - {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        {{- with include "rollfleet.tolerations" $pool.tolerations }}{{ . | trim | nindent 8 }}{{ end }}
      containers:
        - name: ray-worker
          image: {{ include "rollfleet.image" $s.image | quote }}
          imagePullPolicy: {{ $s.image.pullPolicy }}
          resources:
            requests:
              cpu: {{ $pool.cpu | quote }}
              memory: {{ $pool.memory | quote }}
            limits:
              cpu: {{ $pool.cpu | quote }}
              memory: {{ $pool.memory | quote }}
              nvidia.com/gpu: {{ $pool.gpusPerNode | int64 }}
              {{- if $pool.rdma.enabled }}
              {{ $pool.rdma.resourceName }}: {{ $pool.rdma.count | int64 }}
              {{- end }}
          {{- if $pool.rdma.enabled }}
          securityContext:
            capabilities:
              add: ["IPC_LOCK"]
          {{- end }}
          env:
            {{- include "rollfleet.env" . | trim | nindent 12 }}
          # The raylet is healthy within seconds; the engine's model load (timeouts.initSeconds) must
          # not restart the pod, so the startup probe tolerates it and liveness tolerates healthSeconds.
          startupProbe:
            {{- include "rollfleet.probe" (dict "cmd" (include "rollfleet.rayletHealth" .) "period" 10
                "failures" (include "rollfleet.failuresFor" $s.timeouts.initSeconds)) | nindent 12 }}
          readinessProbe:
            {{- include "rollfleet.probe" (dict "cmd" (include "rollfleet.rayletHealth" .) "period" 10
                "failures" 3) | nindent 12 }}
          livenessProbe:
            {{- include "rollfleet.probe" (dict "cmd" (include "rollfleet.rayletHealth" .) "period" 10
                "failures" (include "rollfleet.failuresFor" $s.timeouts.healthSeconds)) | nindent 12 }}
          volumeMounts:
            - {"name": "dshm", "mountPath": "/dev/shm"}
      volumes:
        - name: dshm
          emptyDir: {"medium": "Memory", "sizeLimit": {{ $pool.shmSize | quote }}}
{{- end }}

{{/* The cluster spec: head + trainer and inference worker groups. (dict "ctx" $ "s" $s) */}}
{{- define "rollfleet.clusterSpec" -}}
{{- $s := .s }}
{{- $headHealth := printf "%s && %s" (include "rollfleet.rayletHealth" .) (include "rollfleet.gcsHealth" .) }}
rayVersion: {{ $s.rayVersion | quote }}
enableInTreeAutoscaling: false
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    num-gpus: "0"
    dashboard-host: "0.0.0.0"
  template:
    metadata:
      labels:
        {{- include "rollfleet.labels" (dict "ctx" .ctx "component" "head") | nindent 8 }}
    spec:
      {{- with include "rollfleet.podCommon" . }}{{ . | trim | nindent 6 }}{{ end }}
      {{- with $s.head.nodeSelector }}
      nodeSelector: {{ toJson . }}
      {{- end }}
      {{- with $s.head.tolerations }}
      tolerations:
        {{- include "rollfleet.tolerations" . | trim | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "rollfleet.image" $s.image | quote }}
          imagePullPolicy: {{ $s.image.pullPolicy }}
          ports:
            - {"name": "gcs", "containerPort": 6379, "protocol": "TCP"}
            - {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"}
            - {"name": "client", "containerPort": 10001, "protocol": "TCP"}
          resources:
            requests: {"cpu": {{ $s.head.cpu | quote }}, "memory": {{ $s.head.memory | quote }}}
            limits: {"cpu": {{ $s.head.cpu | quote }}, "memory": {{ $s.head.memory | quote }}}
          env:
            # no GPU request: hide the node's GPUs from the head
            - {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}
            {{- include "rollfleet.env" . | trim | nindent 12 }}
          readinessProbe:
            {{- include "rollfleet.probe" (dict "cmd" $headHealth "period" 10 "failures" 3) | nindent 12 }}
          livenessProbe:
            {{- include "rollfleet.probe" (dict "cmd" $headHealth "period" 10
                "failures" (include "rollfleet.failuresFor" $s.timeouts.healthSeconds)) | nindent 12 }}
          volumeMounts:
            - {"name": "fleet-config", "mountPath": {{ include "rollfleet.configDir" . | quote }}, "readOnly": true}
      volumes:
        - name: fleet-config
          configMap: {"name": {{ include "rollfleet.configName" .ctx | quote }}}
workerGroupSpecs:
  {{- include "rollfleet.workerGroup" (dict "ctx" .ctx "s" $s "group" "trainer") | trim | nindent 2 }}
  {{- include "rollfleet.workerGroup" (dict "ctx" .ctx "s" $s "group" "inference") | trim | nindent 2 }}
{{- end }}
