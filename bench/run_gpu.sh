#!/bin/bash
# Run the profile benchmark on a GPU machine, from the repository root.
#
#   bash bench/run_gpu.sh smoke                       # every profile on the tiny pipeline (seconds each)
#   bash bench/run_gpu.sh build                       # full-size random pipeline, cached in $ZFARM_BENCH_DIR
#   bash bench/run_gpu.sh matrix PROFILE@CAP ...      # each in a fresh process; CAP in GiB or "none"
#   HOST_MEMORY_LIMIT_GIB=23 bash bench/run_gpu.sh matrix ...   # each under a host-memory limit (cgroup v2)
#   bash bench/run_gpu.sh worker CLASS ...            # worker.engine.diffusion on the chosen profile under the class cap
#   bash bench/run_gpu.sh table                       # bench/results/profile_table.json from the raw runs
#   bash bench/run_gpu.sh coldstart [--vram-gb 24] [--runs 3 --fresh-cache]  # worker start to first image stored
#   bash bench/run_gpu.sh kernels                     # attention and matmul kernels on the DiT's shapes
#   bash bench/run_gpu.sh imports [--runs 2]          # where the renderer's import stage goes (-X importtime)
#   bash bench/run_gpu.sh hostile [ITEM ...]          # the fp8 recipes on the hostile model against the quality gate
#
# Raw results append to $RESULTS_DIR/runs.jsonl (default bench/results; $OUT on the lent device machine).
# Wheels in ./.whl are installed first where the machine lacks packages (diffusers and importlib_metadata
# for the matrix; celery, kombu, redis and the rest of the worker's for coldstart), and a redis-server
# bundled in ./.redis (binary plus lib/) serves coldstart where none is on PATH.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  # Installed once per machine; later calls (and concurrent ones) reuse it. Byte-compiled as pip does by
  # default (and as the Docker image is): a worker's cold start otherwise compiles every module it imports.
  if [ ! -f /tmp/site/.zfarm-installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && touch /tmp/site/.zfarm-installed || exit 1
  fi
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The lent machines' Python ships its packages without byte-compiled modules and sets
# PYTHONDONTWRITEBYTECODE=1, so every start compiled each imported module from source: the worker's
# import stage took 14.7 s there, 3.9-4.6 s byte-compiled (bench/results/). A pip install, and the
# worker image (deploy/Dockerfile.worker), byte-compile; so does this, once per machine, into a cache
# tree of its own (PYTHONPYCACHEPREFIX) rather than into the machine's folders.
# ZFARM_BENCH_SOURCE_IMPORTS=1 skips it.
if [ -z "${ZFARM_BENCH_SOURCE_IMPORTS:-}" ]; then
  export PYTHONPYCACHEPREFIX=/tmp/zfarm-pycache
  if [ ! -f "$PYTHONPYCACHEPREFIX/.zfarm-compiled" ]; then
    mkdir -p "$PYTHONPYCACHEPREFIX"
    t0=$SECONDS
    python3 -m compileall -q -j 0 $(python3 -c 'import site; print(" ".join(site.getsitepackages()))') \
      ${PYTHONPATH//:/ } >/dev/null 2>&1 || echo "run_gpu: some modules did not byte-compile; they compile at import" >&2
    touch "$PYTHONPYCACHEPREFIX/.zfarm-compiled"
    echo "run_gpu: byte-compiled the installed packages in $((SECONDS - t0)) s" >&2
  fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DIR=${ZFARM_BENCH_DIR:-/tmp/zfarm-full}
RESULTS_DIR=${RESULTS_DIR:-${OUT:-bench/results}}
mkdir -p "$RESULTS_DIR"
cmd=${1:-}; shift || true
case "$cmd" in
  smoke) python3 -m bench.profiles smoke ;;
  build) python3 -m bench.profiles build "$DIR" ;;
  matrix)
    python3 -m bench.profiles build "$DIR" | tail -1 || exit 1
    python3 -m bench.profiles matrix "$DIR" "$@" --jsonl "$RESULTS_DIR/runs.jsonl" \
      --timeout-s "${RUN_TIMEOUT_S:-300}" --deadline-s "${DEADLINE_S:-1000000}" ${WARM_IMAGES:+--n "$WARM_IMAGES"} \
      --fidelity-dir "${FIDELITY_DIR:-/tmp/zfarm-fidelity}" \
      ${HOST_MEMORY_LIMIT_GIB:+--host-memory-limit-gib "$HOST_MEMORY_LIMIT_GIB"} ;;
  worker)
    for c in "$@"; do
      python3 -m bench.profiles worker-check "$DIR" --vram-class "$c" --jsonl "$RESULTS_DIR/worker_check.jsonl" \
        2>"$RESULTS_DIR/worker_check_$c.err" | tail -1 || tail -5 "$RESULTS_DIR/worker_check_$c.err"
    done ;;
  kernels) python3 -m bench.kernels --jsonl "$RESULTS_DIR/kernels.jsonl" "$@" ;;
  imports) python3 -m bench.imports --jsonl "$RESULTS_DIR/imports.jsonl" "$@" ;;
  hostile)
    python3 -m bench.profiles build "$DIR" | tail -1 || exit 1
    python3 -m bench.hostile "$DIR" "$@" --jsonl "$RESULTS_DIR/hostile.jsonl" \
      --images-dir "${HOSTILE_IMAGES_DIR:-/tmp/zfarm-hostile-images}" --timeout-s "${RUN_TIMEOUT_S:-300}" \
      --deadline-s "${DEADLINE_S:-330}" ;;
  table) python3 -m bench.profiles table bench/results/runs.jsonl --link ;;
  coldstart)
    python3 -c 'import celery, kombu, redis, diffusers; print("celery", celery.__version__, "kombu", kombu.__version__,
                "redis", redis.__version__, "diffusers", diffusers.__version__)' || exit 1
    python3 -m bench.profiles build "$DIR" | tail -1 || exit 1
    redis_args=()
    if [ -x .redis/redis-server ]; then  # bundled binary; its lib/ goes on LD_LIBRARY_PATH for redis-server only
      redis_args=(--redis-server "$PWD/.redis/redis-server" --redis-lib "$PWD/.redis/lib")
    fi
    python3 -m bench.cold_start "$DIR" --jsonl "$RESULTS_DIR/cold_start.jsonl" --keep "$RESULTS_DIR/cold_start" \
      --compile-cache-dir "${COMPILE_CACHE_DIR:-/tmp/zfarm-compile-cache}" \
      ${redis_args[@]+"${redis_args[@]}"} "$@" ;;
  *) echo "usage: bash bench/run_gpu.sh smoke|build|matrix ITEMS...|worker CLASSES...|table|coldstart|kernels|imports|hostile [ITEMS...]" >&2; exit 2 ;;
esac
