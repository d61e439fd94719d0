#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the proxy's own
# user-space work (hyper, tokio and the allocator included; the kernel not), which
# unlike wall-clock figures does not move with the load on a shared machine, so two
# builds can be compared by a fraction of a percent. A static nginx upstream (as in
# overhead-wrk.sh), then for each variant: the process starts under callgrind with
# instrumentation off, WARM requests warm it up (connections, pools, caches), and
# only the next N requests (4 keep-alive clients, GET /api/accounts) are counted.
#
#   cargo build --release --bin klaviyo-proxy
#   cargo build --release --bench hyper_floor     # optional: the hyper-floor variant
#   benches/instructions.sh                       # N=2000 WARM=400
#
# Variants: klaviyo-proxy (limits lifted), klaviyo-proxy+lim (limits on: one account,
# limits that never bind), hyper-floor when built, and compare / compare+lim for
# COMPARE_BIN=/path/to/another/klaviyo-proxy. KEEP=1 keeps the callgrind files (for
# callgrind_annotate --inclusive=yes). About a minute per variant.
#
# Needs valgrind (Debian package valgrind), nginx and python3. Everything it starts
# runs on 127.0.0.1 and is stopped by its PID on exit.
set -euo pipefail

N=${N:-2000}
WARM=${WARM:-400}
# Serving threads of every variant. One by default: with two, how the kernel spreads
# the 4 connections over the SO_REUSEPORT listeners (4-0, 3-1 or 2-2) changes how
# often each thread parks, and with it the count by about half a percent.
THREADS=${THREADS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KLAVIYO_PROXY_BIN:-$ROOT/target/release/klaviyo-proxy}
for tool in valgrind callgrind_control callgrind_annotate nginx python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "build it first: cargo build --release --bin klaviyo-proxy" >&2; exit 1; }

# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh" instructions

start_static_upstream

# N requests over 4 keep-alive connections; fails on anything but 200.
cat >"$WORK/client.py" <<'EOF'
import http.client, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
bad = []
def run(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(k):
        c.request("GET", "/api/accounts", headers={"Authorization": "Klaviyo-API-Key pk_bench", "revision": "2026-07-15"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            bad.append(r.status)
threads = [threading.Thread(target=run, args=(n // 4,)) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
if bad:
    sys.exit(f"{len(bad)} answers were not 200, e.g. {bad[:3]}")
EOF

LIMITS_ON=$'[limits.operations.get_accounts]\nburst_per_second = 100000000\nsteady_per_minute = 4000000000'

# One variant: $1 name, $2 binary, $3 config ("" for hyper-floor). Prints its line.
count() {
    local name=$1 bin=$2 toml=$3 port admin pid out
    port=$(free_port)
    admin=$(free_port)
    out="$WORK/callgrind.$name"
    local vg=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$out")
    if [ "$name" = hyper-floor ]; then
        "${vg[@]}" "$bin" "127.0.0.1:$port" "127.0.0.1:$UPSTREAM_PORT" "$THREADS" >/dev/null 2>"$WORK/$name.log" &
    else
        printf '[server]\nthreads = %s\n%s\n' "$THREADS" "$toml" >"$WORK/$name.toml"
        KLAVIYO_PROXY_LOG_LEVEL=warn "${vg[@]}" "$bin" serve --listen "127.0.0.1:$port" \
            --admin-listen "127.0.0.1:$admin" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
            --config "$WORK/$name.toml" >/dev/null 2>"$WORK/$name.log" &
    fi
    pid=$!
    PIDS+=("$pid")
    # Under valgrind the start takes seconds, not milliseconds.
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    python3 "$WORK/client.py" "$port" "$WARM"
    callgrind_control -i on "$pid" >/dev/null 2>&1
    python3 "$WORK/client.py" "$port" "$N"
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local total=0 f ir
    for f in "$out".*; do
        ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
        total=$((total + ${ir:-0}))
    done
    printf '%-18s %10d instructions per request\n' "$name" $((total / N))
    echo "$name $((total / N))" >>"$WORK/results"
}

echo "callgrind: $N requests counted after $WARM, 4 keep-alive clients, GET /api/accounts, $THREADS serving thread(s)"
count klaviyo-proxy "$BIN" $'[limits]\nenabled = false'
count klaviyo-proxy+lim "$BIN" "$LIMITS_ON"
FLOOR_BIN=${FLOOR_BIN:-$(ls -t "$ROOT"/target/release/deps/hyper_floor-* 2>/dev/null | grep -v '\.d$' | head -1 || true)}
if [ -n "$FLOOR_BIN" ] && [ -x "$FLOOR_BIN" ]; then
    count hyper-floor "$FLOOR_BIN" ""
fi
if [ -n "${COMPARE_BIN:-}" ]; then
    count compare "$COMPARE_BIN" $'[limits]\nenabled = false'
    count compare+lim "$COMPARE_BIN" "$LIMITS_ON"
fi
awk '
    { v[$1] = $2 }
    END {
        if ("compare" in v) printf "klaviyo-proxy / compare: %.3f, limits on: %.3f\n", v["klaviyo-proxy"] / v["compare"], v["klaviyo-proxy+lim"] / v["compare+lim"]
        if ("hyper-floor" in v) printf "klaviyo-proxy / hyper-floor: %.2f\n", v["klaviyo-proxy"] / v["hyper-floor"]
        printf "limits on / lifted: %.3f\n", v["klaviyo-proxy+lim"] / v["klaviyo-proxy"]
    }' "$WORK/results"
