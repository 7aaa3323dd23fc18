# Real outputs of the nvidia-smi queries gpuwarden makes, for the test fixtures
# (tests/fixtures/nvidia-smi/): run with `bash` on a machine with an NVIDIA GPU and PyTorch,
# $OUT set. The query strings are the ones in src/sources/health/nvidia.rs and
# src/executor/memory.rs, character for character.
set -u
D=$OUT/captures; mkdir -p $D
GPU=--query-gpu=index,uuid,name,pci.bus_id,compute_cap,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw,ecc.errors.uncorrected.volatile.total,driver_version
APPS=--query-compute-apps=pid,used_memory,gpu_bus_id
q() { LC_ALL=C nvidia-smi "$@" --format=csv,noheader,nounits; echo "exit $?" >&2; }
q $GPU > $D/query-gpu-idle.txt
q $APPS > $D/compute-apps-idle.txt
hold() { exec python3 -c "import torch,time; x=torch.empty($1<<30,dtype=torch.uint8,device='cuda'); x.fill_(1); torch.cuda.synchronize(); print('ready',flush=True); time.sleep(120)"; }
hold 3 > $D/h1.out 2>&1 & P1=$!
hold 5 > $D/h2.out 2>&1 & P2=$!
until grep -q ready $D/h1.out && grep -q ready $D/h2.out; do sleep 0.2; done
q $GPU > $D/query-gpu-two-processes.txt
q $APPS > $D/compute-apps-two-processes.txt
echo "holders: $P1 (3 GiB) $P2 (5 GiB)" > $D/holders.txt
kill -9 $P1 $P2; wait
q $APPS > $D/compute-apps-right-after-kill.txt
sleep 1
q $APPS > $D/compute-apps-1s-after-kill.txt
head -v $D/*.txt
