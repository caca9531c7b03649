#!/usr/bin/env bash
# Container start command of the RunPod pod template (deploy/runpod/template.json).
#
# RunPod hands the pod its GPUs and a persistent volume at /workspace; the template's env carries
# the farm's settings, the passwords as RunPod secrets. The template puts the weight cache on the
# volume, so a restarted pod (or a new one on the same network volume) does not download it again.
# One worker per GPU; RunPod's SIGTERM on stop reaches every worker.
set -euo pipefail

if [[ "${ZFARM_MODEL_CACHE:-}" == /workspace/* && ! -d /workspace ]]; then
  echo "start.sh: ZFARM_MODEL_CACHE is under /workspace but the pod has no volume there; add one" >&2
  exit 1
fi
mkdir -p "${ZFARM_MODEL_CACHE:-/models}"

exec /opt/zfarm/deploy/start-workers.sh
