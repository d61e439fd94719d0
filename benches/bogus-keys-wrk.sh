#!/usr/bin/env bash
# Issue 13's flood proof at full size: 200,000 requests, each with a key never seen
# before (and an account of its own at the simulator), through the release binary in
# front of its simulator (a separate `klaviyo-proxy simulate` process). Prints the
# proxy's resident memory before, at half and after, the answers by status, and what
# /metrics holds at the end (samples, active buckets, unresolved credentials).
# tests/bucket_cap.rs runs the same flood at 4,000 keys on a debug build.
#
#   cargo build --release --bin klaviyo-proxy
#   benches/bogus-keys-wrk.sh            # KEYS=200000 CONNS=64 THREADS=2 SECS=300
#
# Each half of the flood stops once every wrk thread has its share of answers, or
# after SECS (a bound, should a thread's last connections stall).
#
# PROXY_TOML adds config lines (e.g. `[limiter]` `max_buckets = 1000`). By default
# the config is the shipped one except `accounts.lookup_max_wait_ms = 0`: a first
# lookup that cannot have the one-per-second lookup gate at once goes on without
# it (by default a new key waits up to 10 s for the gate, and 200,000 new keys would
# take days).
#
# Needs wrk and python3 (free ports). Everything it starts runs on 127.0.0.1 and is
# stopped by its PID on exit.
set -euo pipefail

KEYS=${KEYS:-200000}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KLAVIYO_PROXY_BIN:-$ROOT/target/release/klaviyo-proxy}

for tool in wrk python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "build it first: cargo build --release --bin klaviyo-proxy" >&2; exit 1; }

# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh" bogus

rss_mb() {
    awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}

SIM_PORT=$(free_port)
"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --seed 1 >"$WORK/sim.out" 2>"$WORK/sim.err" &
PIDS+=($!)
wait_port "$SIM_PORT"

PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
printf '[accounts]\nlookup_max_wait_ms = 0\n%s\n' "${PROXY_TOML:-}" >"$WORK/proxy.toml"
"$BIN" serve --config "$WORK/proxy.toml" --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --upstream "http://127.0.0.1:$SIM_PORT" >"$WORK/proxy.out" 2>"$WORK/proxy.err" &
PROXY=$!
PIDS+=("$PROXY")
wait_port "$PROXY_PORT"
wait_port "$ADMIN_PORT"

# One request of a real account first: the proxy's steady state before the flood.
python3 - "$PROXY_PORT" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/lists",
                             headers={"Authorization": "Klaviyo-API-Key pk_Acme01_before"})
print("warm-up:", urllib.request.urlopen(req, timeout=30).status)
EOF
BEFORE=$(rss_mb "$PROXY")

# Each thread sends its share of distinct keys (`pk_<account>_...`: every key is an
# account of its own at the simulator) and stops once it has that many answers.
cat >"$WORK/flood.lua" <<'EOF'
local threads = {}
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
function init(args)
  share = tonumber(args[1])
  round = args[2]
  sent, answered = 0, 0
  s2xx, s401, s429, s503, other = 0, 0, 0, 0, 0
end
function request()
  sent = sent + 1
  local key = string.format("Klaviyo-API-Key pk_r%st%dk%d_0123456789abcdef", round, id, sent)
  return wrk.format("GET", "/api/lists", { ["Authorization"] = key })
end
function response(status, headers, body)
  answered = answered + 1
  if status >= 200 and status < 300 then s2xx = s2xx + 1
  elseif status == 401 then s401 = s401 + 1
  elseif status == 429 then s429 = s429 + 1
  elseif status == 503 then s503 = s503 + 1
  else other = other + 1 end
  if answered >= share then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local t = { s2xx = 0, s401 = 0, s429 = 0, s503 = 0, other = 0, answered = 0 }
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + th:get(k) end
  end
  io.write(string.format("requests: %d; answers: %d (2xx %d, 401 %d, 429 %d, 503 %d, other %d); socket errors: %d\n",
    summary.requests, t.answered, t.s2xx, t.s401, t.s429, t.s503, t.other,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
EOF

flood() {
    local n=$1 round=$2
    local share=$(( n / THREADS ))
    local started=$SECONDS
    wrk -t "$THREADS" -c "$CONNS" -d "${SECS:-300}s" --timeout 60s -s "$WORK/flood.lua" \
        "http://127.0.0.1:$PROXY_PORT" -- "$share" "$round" >"$WORK/wrk-$round.txt"
    grep -E '^requests' "$WORK/wrk-$round.txt"
    echo "  wrk ended after $(( SECONDS - started )) s (it waits out SECS once its threads stop)"
}

echo "flood: $KEYS distinct keys over $CONNS connections, $THREADS wrk threads"
echo "RSS before: $BEFORE MB"
flood $(( KEYS / 2 )) a
HALF=$(rss_mb "$PROXY")
echo "RSS at half: $HALF MB"
flood $(( KEYS / 2 )) b
AFTER=$(rss_mb "$PROXY")
echo "RSS after: $AFTER MB"

python3 - "$ADMIN_PORT" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=30).read().decode()
samples = [l for l in text.splitlines() if l and not l.startswith("#")]
def value(name):
    for l in samples:
        if l.startswith(name + " ") or l.startswith(name + "{"):
            return l.rsplit(" ", 1)[1]
    return "-"
families = {l.split("{")[0].split(" ")[0] for l in samples}
accounts = {l.split('account="')[1].split('"')[0] for l in samples if 'account="' in l}
print(f"/metrics: {len(samples)} samples in {len(families)} families; {len(accounts)} account labels")
print(f"  active buckets {value('klaviyo_proxy_active_buckets')}, "
      f"unresolved credentials {value('klaviyo_proxy_accounts_unresolved')}")
EOF
