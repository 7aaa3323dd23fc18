# torchrun as gpuwarden's child on a real GPU machine (issue 12): run with `bash` from the
# repository root, with the release binary built (`cargo build --release`) and $OUT set to a
# directory for the results. Needs PyTorch (and Triton for the real fault). See docs/torchrun.md.
set -u
REPO=$PWD
B=$REPO/target/release/gpuwarden
TORCHRUN="python3 -m torch.distributed.run"
nvidia-smi --query-gpu=name,driver_version,pci.bus_id --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'
$B --version

# Every python process of the job, with its group and session, five times a second.
sample() {
    while :; do
        ps -eo pid,pgid,sid,ppid,etimes,args --no-headers | grep -E 'torch.distributed.run|train_ddp|rank.py' | grep -v grep | sed "s/^/$(date +%T.%N | cut -c1-12) /"
        sleep 0.2
    done
}

# A: the CI scenario (tests/torchrun.rs) under the real torchrun: rank 1 prints the CUDA error
# line at step 3 and hangs, rank 0 waits.
mkdir -p $OUT/a/ckpt && cd $OUT/a
sample > $OUT/a/ps.txt 2>&1 & S=$!
timeout 120 $B run --run-dir $OUT/a/run --checkpoints $OUT/a/ckpt --grace 5 -- \
    $TORCHRUN --standalone --nproc-per-node 2 $REPO/tests/fixtures/rank.py \
    --device {device} --resume {checkpoint} --ckpt-dir $OUT/a/ckpt --record $OUT/a/ranks.jsonl \
    --steps 5 --fault-at 3 --sleep 0.3 > $OUT/a/console.stdout 2> $OUT/a/console.stderr
echo "A: gpuwarden exit code $?" | tee $OUT/a/exit-code.txt
kill $S
cat $OUT/a/ranks.jsonl; tail -n 25 $OUT/a/console.stderr

# B: a real fault: rank 1 of a DistributedDataParallel job (gloo, both ranks on the one GPU)
# runs a Triton kernel that stores out of bounds at step 12.
mkdir -p $OUT/b/ckpt && cd $OUT/b
sample > $OUT/b/ps.txt 2>&1 & S=$!
timeout 400 $B run --run-dir $OUT/b/run --checkpoints $OUT/b/ckpt --grace 5 -- \
    $TORCHRUN --standalone --nproc-per-node 2 $REPO/examples/train_ddp.py \
    --device {device} --resume {checkpoint} --ckpt-dir $OUT/b/ckpt \
    --steps 20 --ckpt-every 5 --inject-illegal-address-at 12 --inject-rank 1 \
    > $OUT/b/console.stdout 2> $OUT/b/console.stderr
echo "B: gpuwarden exit code $?" | tee $OUT/b/exit-code.txt
kill $S
tail -n 40 $OUT/b/console.stderr; tail -n 12 $OUT/b/console.stdout
echo "left behind:"; ps -eo pid,pgid,sid,args | grep -E 'train_ddp|rank.py' | grep -v grep
dmesg 2>/dev/null | tail -n 12 > $OUT/dmesg-tail.txt; tail -n 4 $OUT/dmesg-tail.txt
$B report $OUT/b/run > $OUT/b/report.txt 2>&1; cat $OUT/b/report.txt
# The device tool brings back a limited number of files: the results travel packed, checkpoints
# left out.
cd $OUT && rm -rf a/ckpt b/ckpt && tar czf torchrun-results.tgz a b && rm -rf a b
