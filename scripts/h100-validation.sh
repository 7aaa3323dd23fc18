set -x
REPO=$PWD
B=$REPO/target/release/gpuwarden
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,pci.bus_id --format=csv
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available())'
$B --version
$B probe > $OUT/probe.txt 2>&1; $B probe --json > $OUT/probe.json 2>&1
cat $OUT/probe.txt
mkdir -p $OUT/work && cd $OUT/work
set +x
( $B run --run-dir $OUT/run --checkpoints $OUT/work/ckpt -- python3 $REPO/examples/train_eegnex.py --device {device} --resume {checkpoint} --ckpt-dir $OUT/work/ckpt --steps 30 --ckpt-every 5 --inject-illegal-address-at 17 ) > $OUT/run.stdout 2> $OUT/run.stderr
echo "gpuwarden exit code: $?" | tee $OUT/exit-code.txt
tail -n 30 $OUT/run.stderr
cat $OUT/run/journal.jsonl
dmesg 2>/dev/null | tail -n 20 > $OUT/dmesg-tail.txt; tail -n 8 $OUT/dmesg-tail.txt
$B scan --kernel --json > $OUT/scan-kernel.json 2>$OUT/scan-kernel.stderr; echo "scan --kernel exit: $?"; tail -n 3 $OUT/scan-kernel.json
$B scan $OUT/run/attempt-1.stderr.log > $OUT/scan-attempt1.txt 2>&1; cat $OUT/scan-attempt1.txt
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv
