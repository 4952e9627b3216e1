#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 10 minutes on a one-GPU machine, ending in one table
# (check, result, figure): nccl process groups, bf16 and fp16 (GradScaler) training, FSDP with mixed
# precision, torch.compile, SyncBatchNorm, peak memory and MFU (scripts/bench.py --device cuda), FSDP
# against DDP (scripts/bench_fsdp.py --device cuda), FSDP's per-rank state and meta build on 4 GPUs and
# activation checkpointing's memory and time. Exit 1 when a check fails.
#
#   scripts/gpu_check.sh                # the GPU checks (CPU mode by itself when torch sees no GPU)
#   scripts/gpu_check.sh --cpu          # the same checks on CPU/gloo, tiny sizes; CUDA-only ones say "needs CUDA"
#   scripts/gpu_check.sh --json out.json
#
# PYTHON picks the interpreter (default python3); the checks themselves are scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
