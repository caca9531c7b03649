#!/usr/bin/env bash
# Start the workers of a GPU container: fetch the weights once, then one worker per GPU.
#
# Used by deploy/runpod/start.sh and deploy/vast/onstart.sh (the image has it at
# /opt/zfarm/deploy/start-workers.sh). Fetching first means the cache is filled (and, with
# ZFARM_FETCH_ARGS=--bf16, converted) once, not by every GPU's worker at the same time.
# `zfarm worker --gpus all` then runs a worker per card, restarts one that crashes with backoff,
# and passes SIGTERM to all of them: each finishes or hands back its job within
# ZFARM_SHUTDOWN_GRACE_S.
#
# Environment: the ZFARM_* settings (deploy/worker.env.example) and ZFARM_FETCH_ARGS, extra
# arguments for `zfarm fetch-model` (e.g. "--bf16"). Prints no secret.
set -euo pipefail

: "${ZFARM_REDIS_URL:?set ZFARM_REDIS_URL (sentinel://:PASSWORD@HOST:26379;... or redis://:PASSWORD@HOST:6379/0)}"
: "${ZFARM_STORAGE_URL:?set ZFARM_STORAGE_URL (s3://bucket/prefix)}"

if [[ ! -d "${ZFARM_MODEL:-}" ]]; then
  read -r -a fetch_args <<<"${ZFARM_FETCH_ARGS:-}"
  echo "start-workers: fetching the model into ${ZFARM_MODEL_CACHE:-the default cache}" >&2
  ZFARM_MODEL=$(python -m worker.engine.fetch "${fetch_args[@]}")
  export ZFARM_MODEL
fi

exec zfarm worker --gpus all
