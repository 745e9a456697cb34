{{/*
The rules JSON Schema cannot express (rollfleet.spec.cross_field_problems: several fields, sums, quantity
comparisons), with the CLI's exact message lines; values.schema.json, generated from the field types,
covers every rule about one field. One `fail` lists every problem, one per line, as `rollfleet validate`
prints them (tests/test_chart.py checks each rule against the CLI).
Call with (dict "s" $s "ctx" $), $s = rollfleet.config parsed.
*/}}
{{- define "rollfleet.validate" -}}
{{- $s := .s }}
{{- $minShm := "1Gi" }}{{/* spec.MIN_SHM */}}
{{- $p := list }}
{{- $colocated := not (kindIs "invalid" $s.pools.colocated) }}
{{- $where := ternary "colocated" "inference" $colocated }}
{{- range $poolName := ternary (list "colocated") (list "trainer" "inference") $colocated }}
  {{- $pool := get $s.pools $poolName }}
  {{- $memory := include "rollfleet.quantity" $pool.memory }}
  {{- $shm := include "rollfleet.quantity" $pool.shmSize }}
  {{- if lt (float64 $shm) (float64 (include "rollfleet.quantity" $minShm)) }}
    {{- $p = append $p (printf "pools.%s.shmSize: %s is below %s; NCCL and vLLM need a large /dev/shm, set %s or more" $poolName $pool.shmSize $minShm $minShm) }}
  {{- else if lt (float64 $memory) (float64 $shm) }}
    {{- $p = append $p (printf "pools.%s.shmSize: %s exceeds pools.%s.memory %s; /dev/shm counts against pod memory, lower shmSize or raise memory" $poolName $pool.shmSize $poolName $pool.memory) }}
  {{- end }}
  {{- $size := 0 }}
  {{- range $k, $v := $pool.annotations }}{{ $size = add $size (len $k) (len $v) }}{{ end }}
  {{- if gt $size 262144 }}
    {{- $p = append $p (printf "pools.%s.annotations: %d bytes in all, over Kubernetes' 262144 (256 KiB); move large data into a ConfigMap" $poolName $size) }}
  {{- end }}
{{- end }}
{{- $tp := int64 $s.vllm.tensorParallelSize }}
{{- $gpusPerNode := int64 (get $s.pools $where).gpusPerNode }}
{{- if gt $tp $gpusPerNode }}
  {{- $p = append $p (printf "vllm.tensorParallelSize: %d > pools.%s.gpusPerNode %d; an engine never spans nodes, lower tensorParallelSize or raise gpusPerNode" $tp $where $gpusPerNode) }}
{{- else if mod $gpusPerNode $tp }}
  {{- $p = append $p (printf "vllm.tensorParallelSize: %d does not divide pools.%s.gpusPerNode %d; choose a divisor so engines fill each node" $tp $where $gpusPerNode) }}
{{- else if gt (int64 $s.recovery.minEngines) (div (mul (int64 (get $s.pools $where).nodes) $gpusPerNode) $tp) }}{{/* only once the engine count itself is right */}}
  {{- $p = append $p (printf "recovery.minEngines: %d is more than the fleet's %d engine(s); lower it (the fleet would fail at its first fault)" (int64 $s.recovery.minEngines) (div (mul (int64 (get $s.pools $where).nodes) $gpusPerNode) $tp)) }}
{{- end }}
{{- if $colocated }}{{/* spec.colocated_problems */}}
  {{- range $name := list "trainer" "inference" }}
    {{- if include "rollfleet.poolChanged" (dict "pool" (get $.ctx.Values.pools $name)) }}
      {{- $p = append $p (printf "pools.%s: the colocated layout has one pool, pools.colocated; remove pools.%s" $name $name) }}
    {{- end }}
  {{- end }}
  {{- if ne $tp 1 }}
    {{- $p = append $p "vllm.tensorParallelSize: the colocated layout runs one TP=1 engine per GPU (each trainer rank hands its weights to the engine on its own GPU); set it to 1, or use dedicated pools for TP > 1" }}
  {{- end }}
  {{- if gt (float64 $s.vllm.gpuMemoryUtilization) 0.7 }}{{/* spec.COLOCATED_MAX_UTILIZATION */}}
    {{- $p = append $p (printf "vllm.gpuMemoryUtilization: %s leaves the trainer too little of the shared GPU (its weights and optimizer stay there while the engine generates); set at most 0.7, e.g. 0.5" (include "rollfleet.pyfloat" $s.vllm.gpuMemoryUtilization)) }}
  {{- end }}
  {{- if ne $s.sync.inflight "wait" }}
    {{- $p = append $p (printf "sync.inflight: %s has nothing to act on in the colocated layout (the engine is idle and asleep when weights arrive); set sync.inflight: wait" $s.sync.inflight) }}
  {{- end }}
  {{- if ne (int64 $s.rollout.maxStaleness) 0 }}
    {{- $p = append $p (printf "rollout.maxStaleness: %d needs generation to overlap training, which the colocated layout cannot do (the engine sleeps while the trainer trains); set it to 0" (int64 $s.rollout.maxStaleness)) }}
  {{- end }}
{{- end }}
{{- if and $s.vllm.enablePrefixCaching (eq (get $s.env "VLLM_USE_V1" | toString) "0") (hasKey $s.env "VLLM_USE_V1") }}
  {{- $p = append $p "vllm.enablePrefixCaching: prefix caching needs the V1 engine but env.VLLM_USE_V1 is '0'; set env.VLLM_USE_V1: '1' or enablePrefixCaching: false" }}
{{- end }}
{{- if and (eq $s.engine "cpu-standin") (ne $tp 1) }}
  {{- $p = append $p "vllm.tensorParallelSize: the cpu-standin engine has no tensor parallelism; set it to 1" }}
{{- end }}
{{- $parts := splitList "." (toString $s.rayVersion) }}
{{- $authSupported := or (gt (atoi (index $parts 0)) 2) (and (eq (atoi (index $parts 0)) 2) (ge (atoi (index $parts 1)) 52)) }}
{{- if and (eq $s.rayAuth.mode "token") (not $authSupported) }}
  {{- $p = append $p (printf "rayAuth.mode: token needs Ray 2.52.0 or later (rayVersion is %s); use rayAuth.mode: auto or disabled, or a newer Ray" $s.rayVersion) }}
{{- end }}
{{- $gang := $s.gangScheduling }}
{{- if and (eq (toString $gang.scheduler) "kueue") (not $gang.queue) }}
  {{- $p = append $p "gangScheduling.queue: Kueue admits a job through a LocalQueue; name it here" }}
{{- end }}
{{- if and $gang.queue (not $gang.scheduler) }}
  {{- $p = append $p "gangScheduling.queue: a queue without a scheduler does nothing; set gangScheduling.scheduler" }}
{{- end }}
{{- $scraper := $s.monitoring.scraper }}
{{- if ne (not $scraper.namespace) (not $scraper.podLabels) }}
  {{- $p = append $p "monitoring.scraper: set both namespace and podLabels (the Prometheus pods the NetworkPolicy admits to the metrics port 8080), or neither" }}
{{- else if and $s.monitoring.podMonitor.enabled $s.networkPolicy.enabled (not $scraper.namespace) }}
  {{- $p = append $p "monitoring.scraper.namespace: the NetworkPolicy keeps Prometheus from the metrics port (8080); set monitoring.scraper.namespace and podLabels to your Prometheus pods, or networkPolicy.enabled: false" }}
{{- end }}
{{- range $name := keys $s.secretEnv | sortAlpha }}
  {{- if hasKey $s.env $name }}
    {{- $p = append $p (printf "secretEnv.%s: also set in env; keep one of them" $name) }}
  {{- end }}
{{- end }}
{{- $re := $s.job.runtimeEnv }}
{{- if and (or $re.workingDir $re.pyModules $re.pip $re.envVars) (not $s.job.enabled) }}
  {{- $p = append $p "job.runtimeEnv: only a RayJob carries a runtime env and job.enabled is false (a standing RayCluster); set job.enabled: true, or pass --runtime-env-json when you submit your own job" }}
{{- end }}
{{- range $field := list "name" "mountPath" }}
  {{- $seen := dict }}
  {{- range $i, $volume := $s.volumes }}
    {{- $value := ternary $volume.name (trimSuffix "/" $volume.mountPath) (eq $field "name") }}
    {{- if hasKey $seen $value }}
      {{- $p = append $p (printf "volumes[%d].%s: %s is also volumes[%d]'s; make it unique" $i $field $value (get $seen $value)) }}
    {{- else }}
      {{- $_ := set $seen $value $i }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if $p }}
  {{- fail (printf "values break %d rollfleet rule(s) (the same checks as `rollfleet validate`):\n%s" (len $p) (join "\n" $p)) }}
{{- end }}
{{- end }}
