{{/*
The values as the spec model dumps them (rollfleet.spec.runtime_config): the ConfigMap's fleet.json,
which the launcher parses with the same model, and what every template reads (`$s`, like the Jinja `s`).
Helm deletes a key set to null and drops null defaults, so the model's nullable keys come back as null;
list items and maps of references, which have no defaults in values.yaml, get the model's defaults
(toleration operator Exists, Secret key `token`); Kubernetes fragments (tolerations, affinity, volumes)
keep only the keys given, as the model dumps them; quantities become strings as the model's validator
makes them; `global` (Helm's, for subcharts) is dropped. tests/test_chart.py derives these lists from
FleetSpec and fails when a new field is missing here.
Use: {{- $s := include "rollfleet.config" . | fromJson }}
*/}}
{{- define "rollfleet.config" -}}
{{- $c := deepCopy .Values }}
{{- $_ := unset $c "global" }}
{{- $nullable := list
  "image.digest" "rayAuth.secretName" "head.ephemeralStorage" "head.affinity"
  "pools.trainer.ephemeralStorage" "pools.trainer.gpuProduct" "pools.trainer.affinity"
  "pools.inference.ephemeralStorage" "pools.inference.gpuProduct" "pools.inference.affinity"
  "model.revision" "model.maxModelLen" "model.hfTokenSecret" "vllm.maxNumSeqs" "job.entrypoint"
  "job.activeDeadlineSeconds" "gangScheduling.scheduler" "gangScheduling.queue" "priorityClassName"
  "serviceAccountName" "podSecurity.fsGroup" "networkPolicy.operatorNamespace" "job.runtimeEnv.workingDir" "pools.colocated"
  "job.checkpoint.path" "monitoring.scraper.namespace" }}
{{- range $path := $nullable }}
  {{- $parts := splitList "." $path }}
  {{- $parent := $c }}
  {{- range $part := initial $parts }}{{ $parent = index $parent $part }}{{ end }}
  {{- if not (hasKey $parent (last $parts)) }}{{ $_ := set $parent (last $parts) nil }}{{ end }}
{{- end }}
{{- with $c.pools.colocated }}{{/* a pool the user gives whole: the model's Pool defaults (= pools.trainer's) fill it */}}
  {{- $default := include "rollfleet.poolDefaults" $ | fromJson }}
  {{- $pool := deepCopy $default }}
  {{- range $k, $v := . }}{{ $_ := set $pool $k $v }}{{ end }}
  {{- if hasKey . "rdma" }}{{ $_ := set $pool "rdma" (merge (deepCopy .rdma) (deepCopy $default.rdma)) }}{{ end }}
  {{- $_ := set $c.pools "colocated" $pool }}
{{- end }}
{{- $holders := list $c.head $c.pools.trainer $c.pools.inference }}
{{- with $c.pools.colocated }}{{ $holders = append $holders . }}{{ end }}
{{- range $holder := $holders }}
  {{- range $key := list "cpu" "memory" "shmSize" "ephemeralStorage" }}
    {{- if and (hasKey $holder $key) (not (kindIs "invalid" (get $holder $key))) }}{{ $_ := set $holder $key (include "rollfleet.str" (get $holder $key)) }}{{ end }}
  {{- end }}
  {{- $tolerations := list }}
  {{- range $given := $holder.tolerations }}
    {{- $tolerations = append $tolerations (merge (dict) $given (dict "operator" "Exists")) }}
  {{- end }}
  {{- $_ := set $holder "tolerations" $tolerations }}
{{- end }}
{{- range $ref := prepend (values $c.secretEnv) $c.model.hfTokenSecret }}
  {{- if and $ref (not (hasKey $ref "key")) }}{{ $_ := set $ref "key" "token" }}{{ end }}
{{- end }}
{{- toPrettyJson $c }}
{{- end }}
