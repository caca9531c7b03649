#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, then runs them.
# The tests start their own redis-server, moto S3 server, Flower and worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[worker,test]'

mkdir -p test-artifacts
# Two test processes, each taking a whole file at a time (a file's tests share its servers and fixtures).
# Most tests wait on real redis-server, S3 and worker processes rather than compute, so two halve the
# wall time on a 2-core machine. TEST_PROCESSES=1 runs them in one.
processes=${TEST_PROCESSES:-2}
parallel=()
if [ "$processes" != 1 ]; then
  parallel=(-n "$processes" --dist loadfile)
fi
set +e
python3 -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} --junitxml=test-artifacts/junit.xml "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
