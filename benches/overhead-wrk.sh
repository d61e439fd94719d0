#!/usr/bin/env bash
# The proxy's per-request overhead against the reverse proxies a user would compare it
# with, all in one run: a static nginx upstream, then wrk against
#   direct              the static upstream itself
#   nginx               1 worker, proxy_pass with upstream keepalive
#   haproxy             1 thread, http-reuse always (skipped when not installed)
#   klaviyo-proxy       limits lifted (limits.enabled = false)
#   klaviyo-proxy+lim   limits on: one account, limits that never bind
#   hyper-floor         the least a hyper proxy costs (benches/hyper_floor.rs: one
#                       upstream connection per client connection, nothing else),
#                       when built: cargo build --release --bench hyper_floor
# CPU per request is the serving process's utime+stime over a wrk run (nginx's worker
# included; for direct, the upstream's) divided by the requests wrk completed.
# Rounds are interleaved (every variant once per round, the order rotated each round)
# and the table shows per-variant medians, so a burst of load from elsewhere on the
# machine hits every variant alike.
#
#   cargo build --release --bin klaviyo-proxy
#   cargo build --release --bench hyper_floor     # optional: the hyper-floor variant
#   benches/overhead-wrk.sh            # ROUNDS=3 SECS=10 CONNS=32 THREADS=1
#
# PROFILE=1 then profiles the klaviyo-proxy variant (PROFILE_VARIANT=klaviyo-proxy+lim:
# the one with limits on) under the same load (perf record
# -F 999 -g for one more wrk run) and prints the top entries (needs linux-perf).
# KEEP=1 keeps the work directory (configs, the proxies' logs) for inspection.
# COMPARE_BIN=/path/to/another/klaviyo-proxy adds that build (limits lifted) as the
# variant `compare`, interleaved with the rest: before/after figures from one run.
# COMPARE_LIMITS=1 runs `compare` with limits on (as klaviyo-proxy+lim) instead.
# ONLY="klaviyo-proxy+lim compare" measures only those variants (and direct).
# PROXY_TOML adds config lines to this build's two variants (e.g. server.threads).
#
# Needs nginx and wrk (Debian packages nginx, wrk; haproxy optional) and python3 (free
# ports). Everything it starts runs on 127.0.0.1 and is stopped by its PID on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
CONNS=${CONNS:-32}
THREADS=${THREADS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KLAVIYO_PROXY_BIN:-$ROOT/target/release/klaviyo-proxy}
URL_PATH=${URL_PATH:-/api/accounts}

for tool in nginx wrk python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "build it first: cargo build --release --bin klaviyo-proxy" >&2; exit 1; }
HAPROXY=$(command -v haproxy || true)

# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh" overhead

declare -A URL PID

start_static_upstream
PID[upstream]=$UPSTREAM_PID
UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT"

URL[direct]=$UPSTREAM
PID[direct]=${PID[upstream]}

NGINX_PORT=$(free_port)
start_nginx proxy "$NGINX_PORT" "
    upstream klaviyo { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://klaviyo;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering on;
        }
    }"
URL[nginx]="http://127.0.0.1:$NGINX_PORT"
PID[nginx]=$NGINX_PID

if [ -n "$HAPROXY" ]; then
    HAPROXY_PORT=$(free_port)
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend klaviyo
backend klaviyo
    server upstream 127.0.0.1:$UPSTREAM_PORT
EOF
    "$HAPROXY" -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 &
    PIDS+=($!)
    PID[haproxy]=$!
    wait_port "$HAPROXY_PORT"
    URL[haproxy]="http://127.0.0.1:$HAPROXY_PORT"
fi

# The proxy, as a user starts it: defaults plus the one table a variant needs.
start_proxy() {
    local name=$1 toml=$2 bin=${3:-$BIN} port admin
    port=$(free_port)
    admin=$(free_port)
    local extra=${PROXY_TOML:-}
    [ "$bin" = "$BIN" ] || extra=""  # another build may not know the keys
    printf '%s\n%s\n' "$extra" "$toml" >"$WORK/$name.toml"
    KLAVIYO_PROXY_LOG_LEVEL=warn "$bin" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "$UPSTREAM" --config "$WORK/$name.toml" >/dev/null 2>"$WORK/$name.log" &
    PIDS+=($!)
    PID[$name]=$!
    wait_port "$port"
    URL[$name]="http://127.0.0.1:$port"
}
LIMITS_ON=$'[limits.operations.get_accounts]\nburst_per_second = 100000000\nsteady_per_minute = 4000000000'
start_proxy klaviyo-proxy $'[limits]\nenabled = false'
start_proxy klaviyo-proxy+lim "$LIMITS_ON"

VARIANTS=(direct nginx)
[ -n "$HAPROXY" ] && VARIANTS+=(haproxy)
VARIANTS+=(klaviyo-proxy klaviyo-proxy+lim)
FLOOR_BIN=${FLOOR_BIN:-$(ls -t "$ROOT"/target/release/deps/hyper_floor-* 2>/dev/null | grep -v '\.d$' | head -1 || true)}
if [ -n "$FLOOR_BIN" ] && [ -x "$FLOOR_BIN" ]; then
    FLOOR_PORT=$(free_port)
    "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UPSTREAM_PORT" >/dev/null 2>&1 &
    PIDS+=($!)
    PID[hyper-floor]=$!
    wait_port "$FLOOR_PORT"
    URL[hyper-floor]="http://127.0.0.1:$FLOOR_PORT"
    VARIANTS+=(hyper-floor)
fi
if [ -n "${COMPARE_BIN:-}" ]; then
    if [ -n "${COMPARE_LIMITS:-}" ]; then
        start_proxy compare "$LIMITS_ON" "$COMPARE_BIN"
    else
        start_proxy compare $'[limits]\nenabled = false' "$COMPARE_BIN"
    fi
    VARIANTS+=(compare)
fi
if [ -n "${ONLY:-}" ]; then
    kept=()
    for v in "${VARIANTS[@]}"; do
        if [ "$v" = direct ] || [[ " $ONLY " == *" $v "* ]]; then kept+=("$v"); fi
    done
    VARIANTS=("${kept[@]}")
fi

# Every variant must answer 200 before it is measured.
for v in "${VARIANTS[@]}"; do
    code=$(python3 - "${URL[$v]}$URL_PATH" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Klaviyo-API-Key pk_bench", "revision": "2026-07-15"})
try:
    print(urllib.request.urlopen(req, timeout=5).status)
except Exception as e:
    print(e)
EOF
)
    [ "$code" = 200 ] || { echo "$v answered $code" >&2; exit 1; }
done

# CPU time (utime+stime, clock ticks) of process $1 and its children (nginx's worker).
cpu_ticks() {
    local p t=0
    for p in "$1" $(pgrep -P "$1" || true); do
        [ -r "/proc/$p/stat" ] || continue
        t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
    done
    echo "$t"
}

# One wrk run against $1 whose serving process is $2: prints
# "req/s p50_ms p99_ms errors cpu_us_per_request".
measure() {
    local before after
    before=$(cpu_ticks "$2")
    wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency \
        -H 'Authorization: Klaviyo-API-Key pk_bench' -H 'revision: 2026-07-15' "$1$URL_PATH" >"$WORK/wrk.out"
    after=$(cpu_ticks "$2")
    awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
            function ms(v) {
                if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
                if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
                if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
                return v
            }
            $1 == "50%" { p50 = ms($2) }
            $1 == "99%" { p99 = ms($2) }
            /Non-2xx|Socket errors/ { err = err $0 }
            $1 == "Requests/sec:" { rps = $2 }
            $2 == "requests" && $3 == "in" { n = $1 }
            END { printf "%s %.3f %.3f %s %.1f\n", rps, p50, p99, (err == "" ? "-" : "ERR"), (n > 0 ? ticks / hz * 1e6 / n : 0) }' "$WORK/wrk.out"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk -t$THREADS -c$CONNS -d${SECS}s --latency, GET $URL_PATH, $ROUNDS interleaved rounds"
for round in $(seq 1 "$ROUNDS"); do
    n=${#VARIANTS[@]}
    for i in $(seq 0 $((n - 1))); do
        v=${VARIANTS[$(((i + round - 1) % n))]}
        r=$(measure "${URL[$v]}" "${PID[$v]}")
        echo "$v $r" >>"$WORK/results"
        printf '  round %d %-18s %s\n' "$round" "$v" "$r"
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$WORK/results" "${VARIANTS[@]}" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    v, rps, p50, p99, err, cpu = line.split()
    rows.setdefault(v, []).append((float(rps), float(p50), float(p99), float(cpu), err))
med = {v: tuple(statistics.median(r[i] for r in rs) for i in range(4)) for v, rs in rows.items()}
direct = med["direct"][0]
print()
print("| variant | req/s vs direct | p50 | p99 | CPU per request |")
print("|---|---|---|---|---|")
for v in sys.argv[2:]:
    rps, p50, p99, cpu = med[v]
    errs = " (errors)" if any(r[4] != "-" for r in rows[v]) else ""
    ratio = f"{rps / direct:.2f}" + (f" ({rps / 1000:.0f}k req/s)" if v == "direct" else f" ({rps / 1000:.1f}k)")
    print(f"| {v} | {ratio}{errs} | {p50:.2f} ms | {p99:.2f} ms | {cpu:.1f} µs |")
if "klaviyo-proxy" in med and "klaviyo-proxy+lim" in med:
    off, on = med["klaviyo-proxy"], med["klaviyo-proxy+lim"]
    print(f"\nlimits on vs lifted: throughput {on[0] / off[0]:.3f}, p50 {on[1] / off[1]:.3f}, p99 {on[2] / off[2]:.3f}")
EOF

if [ -n "${PROFILE:-}" ]; then
    echo
    who=${PROFILE_VARIANT:-klaviyo-proxy}
    echo "profile of $who under the same load (perf record -F 999 -g, $SECS s):"
    perf record -F 999 -g -o "$WORK/perf.data" -p "${PID[$who]}" -- sleep "$SECS" >/dev/null 2>&1 &
    perf_pid=$!
    measure "${URL[$who]}" "${PID[$who]}" >/dev/null
    wait "$perf_pid" || true
    perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9]+\.[0-9]+%' | sed -E 's/ +/ /g; s/ - - *$//' | head -"${PROFILE_TOP:-25}" || true
    kernel=$(perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null |
        awk '/\[kernel/ { s += $1 } END { print s + 0 }' || true)
    echo "kernel share of samples: ${kernel}%"
fi
