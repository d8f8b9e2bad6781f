#!/usr/bin/env bash
# Where does the gateway's CPU go? Records the tollgate process with `perf` while the bench's
# throughput phase drives it, then prints the hottest symbols (self time) and the syscall mix.
#
#   bench/profile.sh [SECONDS]      (default 9; needs perf and kernel.perf_event_paranoid <= 2
#                                    for your own processes, or root)
#
# The release profile keeps debug info (debug = 1), so call graphs resolve. Output stays in a temp
# dir, printed at the end: open it with `perf report -i <dir>/perf.data`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }
secs=${1:-9}
dir=$(mktemp -d /tmp/tollgate-profile.XXXXXX)
# Build first, then run the bench executable itself: nothing compiles while the clock runs.
exe=$(cargo bench --bench overhead --no-run 2>&1 | tee "$dir/build.log" \
    | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$exe" ] || { cat "$dir/build.log" >&2; echo "cannot find the bench executable" >&2; exit 1; }
# Rounds alternate direct and tollgate, 3.5 s each: cover the recording with room to spare.
rounds=$(( secs / 3 + 2 ))
"$exe" --only tollgate --phases throughput --rounds "$rounds" \
    > "$dir/bench.txt" 2>"$dir/bench.err" &
bench=$!
pid=""
for _ in $(seq 600); do
    pid=$(sed -n 's/^  tollgate .* pid \([0-9][0-9]*\),.*/\1/p' "$dir/bench.txt" | head -1)
    [ -n "$pid" ] && break
    kill -0 "$bench" 2>/dev/null || { cat "$dir/bench.err" >&2; exit 1; }
    sleep 0.1
done
[ -n "$pid" ] || { echo "the bench did not print the gateway's pid" >&2; kill "$bench"; exit 1; }
echo "recording tollgate (pid $pid) for $secs s ..."
perf record -q -F 999 -g --call-graph dwarf,16384 -p "$pid" -o "$dir/perf.data" -- sleep "$secs"
wait "$bench" || true
sed -n '/== 2/,/goal:/p' "$dir/bench.txt"
echo
echo "== by binary (self time)"
perf report -i "$dir/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -8
echo
echo "== hottest symbols (self time)"
perf report -i "$dir/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -40
echo
echo "== selected inclusive costs (access log, layers, upstream client)"
perf report -i "$dir/perf.data" --children --sort sym --stdio -g none 2>/dev/null \
    | grep -E 'Record::finish|tracing_subscriber::fmt::Subscriber|Stdout as std::io::Write>::write_all|tollgate::[a-z_]+::[A-Za-z]+(<S>)? as tower_service|Client<C,B>::send_request|vfs_writev|__x64_sys_recvfrom|ksys_write|__x64_sys_futex' \
    | grep -v '(inlined)' | head -20
echo
echo "perf data and the bench's report: $dir"
