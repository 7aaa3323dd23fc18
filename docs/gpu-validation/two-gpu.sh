#!/bin/sh
# Issue 15 (prepared in issue 14, NOT RUN YET: no two-GPU machine was available): the real
# thing behind tests/gpus.rs on a machine with two NVIDIA GPUs. A DDP job under torchrun, one rank
# per GPU (`--nproc-per-node {nproc}`); at step 17 rank 1 launches a Triton kernel that stores far
# out of bounds on its GPU (an illegal memory access: Xid 31 naming GPU 1's PCI address and
# rank 1's pid, `CUDA error: an illegal memory access` on its stderr). What should happen:
#   attempt 1  tier gpu, GPUs 0,1, torchrun --nproc-per-node 2
#   fault      xid-31 (and cuda-illegal-address), "gpus":[{"index":1,"ordinal":1,...}]
#   gpus_excluded  GPU 1, remaining [0]
#   attempt 2  tier gpu, CUDA_VISIBLE_DEVICES=0, torchrun --nproc-per-node 1, resumed from
#              ckpt-step00015.pt; the injection needs two ranks, so it trains to step 30 on GPU 0
#   run_finished  succeeded, 2 attempts
# Usage, from the repository root with a release build (cargo build --release):
#   OUT=/tmp/two-gpu sh docs/gpu-validation/two-gpu.sh
# Needs PyTorch with CUDA, Triton and torchrun on PATH, and two visible GPUs.
set -u
# NCCL's NVLink multicast (NVLS) stays off on the lent machines (the device tool's notes).
export NCCL_NVLS_ENABLE=0
REPO=$PWD
B=$REPO/target/release/gpuwarden
OUT=${OUT:-/tmp/gpuwarden-two-gpu}
mkdir -p "$OUT/work"
set -x
nvidia-smi -L
nvidia-smi --query-gpu=index,name,pci.bus_id,uuid --format=csv
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())'
"$B" --version
"$B" probe > "$OUT/probe.txt" 2>&1; cat "$OUT/probe.txt"
cd "$OUT/work" || exit 1
set +x
# CUDA_DEVICE_ORDER=PCI_BUS_ID makes the job's cuda:N follow nvidia-smi's numbering on any mix of
# GPU models (gpuwarden copes without it, by UUID, but the report is easier to read with it).
CUDA_DEVICE_ORDER=PCI_BUS_ID "$B" run --run-dir "$OUT/run" --checkpoints "$OUT/work/ckpt" --grace 5 -- \
    torchrun --standalone --nproc-per-node {nproc} "$REPO/examples/train_eegnex_ddp.py" \
        --device {device} --resume {checkpoint} --ckpt-dir "$OUT/work/ckpt" \
        --steps 30 --ckpt-every 5 --inject-illegal-address-at 17 --inject-rank 1 \
    > "$OUT/run.stdout" 2> "$OUT/run.stderr"
echo "gpuwarden exit code: $?" | tee "$OUT/exit-code.txt"
tail -n 40 "$OUT/run.stderr"
grep -E '"event":"(attempt_started|fault|gpus_excluded|attempt_ended|run_finished)"' "$OUT/run/journal.jsonl"
"$B" report "$OUT/run" > "$OUT/report.txt" 2>&1; cat "$OUT/report.txt"
dmesg 2>/dev/null | tail -n 20 > "$OUT/dmesg-tail.txt"; tail -n 8 "$OUT/dmesg-tail.txt"
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
