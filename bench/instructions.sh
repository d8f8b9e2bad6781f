#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by valgrind's callgrind. Unlike CPU time,
# the count does not move with what else the machine is doing, so two builds can be compared on a
# busy machine to a fraction of a percent.
#
#   bench/instructions.sh [--old-bin PATH] [--requests N] [--profile]
#
# Each binary serves N JSON requests and then N streams of 32 events (one worker thread, a key with
# no limits, the access log on) in front of the mock upstream; counting is switched on after a
# warm-up and dumped after the last answer, so start-up and shutdown are not counted. --old-bin
# adds an older build beside this one, with the ratio. --profile prints the hottest functions of
# this build's stream run (self cost).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
command -v callgrind_control >/dev/null || { echo "callgrind_control is missing" >&2; exit 1; }
old_bin=""; requests=200; profile=0
while [ $# -gt 0 ]; do
    case $1 in
        --old-bin) old_bin=$(realpath "$2"); shift 2 ;;
        --requests) requests=$2; shift 2 ;;
        --profile) profile=1; shift ;;
        *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
# Two builds: an example pulls in the dev-dependencies' features (tokio's test-util among them),
# which must not reach the binary measured. The mock's own speed is not counted, so debug will do.
cargo build --release --locked --bin tollgate >&2
cargo build --locked --example mock_upstream >&2
new_bin=$PWD/target/release/tollgate
mock_bin=$PWD/target/debug/examples/mock_upstream
dir=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do python3 - "$1" 2>/dev/null <<'PY' && return 0
import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()
PY
    sleep 0.1; done; echo "nothing listens on port $1" >&2; return 1; }

mock_port=$(free_port)
"$mock_bin" --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
pids+=($!)
wait_port "$mock_port"

# Sends N requests one after another on one keep-alive connection and reads every answer whole.
drive() { python3 - "$@" <<'PY'
import re, socket, sys
port, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "stream"
body = b'{"model":"m",%s"messages":[{"role":"user","content":"hi"}]}' % (b'"stream":true,' if stream else b"")
request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
           b"authorization: Bearer tg-0123456789abcdef0123456789abcdef0123456789abcdef\r\n"
           b"content-type: application/json\r\nx-mock-chunks: 32\r\ncontent-length: %d\r\n\r\n"
           % len(body)) + body
conn = socket.create_connection(("127.0.0.1", port))
for _ in range(n):
    conn.sendall(request)
    answer = b""
    while True:
        data = conn.recv(65536)
        if not data:
            sys.exit("the gateway closed the connection")
        answer += data
        head, _, rest = answer.partition(b"\r\n\r\n")
        if not _:
            continue
        if not head.startswith(b"HTTP/1.1 200"):
            sys.exit("not a 200: " + head.decode(errors="replace"))
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if length and len(rest) >= int(length.group(1)):
            break
        if not length and rest.endswith(b"0\r\n\r\n"):
            break
PY
}

# Prints the instructions per request of BIN for MODE (json or stream); leaves the dump in $dir.
count() {
    local bin=$1 mode=$2 name=$3 port admin out
    port=$(free_port); admin=$(free_port); out="$dir/$name-$mode"
    mkdir -p "$out"
    cat >"$out/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
workers = 1
[upstream]
url = "http://127.0.0.1:$mock_port"
[[keys]]
name = "bench"
sha256 = "3afc714881401d7d9a57454c7e41f3583337c49a0258b640b031d09e4a83c0bd"
TOML
    (cd "$out" && RUST_LOG=info exec valgrind --tool=callgrind --compress-strings=no \
        --compress-pos=no --instr-atstart=no --callgrind-out-file="$out/callgrind.%p" \
        "$bin" serve --config "$out/tollgate.toml" >"$out/tollgate.log" 2>&1) &
    local gateway=$!
    pids+=("$gateway")
    wait_port "$port" || { tail -5 "$out/tollgate.log" >&2; exit 1; }
    drive "$port" 20 "$mode"
    callgrind_control -i on "$gateway" >/dev/null 2>&1
    drive "$port" "$requests" "$mode"
    callgrind_control -d "$gateway" >/dev/null 2>&1
    kill -TERM "$gateway"; wait "$gateway" || true
    local dump total
    dump=$(ls "$out"/callgrind.*.1) || { echo "no callgrind dump in $out" >&2; exit 1; }
    total=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$dump" | head -1)
    echo $(( total / requests ))
}

printf '%-14s %22s %22s\n' build "instructions/request" "instructions/stream"
new_json=$(count "$new_bin" json new) && new_stream=$(count "$new_bin" stream new) || exit 1
printf '%-14s %22s %22s\n' "this build" "$new_json" "$new_stream"
if [ -n "$old_bin" ]; then
    old_json=$(count "$old_bin" json old) && old_stream=$(count "$old_bin" stream old) || exit 1
    printf '%-14s %22s %22s\n' "--old-bin" "$old_json" "$old_stream"
    printf '%-14s %22s %22s\n' "new / old" \
        "$(python3 -c "print(f'{$new_json/$old_json:.3f}')")" \
        "$(python3 -c "print(f'{$new_stream/$old_stream:.3f}')")"
fi
echo "($requests requests each, JSON answers and streams of 32 events; one worker; dumps in $dir)"
if [ "$profile" = 1 ]; then
    echo
    echo "== hottest functions of this build's streams (self instructions)"
    callgrind_annotate --inclusive=no "$(ls "$dir"/new-stream/callgrind.*.1)" 2>/dev/null \
        | grep -E '^ *[0-9,]+ \(' | grep -v 'PROGRAM TOTALS' | head -30 | cut -c1-160
fi
