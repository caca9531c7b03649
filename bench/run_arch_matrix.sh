#!/bin/bash
# Issue 18's emulated runs on one lent H100, in one call: each architecture family's chosen profile
# for each class, under the class cap, with a fidelity comparison against the bf16 resident render.
#   bash bench/run_arch_matrix.sh      (from the repository root, on the GPU machine; ~9 min)
# Results: $OUT/runs.jsonl (or bench/results/runs.jsonl), the log on stdout.
set -u
export WARM_IMAGES=${WARM_IMAGES:-3} RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-150}
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The bf16 reference every fidelity comparison is made against (and the model build, once).
bash bench/run_gpu.sh matrix resident@none
# The RTX 3060 12 GB on a 16 GB host: Ampere, 12 GB class, host memory limited to the machine's.
HOST_MEMORY_LIMIT_GIB=16 bash bench/run_gpu.sh matrix int8mm_fast_te_stream_pinned_compiled@11+emulate=sm_86
# The rest while time lasts, most telling first: Ampere 24 and 16 GB, Turing's T4, Ada's fp8 profile,
# Ampere 8 GB, and an fp8 profile played as Ampere (it must be refused there).
# A run starts only while one more (at most RUN_TIMEOUT_S, 120 s here) still ends inside the call's budget.
RUN_TIMEOUT_S=120 DEADLINE_S=$(( ${ARCH_MATRIX_BUDGET_S:-570} - (SECONDS - start) - 120 )) bash bench/run_gpu.sh matrix \
  int8mm_fast_compiled@23+emulate=sm_86 int8mm_both_fast_compiled@15+emulate=sm_86 \
  int8mm_both_fp32_compiled@15+emulate=sm_75 fp8mm_fast_qk_compiled@23+emulate=sm_89 \
  int8mm_fast_stream_pinned_compiled@7+emulate=sm_86 fp8mm_fast_qk_compiled@23+emulate=sm_86
echo "arch matrix: $((SECONDS - start)) s"
