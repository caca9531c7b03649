#!/usr/bin/env bash
# Vast.ai on-start script, for the SSH or Jupyter launch modes (Vast replaces the image's
# entrypoint and runs this). Image: the zfarm worker image (deploy/Dockerfile.worker).
#
#   vastai create instance OFFER_ID --image REGISTRY/zfarm-worker:TAG --disk 80 --ssh --direct \
#     --env "-e ZFARM_REDIS_URL=... -e ZFARM_STORAGE_URL=... -e ZFARM_S3_ENDPOINT_URL=... \
#            -e AWS_ACCESS_KEY_ID=... -e AWS_SECRET_ACCESS_KEY=... -e ZFARM_FETCH_ARGS=--bf16" \
#     --onstart deploy/vast/onstart.sh
#
# In these modes Vast's entrypoint is PID 1, so a stop may not reach the workers as SIGTERM: a
# stopped instance's jobs then come back through the registry TTL, not the grace period. The
# entrypoint ("args") launch mode with /opt/zfarm/deploy/start-workers.sh as the command keeps the
# grace period; see docs/operations.md.
set -euo pipefail

if [[ ! -x /opt/zfarm/deploy/start-workers.sh ]]; then
  echo "onstart: /opt/zfarm/deploy/start-workers.sh is missing: is the image the zfarm worker image?" >&2
  exit 1
fi
mkdir -p /var/log/zfarm
# In the background: Vast's entrypoint goes on to start sshd/jupyter after this script returns.
nohup /opt/zfarm/deploy/start-workers.sh >>/var/log/zfarm/workers.log 2>&1 &
echo "onstart: zfarm workers starting; log in /var/log/zfarm/workers.log"
