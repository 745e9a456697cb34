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
{{- range $name := keys $s.secretEnv | sortAlpha }}
{{- $ref := get $s.secretEnv $name }}
- name: {{ $name | quote }}
  valueFrom: {{ toJson (dict "secretKeyRef" (dict "name" $ref.name "key" $ref.key)) }}
{{- end }}
{{- end }}

{{/* Tolerations as the model dumps them (only the keys given, operator defaulted). */}}
{{- define "rollfleet.tolerations" -}}
{{- range $toleration := . }}
- {{ toJson $toleration }}
{{- end }}
{{- end }}

{{/* Pod fields every Ray pod shares. (dict "s" $s "where" $s.head or a pool) */}}
{{- define "rollfleet.podCommon" -}}
{{- $s := .s }}
{{- with $s.image.pullSecrets }}
imagePullSecrets:
{{- range $name := . }}
  - name: {{ $name | quote }}
{{- end }}
{{- end }}
{{- if $s.serviceAccountName }}
serviceAccountName: {{ $s.serviceAccountName | quote }}
{{- else }}
automountServiceAccountToken: false
{{- end }}
{{- with $s.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
securityContext: {{ include "rollfleet.podSecurity" $s }}
{{- with .where.affinity }}
affinity: {{ toJson . }}
{{- end }}
{{- end }}

{{/* The user's volumes (and their mounts) for one group (pod.Volume.mounted_in: the colocated group
mounts what trainer or inference mounts). (dict "s" $s "group" "head") */}}
{{- define "rollfleet.volumes" -}}
{{- range $v := .s.volumes }}{{ if or (not $v.groups) (has $.group $v.groups) (and (eq $.group "colocated") (or (has "trainer" $v.groups) (has "inference" $v.groups))) }}
- {{ toJson (dict "name" $v.name "persistentVolumeClaim" (dict "claimName" $v.claimName)) }}
{{- end }}{{ end }}
{{- end }}
{{- define "rollfleet.mounts" -}}
{{- range $v := .s.volumes }}{{ if or (not $v.groups) (has $.group $v.groups) (and (eq $.group "colocated") (or (has "trainer" $v.groups) (has "inference" $v.groups))) }}
{{- $mount := dict "name" $v.name "mountPath" $v.mountPath }}
{{- if $v.readOnly }}{{ $_ := set $mount "readOnly" true }}{{ end }}
{{- with $v.subPath }}{{ $_ := set $mount "subPath" . }}{{ end }}
- {{ toJson $mount }}
{{- end }}{{ end }}
{{- end }}

{{/* Requests and limits. (dict "cpu" .. "memory" .. "ephemeral" .. "extra" (dict name count)) */}}
{{- define "rollfleet.resources" -}}
{{- $requests := dict "cpu" (toString .cpu) "memory" (toString .memory) }}
{{- with .ephemeral }}{{ $_ := set $requests "ephemeral-storage" (toString .) }}{{ end }}
{{- $limits := dict "cpu" (toString .cpu) "memory" (toString .memory) }}
{{- range $name, $count := .extra }}{{ $_ := set $limits $name (int64 $count) }}{{ end }}
requests: {{ toJson $requests }}
limits: {{ toJson $limits }}
{{- end }}

{{/* One worker group. (dict "ctx" $ "s" $s "group" "trainer") */}}
{{- define "rollfleet.workerGroup" -}}
{{- $s := .s }}
{{- $group := .group }}
{{- $pool := get $s.pools $group }}
{{- $selector := dict }}
{{- with $pool.gpuProduct }}{{ $_ := set $selector "nvidia.com/gpu.product" . }}{{ end }}
{{- $selector = merge (deepCopy $pool.nodeSelector) $selector }}
- groupName: {{ $group | quote }}
  replicas: {{ $pool.nodes | int64 }}
  minReplicas: {{ $pool.nodes | int64 }}
  maxReplicas: {{ $pool.nodes | int64 }}
  numOfHosts: 1
  # KubeRay's CRD defaults it inside workerGroupSpecs, a list applied whole: rendered, so a re-apply is a no-op
  priority: 0
  rayStartParams:
    metrics-export-port: "8080"  {{- /* Ray's metrics endpoint (docs/monitoring.md), KubeRay's `metrics` port */}}
  # Ray custom resources: actors pin to a pool with {"trainer": n} / {"inference": n}
  resources:
    {{- range $r := ternary (list "trainer" "inference") (list $group) (eq $group "colocated") }}
    {{ $r | quote }}: {{ $pool.gpusPerNode | int64 | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "rollfleet.labels" (dict "ctx" .ctx "component" $group "extra" $pool.labels) | nindent 8 }}
      {{- with $pool.annotations }}
      annotations: {{ toJson . }}
      {{- end }}
    spec:
      {{- include "rollfleet.podCommon" (dict "s" $s "where" $pool) | trim | nindent 6 }}
      nodeSelector: {{ toJson $selector }}
      tolerations:
        - {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        {{- with include "rollfleet.tolerations" $pool.tolerations }}{{ . | trim | nindent 8 }}{{ end }}
      containers:
        - name: ray-worker
          image: {{ include "rollfleet.image" $s.image | quote }}
          imagePullPolicy: {{ $s.image.pullPolicy | quote }}
          securityContext: {{ include "rollfleet.containerSecurity" $pool.rdma.enabled }}
          ports:
            - {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}  # Ray's metrics endpoint
          {{- $extra := dict "nvidia.com/gpu" $pool.gpusPerNode }}
          {{- if $pool.rdma.enabled }}{{ $_ := set $extra $pool.rdma.resourceName $pool.rdma.count }}{{ end }}
          resources:
            {{- include "rollfleet.resources" (dict "cpu" $pool.cpu "memory" $pool.memory
                "ephemeral" $pool.ephemeralStorage "extra" $extra) | nindent 12 }}
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
            {{- with include "rollfleet.mounts" (dict "s" $s "group" $group) }}{{ . | trim | nindent 12 }}{{ end }}
      volumes:
        - name: dshm
          emptyDir: {"medium": "Memory", "sizeLimit": {{ $pool.shmSize | quote }}}
        {{- with include "rollfleet.volumes" (dict "s" $s "group" $group) }}{{ . | trim | nindent 8 }}{{ end }}
{{- end }}

{{/* The cluster spec: head + trainer and inference worker groups. (dict "ctx" $ "s" $s) */}}
{{- define "rollfleet.clusterSpec" -}}
{{- $s := .s }}
{{- $headHealth := printf "%s && %s" (include "rollfleet.rayletHealth" .) (include "rollfleet.gcsHealth" .) }}
rayVersion: {{ $s.rayVersion | quote }}
enableInTreeAutoscaling: false
{{- if include "rollfleet.rayAuthToken" $s }}
authOptions: {{ toJson (merge (dict "mode" "token") (ternary (dict "secretName" $s.rayAuth.secretName) (dict) (not (empty $s.rayAuth.secretName)))) }}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    num-gpus: "0"
    dashboard-host: "0.0.0.0"
    metrics-export-port: "8080"
  template:
    metadata:
      labels:
        {{- include "rollfleet.labels" (dict "ctx" .ctx "component" "head") | nindent 8 }}
    spec:
      {{- include "rollfleet.podCommon" (dict "s" $s "where" $s.head) | trim | nindent 6 }}
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
          imagePullPolicy: {{ $s.image.pullPolicy | quote }}
          securityContext: {{ include "rollfleet.containerSecurity" false }}
          ports:
            - {"name": "gcs", "containerPort": 6379, "protocol": "TCP"}
            - {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"}
            - {"name": "client", "containerPort": 10001, "protocol": "TCP"}
            - {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}
          resources:
            {{- include "rollfleet.resources" (dict "cpu" $s.head.cpu "memory" $s.head.memory
                "ephemeral" $s.head.ephemeralStorage "extra" (dict)) | nindent 12 }}
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
            {{- with include "rollfleet.mounts" (dict "s" $s "group" "head") }}{{ . | trim | nindent 12 }}{{ end }}
      volumes:
        - name: fleet-config
          configMap: {"name": {{ include "rollfleet.configName" .ctx | quote }}}
        {{- with include "rollfleet.volumes" (dict "s" $s "group" "head") }}{{ . | trim | nindent 8 }}{{ end }}
workerGroupSpecs:
  {{- range $group := ternary (list "colocated") (list "trainer" "inference") (not (kindIs "invalid" $s.pools.colocated)) }}
  {{- include "rollfleet.workerGroup" (dict "ctx" $.ctx "s" $s "group" $group) | trim | nindent 2 }}
  {{- end }}
{{- end }}

{{/* K8sJobMode's submitter pod template (the _cluster.j2 `submitter` macro). (dict "ctx" $ "s" $s) */}}
{{- define "rollfleet.submitter" -}}
{{- $s := .s }}
metadata:
  labels:
    {{- include "rollfleet.labels" (dict "ctx" .ctx "component" "submitter") | nindent 4 }}
spec:
  restartPolicy: Never
  {{- include "rollfleet.podCommon" (dict "s" $s "where" $s.head) | trim | nindent 2 }}
  {{- with $s.head.nodeSelector }}
  nodeSelector: {{ toJson . }}
  {{- end }}
  {{- with $s.head.tolerations }}
  tolerations:
    {{- include "rollfleet.tolerations" . | trim | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-job-submitter
      image: {{ include "rollfleet.image" $s.image | quote }}
      imagePullPolicy: {{ $s.image.pullPolicy | quote }}
      securityContext: {{ include "rollfleet.containerSecurity" false }}
      resources: {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
{{- end }}
