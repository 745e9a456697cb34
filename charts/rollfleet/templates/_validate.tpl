{{/*
The rules JSON Schema cannot express (rollfleet.spec.cross_field_problems), with the CLI's exact
message lines; values.schema.json covers the rest. One `fail` lists every problem, one per line,
as `rollfleet validate` prints them (tests/test_chart.py checks each rule against the CLI).
Call with (dict "s" $s), $s = rollfleet.config parsed.
*/}}
{{- define "rollfleet.validate" -}}
{{- $s := .s }}
{{- $rayVersion := "2.52.1" }}{{/* spec.RAY_VERSION, the image's Ray */}}
{{- $p := list }}
{{- $name := toString $s.name }}
{{- if or (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name)) (gt (len $name) 40) }}
  {{- $p = append $p (printf "name: %s is not a DNS-1035 label; start with a lowercase letter, then use lowercase letters, digits and '-', at most 40 characters (KubeRay appends suffixes)" (include "rollfleet.pyrepr" $name)) }}
{{- end }}
{{- $namespace := toString $s.namespace }}
{{- if or (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $namespace)) (gt (len $namespace) 63) }}
  {{- $p = append $p (printf "namespace: %s is not a DNS-1123 label; use lowercase letters, digits and '-', at most 63 characters" (include "rollfleet.pyrepr" $namespace)) }}
{{- end }}
{{- range $poolName := list "trainer" "inference" }}
  {{- $pool := get $s.pools $poolName }}
  {{- if lt (float64 $pool.gpusPerNode) 1.0 }}
    {{- $p = append $p (printf "pools.%s.gpusPerNode: the %s pool has no GPUs; set it to 1 or more" $poolName $poolName) }}
  {{- end }}
  {{- $memory := include "rollfleet.quantity" $pool.memory }}
  {{- $shm := include "rollfleet.quantity" $pool.shmSize }}
  {{- if and $memory $shm }}{{ if lt (float64 $memory) (float64 $shm) }}
    {{- $p = append $p (printf "pools.%s.shmSize: %s exceeds pools.%s.memory %s; /dev/shm counts against pod memory, lower shmSize or raise memory" $poolName $pool.shmSize $poolName $pool.memory) }}
  {{- end }}{{ end }}
{{- end }}
{{- $tp := int64 $s.vllm.tensorParallelSize }}
{{- $gpusPerNode := int64 $s.pools.inference.gpusPerNode }}
{{- if ge $gpusPerNode 1 }}
  {{- if gt $tp $gpusPerNode }}
    {{- $p = append $p (printf "vllm.tensorParallelSize: %d > pools.inference.gpusPerNode %d; an engine never spans nodes, lower tensorParallelSize or raise gpusPerNode" $tp $gpusPerNode) }}
  {{- else if mod $gpusPerNode $tp }}
    {{- $p = append $p (printf "vllm.tensorParallelSize: %d does not divide pools.inference.gpusPerNode %d; choose a divisor so engines fill each node" $tp $gpusPerNode) }}
  {{- end }}
{{- end }}
{{- $utilization := float64 $s.vllm.gpuMemoryUtilization }}
{{- if or (le $utilization 0.0) (gt $utilization 1.0) }}
  {{- $p = append $p (printf "vllm.gpuMemoryUtilization: %s is outside (0, 1]; use e.g. 0.9 (lower to 0.8 or 0.7 on CUDA out of memory)" (include "rollfleet.pyfloat" $utilization)) }}
{{- end }}
{{- if and $s.vllm.enablePrefixCaching (eq (get $s.env "VLLM_USE_V1" | toString) "0") (hasKey $s.env "VLLM_USE_V1") }}
  {{- $p = append $p "vllm.enablePrefixCaching: prefix caching needs the V1 engine but env.VLLM_USE_V1 is '0'; set env.VLLM_USE_V1: '1' or enablePrefixCaching: false" }}
{{- end }}
{{- $want := ternary "nccl" "gloo" (eq $s.engine "vllm") }}
{{- if ne $s.sync.backend $want }}
  {{- $p = append $p (printf "sync.backend: engine %s syncs over %s; set sync.backend: %s" (include "rollfleet.pyrepr" $s.engine) $want $want) }}
{{- end }}
{{- if and (eq $s.engine "cpu-standin") (ne $tp 1) }}
  {{- $p = append $p "vllm.tensorParallelSize: the cpu-standin engine has no tensor parallelism; set it to 1" }}
{{- end }}
{{- $version := toString $s.rayVersion }}
{{- if not (regexMatch "^[0-9]+\\.[0-9]+\\.[0-9]+$" $version) }}
  {{- $p = append $p (printf "rayVersion: %s is not MAJOR.MINOR.PATCH; use the image's Ray, %s" (include "rollfleet.pyrepr" $version) $rayVersion) }}
{{- else }}
  {{- $parts := splitList "." $version }}
  {{- if and (eq (atoi (index $parts 0)) 2) (ge (atoi (index $parts 1)) 11) (le (atoi (index $parts 1)) 37) }}
    {{- $p = append $p (printf "rayVersion: %s is in 2.11–2.37, whose probes hang under KubeRay; use %s (the image's Ray)" $version $rayVersion) }}
  {{- end }}
{{- end }}
{{- $re := $s.job.runtimeEnv }}
{{- if and (or $re.workingDir $re.pyModules $re.pip $re.envVars) (not $s.job.enabled) }}
  {{- $p = append $p "job.runtimeEnv: only a RayJob carries a runtime env and job.enabled is false (a standing RayCluster); set job.enabled: true, or pass --runtime-env-json when you submit your own job" }}
{{- end }}
{{- if eq $s.job.submissionMode "SidecarMode" }}
  {{- $p = append $p "job.submissionMode: SidecarMode is known to hang in Initializing (kuberay#4945); use K8sJobMode or HTTPMode" }}
{{- end }}
{{- range $field := list "ncclEnv" "env" }}
  {{- range $k := keys (get $s $field) | sortAlpha }}
    {{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" $k) }}
      {{- $p = append $p (printf "%s.%s: not a valid environment variable name; use letters, digits and '_'" $field $k) }}
    {{- end }}
  {{- end }}
{{- end }}
{{- range $k := keys $s.ncclEnv | sortAlpha }}
  {{- if not (hasPrefix "NCCL_" $k) }}
    {{- $p = append $p (printf "ncclEnv.%s: only NCCL_* variables belong here; move it to env" $k) }}
  {{- end }}
{{- end }}
{{- range $k := keys $s.env | sortAlpha }}
  {{- if hasPrefix "NCCL_" $k }}
    {{- $p = append $p (printf "env.%s: NCCL variables go in ncclEnv so both pools get the same value; move it there" $k) }}
  {{- end }}
  {{- if eq $k "HF_TOKEN" }}
    {{- $p = append $p "env.HF_TOKEN: a secret value in values; put it in a Secret and set model.hfTokenSecret" }}
  {{- end }}
{{- end }}
{{- if $p }}
  {{- fail (printf "values break %d rollfleet rule(s) (the same checks as `rollfleet validate`):\n%s" (len $p) (join "\n" $p)) }}
{{- end }}
{{- end }}
