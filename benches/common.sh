# Shared by the wrk benches (sourced): a work directory in $WORK, the PIDs in PIDS
# stopped (by PID) and the directory removed on exit (KEEP=1 keeps it), free ports,
# waiting for a listener, nginx and the static upstream. $1: the work directory's name.
WORK=$(mktemp -d "/tmp/klaviyo-proxy-$1.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (up to 10 s) for something to listen on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

# nginx in the foreground, one worker; $1 name, $2 port, $3 the http{} body. Its PID
# goes to NGINX_PID (and PIDS).
start_nginx() {
    local dir=$WORK/nginx-$1
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
error_log $dir/logs/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    $3
}
EOF
    nginx -e "$dir/logs/error.log" -p "$dir" -c "$dir/nginx.conf" 2>>"$dir/logs/error.log" &
    PIDS+=($!)
    NGINX_PID=$!
    wait_port "$2"
}

# The static upstream the benches measure against: Klaviyo's answer to
# GET /api/accounts, from nginx, on UPSTREAM_PORT (its PID in UPSTREAM_PID).
start_static_upstream() {
    UPSTREAM_PORT=$(free_port)
    local body='{"data":[{"type":"account","id":"AbC123","attributes":{"contact_information":{"default_sender_name":"Bench"}}}],"links":{"self":"https://a.klaviyo.com/api/accounts/"}}'
    start_nginx upstream "$UPSTREAM_PORT" "
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / {
            default_type application/vnd.api+json;
            # Klaviyo's headers, with a quota the run never reaches (the proxy lowers
            # its view of a bucket to what the upstream reports).
            add_header RateLimit-Limit 1000000000;
            add_header RateLimit-Remaining 999999999;
            add_header RateLimit-Reset 60;
            return 200 '$body';
        }
    }"
    UPSTREAM_PID=$NGINX_PID
}
