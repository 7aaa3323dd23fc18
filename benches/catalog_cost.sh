#!/usr/bin/env bash
# What the fault catalog costs (issue 13): start time and RSS of `gpuwarden run -- true`, CPU
# time and RSS of an idle run (`run -- sleep 60`), and `scan` throughput against ripgrep with the
# catalog's own regexes, for one or more gpuwarden binaries side by side.
#
#   benches/catalog_cost.sh [BINARY...]     default: target/release/gpuwarden (built here)
#
# Example, before and after a change:
#   cp target/release/gpuwarden /tmp/gpuwarden-before   # on the old commit
#   benches/catalog_cost.sh /tmp/gpuwarden-before target/release/gpuwarden
#
# Needs GNU time (/usr/bin/time) and ripgrep (`apt-get install ripgrep`). The scan log and the
# ripgrep pattern file are those of `cargo bench --bench scan` (made here with SCAN_BENCH_MB=200
# when missing). Settings: RUNS (7) start runs, SCAN_RUNS (3), IDLE_SECS (60). Every figure is the
# median of its runs; on a shared machine wall times are noisy, so CPU times are given too.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-7}
SCAN_RUNS=${SCAN_RUNS:-3}
IDLE_SECS=${IDLE_SECS:-60}
MB=${SCAN_BENCH_MB:-200}
LOG=target/scan-bench/realistic-${MB}MB.log
PATTERNS=target/scan-bench/patterns.rust

if [ $# -eq 0 ]; then
    cargo build --release --bin gpuwarden >&2
    set -- target/release/gpuwarden
fi
if [ ! -s "$LOG" ] || [ ! -s "$PATTERNS" ]; then
    SCAN_BENCH_MB=$MB GREP_MB=1 cargo bench --bench scan >&2
fi

median() { sort -g | awk '{a[NR]=$1} END {m=int((NR+1)/2); print a[m]}'; }

# One run under GNU time: prints "wall_s user+sys_s maxrss_kb".
measure() {
    local report
    report=$(mktemp)
    /usr/bin/time -o "$report" -f 'TIME %e %U %S %M' "$@" >/dev/null 2>&1 || true
    grep '^TIME' "$report" | tail -1 | awk '{printf "%s %.3f %s\n", $2, $3 + $4, $5}'
    rm -f "$report"
}

start_cost() {
    local bin=$1 rows=()
    for _ in $(seq "$RUNS"); do
        local t0 t1 first
        t0=$(date +%s%N)
        # The job prints the time it started: the supervisor's start is the gap before it.
        first=$("$bin" run -- date +%s%N 2>/dev/null | head -1)
        t1=$(date +%s%N)
        rows+=("$(( (first - t0) / 1000 )) $(( (t1 - t0) / 1000 ))")
    done
    local to_job whole
    to_job=$(printf '%s\n' "${rows[@]}" | awk '{print $1/1000}' | median)
    whole=$(printf '%s\n' "${rows[@]}" | awk '{print $2/1000}' | median)
    local m=()
    for _ in $(seq "$RUNS"); do m+=("$(measure "$bin" run -- true)"); done
    local cpu rss
    cpu=$(printf '%s\n' "${m[@]}" | awk '{print $2}' | median)
    rss=$(printf '%s\n' "${m[@]}" | awk '{print $3}' | median)
    printf '  run -- true: job starts after %s ms, whole run %s ms (wall); CPU %s s; max RSS %.1f MB\n' \
        "$to_job" "$whole" "$cpu" "$(awk -v k="$rss" 'BEGIN{print k/1024}')"
}

idle_cost() {
    local bin=$1 r
    r=$(measure "$bin" run -- sleep "$IDLE_SECS")
    awk -v s="$IDLE_SECS" '{printf "  run -- sleep %s (idle): CPU %s s; max RSS %.1f MB\n", s, $2, $3/1024}' <<<"$r"
}

scan_cost() {
    local name=$1; shift
    local bytes m=()
    bytes=$(stat -c %s "$LOG")
    for _ in $(seq "$SCAN_RUNS"); do m+=("$(measure "$@")"); done
    local wall cpu
    wall=$(printf '%s\n' "${m[@]}" | awk '{print $1}' | median)
    cpu=$(printf '%s\n' "${m[@]}" | awk '{print $2}' | median)
    awk -v n="$name" -v b="$bytes" -v w="$wall" -v c="$cpu" \
        'BEGIN {printf "  %-34s %6.2f s wall %6.0f MB/s   %6.2f s CPU %6.0f MB/s\n", n, w, b/1e6/w, c, b/1e6/c}'
}

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); log: $LOG ($(( $(stat -c %s "$LOG") / 1000000 )) MB)"
scan_cost "rg --no-unicode -c -f (same regexes)" \
    rg --no-config --no-unicode --regex-size-limit 1G --dfa-size-limit 1G -c -f "$PATTERNS" "$LOG"
for bin in "$@"; do
    echo "$bin"
    start_cost "$bin"
    scan_cost "scan --json" "$bin" scan --json "$LOG"
done
scan_cost "rg --no-unicode -c -f (again)" \
    rg --no-config --no-unicode --regex-size-limit 1G --dfa-size-limit 1G -c -f "$PATTERNS" "$LOG"
if [ "$IDLE_SECS" -gt 0 ]; then
    for bin in "$@"; do
        echo "$bin"
        idle_cost "$bin"
    done
fi
