{{/*
The values as the spec model dumps them (rollfleet.spec.runtime_config): the ConfigMap's fleet.json,
which the launcher parses with the same model, and what every template reads (`$s`, like the Jinja `s`).
Helm deletes a key set to null and drops null defaults, so the model's nullable keys come back as null;
tolerations and model.hfTokenSecret, which have no defaults in values.yaml, get the model's defaults;
quantities become strings as the model's validator makes them. tests/test_chart.py derives these lists
from FleetSpec and fails when a new field is missing here.
Use: {{- $s := include "rollfleet.config" . | fromJson }}
*/}}
{{- define "rollfleet.config" -}}
{{- $c := deepCopy .Values }}
{{- $nullable := list
  "image.digest" "pools.trainer.gpuProduct" "pools.inference.gpuProduct" "model.revision"
  "model.maxModelLen" "model.hfTokenSecret" "vllm.maxNumSeqs" "sync.port" "job.entrypoint"
  "job.activeDeadlineSeconds" "job.runtimeEnv.workingDir" }}
{{- range $path := $nullable }}
  {{- $parts := splitList "." $path }}
  {{- $parent := $c }}
  {{- range $part := initial $parts }}{{ $parent = index $parent $part }}{{ end }}
  {{- if not (hasKey $parent (last $parts)) }}{{ $_ := set $parent (last $parts) nil }}{{ end }}
{{- end }}
{{- range $holder := list $c.head $c.pools.trainer $c.pools.inference }}
  {{- range $key := list "cpu" "memory" "shmSize" }}
    {{- if hasKey $holder $key }}{{ $_ := set $holder $key (include "rollfleet.str" (get $holder $key)) }}{{ end }}
  {{- end }}
  {{- $tolerations := list }}
  {{- range $given := $holder.tolerations }}
    {{- $toleration := dict "key" nil "operator" "Exists" "value" nil "effect" nil }}
    {{- range $k, $v := $given }}{{ $_ := set $toleration $k $v }}{{ end }}
    {{- $tolerations = append $tolerations $toleration }}
  {{- end }}
  {{- $_ := set $holder "tolerations" $tolerations }}
{{- end }}
{{- with $c.model.hfTokenSecret }}
  {{- if not (hasKey . "key") }}{{ $_ := set . "key" "token" }}{{ end }}
{{- end }}
{{- toPrettyJson $c }}
{{- end }}
