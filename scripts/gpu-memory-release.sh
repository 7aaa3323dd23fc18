# How long an NVIDIA GPU keeps a dead process's memory (issue 11, "a GPU free before the next
# attempt"): run with `bash` on a GPU machine with PyTorch, $OUT set. A child allocates 8 GiB and
# is SIGKILLed (and, second case, dies in a CUDA illegal-address fault); nvidia-smi's
# per-process list and the GPU's memory.used are polled until the memory is back. The captures
# are kept as fixtures (real output of this driver).
set -u
mkdir -p $OUT/mem
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee $OUT/mem/gpu.csv
poll() { # $1: pid, $2: label
    local t0=$(date +%s%N) i=0
    while :; do
        local now=$(( ($(date +%s%N) - t0) / 1000000 ))
        local apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits)
        local used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)
        echo "$now ms used=$used apps=[$apps]" >> $OUT/mem/$2.poll
        if ! grep -q "^$1," <<<"$apps"; then echo "$2: pid $1 gone from compute-apps after $now ms, memory.used $used MiB" | tee -a $OUT/mem/summary.txt; break; fi
        i=$((i+1)); [ $i -gt 400 ] && { echo "$2: still listed after $now ms" | tee -a $OUT/mem/summary.txt; break; }
    done
}
# 1: SIGKILL while holding 8 GiB.
python3 -c 'import torch,time,sys; x=torch.empty(8<<30,dtype=torch.uint8,device="cuda"); x.fill_(1); torch.cuda.synchronize(); print("ready",flush=True); time.sleep(600)' > $OUT/mem/hold.out 2>&1 &
P=$!
until grep -q ready $OUT/mem/hold.out; do sleep 0.1; done
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > $OUT/mem/compute-apps-holding.csv
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits > $OUT/mem/compute-apps-holding.noheader.csv
nvidia-smi -q -d MEMORY,PIDS > $OUT/mem/nvidia-smi-q-pids-holding.txt
nvidia-smi > $OUT/mem/nvidia-smi-holding.txt
kill -9 $P; poll $P sigkill
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > $OUT/mem/compute-apps-after.csv
# 2: an illegal-address fault (the kernel Xid 31 path), memory held at the time.
cat > $OUT/mem/fault.py <<'PY'
import torch, triton, triton.language as tl, time
x = torch.empty(8 << 30, dtype=torch.uint8, device="cuda"); x.fill_(1)
@triton.jit
def bad(p):
    tl.store(p + (1 << 34), 1.0)
buf = torch.zeros(1, device="cuda")
print("ready", flush=True); time.sleep(1)
bad[(1,)](buf); torch.cuda.synchronize()
PY
python3 $OUT/mem/fault.py > $OUT/mem/fault.out 2>&1 &
P=$!
until grep -q ready $OUT/mem/fault.out; do sleep 0.1; done
wait $P; echo "fault.py exit $?" >> $OUT/mem/summary.txt
poll $P fault
tail -3 $OUT/mem/fault.out
cat $OUT/mem/summary.txt
