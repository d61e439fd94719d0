#!/usr/bin/env bash
# Builds the klaviyo-proxy container image without a container engine or a registry,
# then runs it and checks that the proxy answers.
#
#   1. a static binary on the host (glibc with crt-static: no musl toolchain needed),
#      checked with ldd;
#   2. the image from ./Dockerfile (FROM scratch) with buildah, chroot isolation and
#      the vfs storage driver (works unprivileged-ish, in CI and in containers);
#   3. its size, under 20 MB;
#   4. `buildah run`: the proxy in load-test mode (in-process simulator) with a mounted
#      config file and env overrides, as the image's non-root user; the image's own
#      binary probes it (`klaviyo-proxy healthcheck`), then it is stopped by its PID.
#
# Needs: cargo, buildah (Debian: apt-get install buildah). Env: IMAGE (default
# localhost/klaviyo-proxy:dev), KEEP_IMAGE=1 to keep the image after the check.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/klaviyo-proxy:dev}
TARGET=x86_64-unknown-linux-gnu
BIN=target/$TARGET/release/klaviyo-proxy
BUILDAH=(buildah --storage-driver vfs)
MAX_MB=20

say() { printf '==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

command -v buildah >/dev/null || fail "buildah is not installed (apt-get install buildah)"

say "static binary ($TARGET, crt-static)"
# --target keeps RUSTFLAGS off build scripts and proc macros, which must stay dynamic.
# Symbols stripped: the image carries no profiler (local release builds keep them for perf).
RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' cargo build --release --locked --target "$TARGET" --bin klaviyo-proxy
ldd_out=$(ldd "$BIN" 2>&1 || true)
case "$ldd_out" in
  *"not a dynamic executable"*|*"statically linked"*) say "ldd: $ldd_out" ;;
  *) fail "binary is not static: $ldd_out" ;;
esac
"$BIN" --version

say "image $IMAGE"
# Docker format: the OCI image config has no HEALTHCHECK.
"${BUILDAH[@]}" bud --isolation chroot --format docker --layers=false -t "$IMAGE" -f Dockerfile .
size=$("${BUILDAH[@]}" images --noheading --format '{{.Size}}' "$IMAGE" | head -n1)
# A scratch image holds exactly these two files.
bytes=$(du -sb "$BIN" config/klaviyo-proxy.toml | awk '{s+=$1} END {print s}')
say "image size: $size (binary + config: $((bytes / 1024)) KiB)"
[ "$bytes" -lt $((MAX_MB * 1024 * 1024)) ] || fail "image content is over $MAX_MB MB"
user=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
[ "$user" = "65532:65532" ] || fail "image user is '$user', expected 65532:65532"
say "user: $user"
health=$("${BUILDAH[@]}" inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "$IMAGE")
case "$health" in
  *"healthcheck http://127.0.0.1:9090/live"*) say "healthcheck: $health" ;;
  *) fail "image health check is '$health'" ;;
esac

work=$(mktemp -d)
ctr=""
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM -- "-$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$ctr" ]; then "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
  if [ "${KEEP_IMAGE:-0}" != 1 ]; then "${BUILDAH[@]}" rmi "$IMAGE" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

say "run: serve --upstream sim with a mounted config and env overrides"
cat > "$work/klaviyo-proxy.toml" <<'TOML'
[queue]
max_wait_ms = 5000
TOML
chmod 0644 "$work/klaviyo-proxy.toml"
ctr=$("${BUILDAH[@]}" from "$IMAGE")
# The mounted file and the environment both reach the effective config.
effective=$("${BUILDAH[@]}" run --isolation chroot \
  --volume "$work/klaviyo-proxy.toml:/etc/klaviyo-proxy/klaviyo-proxy.toml:ro" \
  --env KLAVIYO_PROXY_AUTH_MODE=inject --env KLAVIYO_PRIVATE_KEY=pk_image_check_key \
  "$ctr" -- /klaviyo-proxy check-config /etc/klaviyo-proxy/klaviyo-proxy.toml 2>/dev/null)
grep -q '^max_wait_ms = 5000$' <<<"$effective" || fail "the mounted config was not read"
grep -q '^mode = "inject"$' <<<"$effective" || fail "the environment did not override the config"
! grep -q pk_image_check_key <<<"$effective" || fail "check-config printed the key"
say "config: mounted file and env overrides both in effect, key redacted"
# Its own process group, so the check can stop exactly what it started.
setsid "${BUILDAH[@]}" run --isolation chroot \
  --volume "$work/klaviyo-proxy.toml:/etc/klaviyo-proxy/klaviyo-proxy.toml:ro" \
  --env KLAVIYO_PROXY_AUTH_MODE=inject --env KLAVIYO_PRIVATE_KEY=pk_image_check_key \
  --env KLAVIYO_PROXY_LOG_LEVEL=warn \
  "$ctr" -- /klaviyo-proxy serve --config /etc/klaviyo-proxy/klaviyo-proxy.toml --upstream sim \
  --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  > "$work/stdout" 2> "$work/stderr" &
server_pid=$!
url=""
admin=""
for _ in $(seq 1 100); do
  url=$(sed -n 's/^klaviyo-proxy listening on //p' "$work/stdout" | head -n1)
  admin=$(sed -n 's/^admin listening on //p' "$work/stdout" | head -n1)
  [ -n "$url" ] && [ -n "$admin" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/stderr" >&2; fail "the proxy exited"; }
  sleep 0.1
done
[ -n "$url" ] || { cat "$work/stderr" >&2; fail "the proxy did not start in 10 s"; }
say "proxy listening on $url, admin on $admin"

uid=$(for p in $(pgrep -g "$server_pid" 2>/dev/null || true); do
  if [ "$(readlink "/proc/$p/exe" 2>/dev/null)" != "" ] && grep -q klaviyo-proxy "/proc/$p/comm" 2>/dev/null; then
    awk '/^Uid:/ {print $2}' "/proc/$p/status"; fi; done | head -n1)
[ "$uid" = 65532 ] || fail "the proxy runs as uid '$uid', expected 65532"
say "running as uid $uid"

# The image's own binary probes the proxy: a real request, through the limiter to the
# in-process simulator, with the key injected from the environment.
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- /klaviyo-proxy healthcheck "$url/api/accounts" \
  || fail "the proxy did not answer 2xx"
# The probes the HEALTHCHECK and the Kubernetes examples run (there on 127.0.0.1:9090,
# here on a free port, since this network namespace is the host's).
for path in /live /ready; do
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- /klaviyo-proxy healthcheck "$admin$path" \
    || fail "admin $path did not answer 2xx"
done
say "OK: $IMAGE is static, non-root, under $MAX_MB MB, and serves"
