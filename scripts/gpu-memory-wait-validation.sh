# The wait for a faulted attempt's GPU memory (issue 11) on a real NVIDIA GPU: run with `bash`
# from the repository root with the release binary built and $OUT set. `[policy]` makes the
# illegal-address fault restart on the same GPU tier, so the second attempt is a GPU attempt
# after a faulted one and waits (nvidia-smi's compute-apps list) for the first one's memory.
# The fault comes back at the same step from the same checkpoint: the crash-loop sense then
# takes the run down to the CPU. The run directory comes back packed, checkpoints left out.
set -u
REPO=$PWD
B=$REPO/target/release/gpuwarden
mkdir -p $OUT/w/ckpt && cd $OUT/w
printf '[policy]\ngpu_memory_fault = "restart"\n' > gpuwarden.toml
timeout 300 $B run --config gpuwarden.toml --run-dir $OUT/w/run --checkpoints $OUT/w/ckpt -- \
    python3 $REPO/examples/train_eegnex.py --device {device} --resume {checkpoint} \
    --ckpt-dir $OUT/w/ckpt --steps 25 --ckpt-every 5 --inject-illegal-address-at 17 \
    > console.stdout 2> console.stderr
echo "gpuwarden exit code $?" | tee exit-code.txt
grep -E 'gpu_memory_wait|attempt_started|"fault"' run/journal.jsonl | cut -c1-400
grep gpuwarden: console.stderr
$B report run > report.txt 2>&1; cat report.txt
cd $OUT && rm -rf w/ckpt && tar czf w.tgz w && rm -rf w
