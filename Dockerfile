# klaviyo-proxy on `scratch`: one static binary, the annotated default config, nothing
# else (no shell, no libc, no CA bundle: the binary carries webpki roots).
#
# The binary is built on the host first (no stage pulls an image, so this builds
# offline); deploy/build-image.sh does both steps and checks the result:
#
#   RUSTFLAGS='-C target-feature=+crt-static' \
#     cargo build --release --locked --target x86_64-unknown-linux-gnu
#   buildah bud --isolation chroot --storage-driver vfs -t klaviyo-proxy .
#
# Configuration: the file at /etc/klaviyo-proxy/klaviyo-proxy.toml (mount your own over
# it, e.g. a ConfigMap) and KLAVIYO_PROXY_* / KLAVIYO_PRIVATE_KEY environment
# variables, which override the file.
FROM scratch

COPY target/x86_64-unknown-linux-gnu/release/klaviyo-proxy /klaviyo-proxy
COPY config/klaviyo-proxy.toml /etc/klaviyo-proxy/klaviyo-proxy.toml

# Non-root, numeric (scratch has no /etc/passwd to look a name up in).
USER 65532:65532

# 8080: the proxy (loopback by default: right for a sidecar; a service sets
# KLAVIYO_PROXY_LISTEN=0.0.0.0:8080 and a client token). 9090: admin (/live, /ready,
# /health, /metrics), loopback by default.
EXPOSE 8080 9090

# Liveness of the admin listener, probed by the binary itself (no curl in scratch).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/klaviyo-proxy", "healthcheck", "http://127.0.0.1:9090/live"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/klaviyo-proxy"]
CMD ["serve", "--config", "/etc/klaviyo-proxy/klaviyo-proxy.toml"]
