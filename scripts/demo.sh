#!/usr/bin/env bash
# The demo on a fresh machine: installs zfarm with a CPU build of torch and runs `zfarm demo`,
# which needs no services (it starts its own Redis-compatible server and one worker).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[worker]'
exec zfarm demo "$@"
