#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by valgrind's callgrind. Unlike CPU time,
# the count does not move with what else the machine is doing, so two builds, or two configs, can
# be compared on a busy machine to a fraction of a percent.
#
#   bench/instructions.sh [--rows LIST] [--old-bin PATH] [--requests N] [--profile]
#
# Each row serves N JSON requests and then N streams of 32 events (one worker thread, a key with
# no limits, the access log on) in front of the mock upstream; counting is switched on after a
# warm-up and the counts are dumped after the last answer, so start-up and shutdown are not
# counted. Every thread of the gateway is counted (the ledger writers too), the kernel is not.
# Rows (--rows, comma-separated, default "tollgate"):
#   tollgate       this build, one upstream endpoint
#   tollgate-3     one [[upstreams]] pool of three mock endpoints, least_requests
#   tollgate-full  the deployed shape: a key with concurrency, rate, a token quota and a max_tokens
#                  cap, local state in a file and the ledger to a file
#   tollgate-file  the ledger to a file
#   tollgate-pg    the ledger to PostgreSQL (a database of its own on 127.0.0.1:5432, dropped after)
#   tollgate-old   the binary of --old-bin, on the tollgate row's config
#   traces-1       [telemetry] on, every trace kept (sample_ratio 1.0), spans sent to a local OTLP sink
#   traces-0.01    the same at sample_ratio 0.01 (what a traceparent upstream and unsampled spans cost)
# --old-bin adds tollgate-old to the rows. Every row is printed with its ratio to the first.
# --profile prints the hottest functions of the first row's JSON requests and streams (self cost).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
command -v callgrind_control >/dev/null || { echo "callgrind_control is missing" >&2; exit 1; }
old_bin=""; requests=200; profile=0; rows="tollgate"
while [ $# -gt 0 ]; do
    case $1 in
        --rows) rows=$2; shift 2 ;;
        --old-bin) old_bin=$(realpath "$2"); shift 2 ;;
        --requests) requests=$2; shift 2 ;;
        --profile) profile=1; shift ;;
        *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
[ -n "$old_bin" ] && rows="$rows,tollgate-old"
# Two builds: an example pulls in the dev-dependencies' features (tokio's test-util among them),
# which must not reach the binary measured. The mock's own speed is not counted, so debug will do.
cargo build --release --locked --bin tollgate >&2
cargo build --locked --example mock_upstream >&2
target=${CARGO_TARGET_DIR:-$PWD/target}
new_bin=$target/release/tollgate
mock_bin=$target/debug/examples/mock_upstream
dir=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
pids=()
database=""
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    if [ -n "$database" ]; then
        psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $database" postgres >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do python3 - "$1" 2>/dev/null <<'PY' && return 0
import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()
PY
    sleep 0.1; done; echo "nothing listens on port $1" >&2; return 1; }

# Three mock upstreams: the one-endpoint rows use the first.
mock_ports=()
for _ in 1 2 3; do
    port=$(free_port)
    "$mock_bin" --listen "127.0.0.1:$port" >>"$dir/mock.log" 2>&1 &
    pids+=($!)
    wait_port "$port"
    mock_ports+=("$port")
done

# A local OTLP/HTTP sink for the traces rows: answers every POST with 200 and counts the bytes.
otlp_port=""
if [[ ",$rows," == *",traces-"* ]]; then
    otlp_port=$(free_port)
    python3 - "$otlp_port" "$dir/otlp.log" >/dev/null 2>&1 <<'PY' &
import http.server, sys
port, log = int(sys.argv[1]), sys.argv[2]
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(log, "a") as out:
            out.write(f"{self.path} {len(body)}\n")
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
PY
    pids+=($!)
    wait_port "$otlp_port"
fi

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

# The config of ROW (without [server]).
row_config() {
    local row=$1 out=$2
    case $row in
        tollgate-3)
            printf '[[upstreams]]\nname = "bench"\nmodels = ["*"]\nendpoints = ["http://127.0.0.1:%s", "http://127.0.0.1:%s", "http://127.0.0.1:%s"]\n' \
                "${mock_ports[@]}" ;;
        *) printf '[upstream]\nurl = "http://127.0.0.1:%s"\n' "${mock_ports[0]}" ;;
    esac
    case $row in
        tollgate-file) printf '[ledger]\npath = "%s/usage.jsonl"\n' "$out" ;;
        tollgate-full)
            printf '[state]\npath = "%s/state.json"\n[ledger]\npath = "%s/usage.jsonl"\n' "$out" "$out" ;;
        tollgate-pg)
            printf '[state]\npath = "%s/state.json"\n[ledger]\npostgres_url_env = "TOLLGATE_BENCH_LEDGER_URL"\n' "$out" ;;
        traces-*)
            printf '[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\nbatch_delay = "100ms"\n' \
                "$otlp_port" "${row#traces-}" ;;
    esac
    printf '[[keys]]\nname = "bench"\nsha256 = "3afc714881401d7d9a57454c7e41f3583337c49a0258b640b031d09e4a83c0bd"\n'
    # Limits that never refuse the bench, but are all checked and charged.
    [ "$row" = tollgate-full ] && printf 'concurrency = 64\nrate = { requests = 1000000, per = "1s" }\nmax_tokens = 4096\nquotas = [{ tokens = 1000000000000, per = "1d" }]\n'
    return 0
}

# Prints the instructions per request of ROW for MODE (json or stream); leaves the dump in $dir.
count() {
    local row=$1 mode=$2 bin=$new_bin port admin out
    [ "$row" = tollgate-old ] && bin=$old_bin
    port=$(free_port); admin=$(free_port); out="$dir/$row-$mode"
    mkdir -p "$out"
    {
        printf '[server]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nworkers = 1\n' "$port" "$admin"
        row_config "$row" "$out"
    } >"$out/tollgate.toml"
    (cd "$out" && RUST_LOG=info TOLLGATE_BENCH_LEDGER_URL="postgres://postgres@127.0.0.1:5432/$database?sslmode=disable" \
        exec valgrind --tool=callgrind --compress-strings=no --compress-pos=no --instr-atstart=no \
        --callgrind-out-file="$out/callgrind.%p" \
        "$bin" serve --config "$out/tollgate.toml" >"$out/tollgate.log" 2>&1) &
    local gateway=$!
    pids+=("$gateway")
    wait_port "$port" || { tail -5 "$out/tollgate.log" >&2; exit 1; }
    drive "$port" 20 "$mode"
    callgrind_control -i on "$gateway" >/dev/null 2>&1
    drive "$port" "$requests" "$mode"
    # The ledger writers write in batches: give the last one time to go before the dump.
    sleep 1
    callgrind_control -d "$gateway" >/dev/null 2>&1
    kill -TERM "$gateway"; wait "$gateway" || true
    local dump total
    dump=$(ls "$out"/callgrind.*.1) || { echo "no callgrind dump in $out" >&2; exit 1; }
    total=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$dump" | head -1)
    echo $(( total / requests ))
}

if [[ ",$rows," == *",tollgate-pg,"* ]]; then
    command -v psql >/dev/null || { echo "tollgate-pg needs psql and PostgreSQL on 127.0.0.1:5432" >&2; exit 1; }
    database="tollgate_instructions_$$"
    psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $database" postgres >/dev/null
fi

printf '%-14s %22s %10s %22s %10s\n' row "instructions/request" ratio "instructions/stream" ratio
first_json=""; first_stream=""; first_row=""
for row in ${rows//,/ }; do
    json=$(count "$row" json) && stream=$(count "$row" stream) || exit 1
    if [ -z "$first_json" ]; then first_json=$json; first_stream=$stream; first_row=$row; fi
    printf '%-14s %22s %10s %22s %10s\n' "$row" "$json" \
        "$(python3 -c "print(f'{$json/$first_json:.3f}')")" "$stream" \
        "$(python3 -c "print(f'{$stream/$first_stream:.3f}')")"
done
echo "($requests requests each, JSON answers and streams of 32 events; one worker; dumps in $dir)"
if [ "$profile" = 1 ]; then
    for mode in json stream; do
        echo
        echo "== hottest functions of $first_row's $mode requests (self instructions)"
        callgrind_annotate --inclusive=no "$(ls "$dir/$first_row-$mode"/callgrind.*.1)" 2>/dev/null \
            | grep -E '^ *[0-9,]+ \(' | grep -v 'PROGRAM TOTALS' | head -30 | cut -c1-160
    done
fi
