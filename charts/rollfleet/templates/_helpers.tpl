{{/*
Names. Objects are named from the release, so two releases (of one values file or not) never collide;
`rollfleet deploy` names them from `name` in the values, and the two agree when the release is called
that. Truncated at 63, the DNS label limit, like every chart; KubeRay appends suffixes to what it
creates from a RayJob/RayCluster, so a name must also pass the values' `name` rule (a DNS-1035 label of
at most 40 characters): a longer or invalid release name fails here rather than being cut, which could
make two releases collide.
*/}}
{{- define "rollfleet.fullname" -}}
{{- $name := .Release.Name | trunc 63 | trimSuffix "-" }}
{{- if or (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name)) (gt (len $name) 40) }}
{{- fail (printf "release name %s: the chart names its objects after the release and KubeRay appends suffixes to them; use a release name that starts with a lowercase letter, then lowercase letters, digits and '-', at most 40 characters" (quote $name)) }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
The namespace of every object: `namespace` in the values when they set it (to anything but the
default, "default"), else the release's (`helm install -n`), as platform teams install charts.
*/}}
{{- define "rollfleet.namespace" -}}
{{- $values := toString (.Values.namespace | default "default") }}
{{- if ne $values "default" }}{{ $values }}{{ else }}{{ .Release.Namespace }}{{ end }}
{{- end }}

{{/* The runtime-config ConfigMap (rollfleet.render.config_name). */}}
{{- define "rollfleet.configName" -}}
{{- printf "%s-config" (include "rollfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The `helm test` pod and its RBAC. */}}
{{- define "rollfleet.testName" -}}
{{- printf "%s-test" (include "rollfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The runtime config as the ConfigMap carries it (fleet.json): rollfleet.config with the fleet's name and
namespace as this release has them, so the launcher sees the objects' own names.
*/}}
{{- define "rollfleet.runtimeConfig" -}}
{{- $c := include "rollfleet.config" . | fromJson }}
{{- $_ := set $c "name" (include "rollfleet.fullname" .) }}
{{- $_ := set $c "namespace" (include "rollfleet.namespace" .) }}
{{- toPrettyJson $c }}
{{- end }}

{{/* Chart name and version, the value of the helm.sh/chart label. */}}
{{- define "rollfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Pod-template labels, the same set as rollfleet.render.labels: the pool's own labels first, the
standard set wins. managed-by is Helm here (rollfleet for `rollfleet deploy`), so `rollfleet down`
never deletes a Helm release's objects.
Call with (dict "ctx" $ "component" "head" "extra" $labels).
*/}}
{{- define "rollfleet.labels" -}}
{{- $standard := dict
  "app.kubernetes.io/name" "rollfleet"
  "app.kubernetes.io/instance" (include "rollfleet.fullname" .ctx)
  "app.kubernetes.io/component" .component
  "app.kubernetes.io/managed-by" .ctx.Release.Service }}
{{- toYaml (merge $standard (.extra | default dict)) }}
{{- end }}

{{/*
Labels of top-level objects: the pod-template set plus helm.sh/chart. Pod templates do not carry
helm.sh/chart: with upgradeStrategy Recreate a chart-version bump alone would restart the cluster.
*/}}
{{- define "rollfleet.objectLabels" -}}
helm.sh/chart: {{ include "rollfleet.chart" .ctx }}
{{ include "rollfleet.labels" . }}
{{- end }}

{{/* The image reference: by digest when image.digest is set (spec.Image.ref). */}}
{{- define "rollfleet.image" -}}
{{- if .digest }}{{ printf "%s@%s" .repository .digest }}{{ else }}{{ printf "%s:%s" .repository (toString .tag) }}{{ end }}
{{- end }}

{{/* The RayJob entrypoint and the probe commands (rollfleet.render.LAUNCH / RAYLET_HEALTH / GCS_HEALTH). */}}
{{- define "rollfleet.configDir" -}}/etc/rollfleet{{- end }}
{{- define "rollfleet.entrypoint" -}}
python -m rollfleet.runtime.launch --config {{ include "rollfleet.configDir" . }}/fleet.json
{{- end }}
{{- define "rollfleet.rayletHealth" -}}
wget -T 4 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success
{{- end }}
{{- define "rollfleet.gcsHealth" -}}
wget -T 4 -q -O- http://localhost:8265/api/gcs_healthz | grep success
{{- end }}

{{/*
A number as an integer. Values reach templates as float64 and Go prints 1e6 as "1e+06", so every
integer field goes through here (or int64).
*/}}
{{- define "rollfleet.str" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* A string as Python's repr() writes it, for messages that must equal the CLI's. */}}
{{- define "rollfleet.pyrepr" -}}
{{- $s := toString . | replace "\\" "\\\\" | replace "\n" "\\n" | replace "\r" "\\r" | replace "\t" "\\t" }}
{{- if and (contains "'" $s) (not (contains "\"" $s)) }}"{{ $s }}"{{ else }}'{{ $s | replace "'" "\\'" }}'{{ end }}
{{- end }}

{{/* A float as Python's str() writes it (2 -> "2.0"), for messages that must equal the CLI's. */}}
{{- define "rollfleet.pyfloat" -}}
{{- $f := float64 . }}
{{- if and (eq $f (floor $f)) (lt $f 1e16) (gt $f -1e16) }}{{ printf "%d.0" (int64 $f) }}{{ else }}{{ printf "%v" $f }}{{ end }}
{{- end }}

{{/* A Kubernetes quantity ('64Gi', '500m', '8') as a number (spec.parse_quantity); "" when malformed. */}}
{{- define "rollfleet.quantity" -}}
{{- $m := regexFindAll "^([0-9]+(?:\\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$" (toString .) 1 }}
{{- if $m }}
{{- $number := regexFind "^[0-9]+(?:\\.[0-9]+)?" (toString .) }}
{{- $suffix := trimPrefix $number (toString .) }}
{{- $scale := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18
  "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- mulf (float64 $number) (index $scale $suffix) }}
{{- end }}
{{- end }}

{{/* job.runtimeEnv as Ray reads it (snake_case keys, empty ones left out), compact JSON, which is
YAML: the RayJob's runtimeEnvYAML (rollfleet.spec.RuntimeEnv.ray + render.go_json). Empty: none. */}}
{{- define "rollfleet.runtimeEnv" -}}
{{- $re := dict }}
{{- with .workingDir }}{{ $_ := set $re "working_dir" . }}{{ end }}
{{- with .pyModules }}{{ $_ := set $re "py_modules" . }}{{ end }}
{{- with .pip }}{{ $_ := set $re "pip" . }}{{ end }}
{{- with .envVars }}{{ $_ := set $re "env_vars" . }}{{ end }}
{{- if $re }}{{ toJson $re }}{{ end }}
{{- end }}

{{/* The labels that select every pod of this fleet (rollfleet.render.fleet_selector). */}}
{{- define "rollfleet.fleetSelector" -}}
{{- toJson (dict "app.kubernetes.io/name" "rollfleet" "app.kubernetes.io/instance" (include "rollfleet.fullname" .)) }}
{{- end }}

{{/* A namespaceSelector for one namespace, or every namespace for null (rollfleet.render.namespace_selector). */}}
{{- define "rollfleet.namespaceSelector" -}}
{{- if . }}{{ toJson (dict "matchLabels" (dict "kubernetes.io/metadata.name" .)) }}{{ else }}{}{{ end }}
{{- end }}

{{/* Gang-scheduling labels of the RayJob/RayCluster (rollfleet.render.gang_labels), as a dict in JSON.
Call with the runtime config (rollfleet.runtimeConfig: `name` is the release's). */}}
{{- define "rollfleet.gangLabels" -}}
{{- $gang := .gangScheduling }}
{{- $out := dict }}
{{- if eq (toString $gang.scheduler) "kueue" }}
  {{- $_ := set $out "kueue.x-k8s.io/queue-name" $gang.queue }}
{{- else if $gang.scheduler }}
  {{- $_ := set $out "ray.io/scheduler-name" $gang.scheduler }}
  {{- if eq $gang.scheduler "volcano" }}
    {{- with $gang.queue }}{{ $_ := set $out "volcano.sh/queue-name" . }}{{ end }}
    {{- with $.priorityClassName }}{{ $_ := set $out "ray.io/priority-class-name" . }}{{ end }}
  {{- else }}
    {{- $_ := set $out "ray.io/gang-scheduling-enabled" "true" }}
    {{- $_ := set $out "yunikorn.apache.org/app-id" $.name }}
    {{- with $gang.queue }}{{ $_ := set $out "yunikorn.apache.org/queue" . }}{{ end }}
  {{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The pod securityContext (rollfleet.render.pod_security). Call with $s. */}}
{{- define "rollfleet.podSecurity" -}}
{{- $sec := .podSecurity }}
{{- $out := dict "runAsNonRoot" true "runAsUser" (int64 $sec.runAsUser) "runAsGroup" (int64 $sec.runAsGroup)
  "seccompProfile" (dict "type" $sec.seccompProfile) }}
{{- if not (kindIs "invalid" $sec.fsGroup) }}{{ $_ := set $out "fsGroup" (int64 $sec.fsGroup) }}{{ end }}
{{- toJson $out }}
{{- end }}

{{/* A container securityContext (rollfleet.render.container_security): IPC_LOCK only with RDMA (true). */}}
{{- define "rollfleet.containerSecurity" -}}
{{- $caps := dict "drop" (list "ALL") }}
{{- if . }}{{ $_ := set $caps "add" (list "IPC_LOCK") }}{{ end }}
{{- toJson (dict "allowPrivilegeEscalation" false "capabilities" $caps) }}
{{- end }}

{{/* "true" when the cluster uses KubeRay's Ray token auth (spec.FleetSpec.ray_auth_token), else "". */}}
{{- define "rollfleet.rayAuthToken" -}}
{{- $parts := splitList "." (toString .rayVersion) }}
{{- $supported := or (gt (atoi (index $parts 0)) 2) (and (eq (atoi (index $parts 0)) 2) (ge (atoi (index $parts 1)) 52)) }}
{{- if or (eq .rayAuth.mode "token") (and (eq .rayAuth.mode "auto") $supported) }}true{{ end }}
{{- end }}

{{/* The Pool model's defaults (spec.Pool(); tests/test_chart.py checks it): what pools.colocated starts from,
and what pools.trainer / pools.inference must equal in the colocated layout. Nulls are keys Helm drops. */}}
{{- define "rollfleet.poolDefaults" -}}
{"nodes": 1, "gpusPerNode": 4, "cpu": "32", "memory": "256Gi", "shmSize": "64Gi", "ephemeralStorage": null,
 "gpuProduct": "NVIDIA-H100-80GB-HBM3", "nodeSelector": {}, "tolerations": [], "affinity": null, "labels": {},
 "annotations": {}, "rdma": {"enabled": false, "resourceName": "rdma/ib", "count": 1}}
{{- end }}

{{/* "true" when `.pool` (the values' pools.trainer or pools.inference) is not the Pool defaults. */}}
{{- define "rollfleet.poolChanged" -}}
{{- $defaults := include "rollfleet.poolDefaults" . | fromJson }}
{{- $pool := .pool }}
{{- range $k, $v := $defaults }}
  {{- if kindIs "invalid" $v }}
    {{- if and (hasKey $pool $k) (not (kindIs "invalid" (get $pool $k))) }}true{{ end }}
  {{- else if ne (toJson (get $pool $k)) (toJson $v) }}true{{ end }}
{{- end }}
{{- end }}
