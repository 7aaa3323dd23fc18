#!/bin/sh
# What the live display costs: CPU time and resident memory of `gpuwarden watch` (1 s samples)
# over SECONDS (default 60) in a 100x30 tmux pane on the simulated RX 6800, and of
# `gpuwarden run --ui -- sleep` against `gpuwarden run -- sleep` (gpuwarden's own process).
#
#   benches/ui_cost.sh [path/to/gpuwarden] [seconds]
#
# Reads utime+stime from /proc/PID/stat and VmRSS/VmHWM from /proc/PID/status, after a 5 s
# warm-up and again SECONDS later. Needs tmux.
set -eu
BIN=${1:-target/release/gpuwarden}
SECS=${2:-60}
TICK=$(getconf CLK_TCK)
DIR=$(mktemp -d)
SOCK="$DIR/tmux.sock"
trap 'tmux -S "$SOCK" kill-server 2>/dev/null; rm -rf "$DIR"' EXIT
cp -a tests/data/sysfs "$DIR/sys"

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# measure NAME COMMAND...: runs COMMAND in a fresh pane, finds the gpuwarden process under it.
measure() {
    name=$1; shift
    tmux -S "$SOCK" -f /dev/null new-session -d -s m -x 100 -y 30 "$@"
    sleep 5
    shell=$(tmux -S "$SOCK" display -p -t m '#{pane_pid}')
    pid=$shell
    [ "$(cat /proc/$pid/comm)" = gpuwarden ] || pid=$(pgrep -P "$shell" -x gpuwarden | head -1)
    c0=$(cpu "$pid"); r0=$(rss "$pid")
    sleep "$SECS"
    c1=$(cpu "$pid"); r1=$(rss "$pid"); h=$(hwm "$pid")
    tmux -S "$SOCK" kill-server 2>/dev/null || true
    sleep 1
    awk -v n="$name" -v c0="$c0" -v c1="$c1" -v t="$TICK" -v s="$SECS" -v r0="$r0" -v r1="$r1" -v h="$h" \
        'BEGIN { printf "%-28s CPU %5.2f%% (%.2f s in %d s)  RSS %d -> %d KiB (peak %d KiB)\n", n, 100*(c1-c0)/t/s, (c1-c0)/t, s, r0, r1, h }'
}

measure "watch (1 s samples)" "$BIN" watch --no-kernel-log --sysfs-root "$DIR/sys"
measure "run -- sleep" "$BIN" run --no-kernel-log --sysfs-root "$DIR/sys" --run-dir "$DIR/r1" -- sleep $((SECS + 30))
measure "run --ui -- sleep" "$BIN" run --ui --no-kernel-log --sysfs-root "$DIR/sys" --run-dir "$DIR/r2" -- sleep $((SECS + 30))
