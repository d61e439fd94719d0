//! The deployment examples stay valid: the Kubernetes YAML parses, its probes and
//! ports are the proxy's defaults, its grace period outlasts the drain, its config
//! parses as a proxy config; the systemd unit is hardened and, where systemd's tools
//! exist, verifies; the Dockerfile matches what build-image.sh builds.

use std::path::Path;
use std::process::Command;

use klaviyo_proxy::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The admin listener's paths (its address is `Config::default().admin.listen`).
const LIVE: &str = "/live";
const READY: &str = "/ready";

fn admin_addr() -> String {
    Config::default().admin.listen.to_string()
}

/// How long the proxy drains at shutdown before giving up (`server.drain_timeout_ms`),
/// rounded up to whole seconds.
fn drain_secs() -> u64 {
    klaviyo_proxy::config::Config::default().server.drain_timeout_ms.div_ceil(1000)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

/// Every klaviyo-proxy container in a pod spec (plain or native sidecar).
fn proxy_containers(pod: &Value) -> Vec<&Value> {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| pod[*k].as_sequence())
        .flatten()
        .filter(|c| c["image"].as_str().is_some_and(|i| i.starts_with("klaviyo-proxy")))
        .collect()
}

fn exec(probe: &Value) -> Vec<String> {
    probe["exec"]["command"]
        .as_sequence()
        .unwrap_or_else(|| panic!("probe is not an exec probe: {probe:?}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_sequence()?.iter().find(|e| e["name"].as_str() == Some(name))
}

/// The proxy containers of every Deployment in `path`, checked against the defaults.
fn check_proxy_pods(path: &str) -> usize {
    let docs = documents(path);
    let defaults = Config::default();
    let mut checked = 0;
    for deployment in of_kind(&docs, "Deployment") {
        let pod = &deployment["spec"]["template"]["spec"];
        for c in proxy_containers(pod) {
            checked += 1;
            let name = format!("{path}: {}", c["name"].as_str().unwrap_or("?"));
            // Probes: the image's own binary against the admin listener's paths.
            for (probe, expected) in [("livenessProbe", LIVE), ("startupProbe", LIVE), ("readinessProbe", READY)] {
                let cmd = exec(&c[probe]);
                assert_eq!(
                    cmd,
                    ["/klaviyo-proxy", "healthcheck", &format!("http://{}{expected}", admin_addr())],
                    "{name} {probe}"
                );
            }
            // Ports: the proxy's and the admin listener's defaults.
            let ports: Vec<u64> =
                c["ports"].as_sequence().unwrap().iter().map(|p| p["containerPort"].as_u64().unwrap()).collect();
            assert!(ports.contains(&u64::from(defaults.server.listen.port())), "{name}: ports {ports:?}");
            assert!(ports.contains(&u64::from(defaults.admin.listen.port())), "{name}: ports {ports:?}");
            // The key comes from a Secret, never a literal.
            let key = env(c, "KLAVIYO_PRIVATE_KEY").unwrap_or_else(|| panic!("{name}: no KLAVIYO_PRIVATE_KEY"));
            assert!(key["value"].is_null(), "{name}: the key must not be a literal");
            assert!(key["valueFrom"]["secretKeyRef"]["key"].as_str().is_some(), "{name}: key not from a Secret");
            // Non-root, read-only, nothing to escalate to.
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsUser"].as_u64(), Some(65532), "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{name}");
            // The args name the config path the image ships and the ConfigMap mounts.
            let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            assert_eq!(args, ["serve", "--config", "/etc/klaviyo-proxy/klaviyo-proxy.toml"], "{name}");
        }
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let drain = drain_secs();
        assert!(grace > drain, "{path}: terminationGracePeriodSeconds {grace} <= drain {drain} s");
    }
    // Every embedded proxy config is a valid config.
    for map in of_kind(&docs, "ConfigMap") {
        if let Some(toml) = map["data"]["klaviyo-proxy.toml"].as_str() {
            let config = Config::parse(toml, path).unwrap_or_else(|e| panic!("{path}: ConfigMap: {e}"));
            config.check_serve().unwrap_or_else(|e| panic!("{path}: ConfigMap: {e}"));
        }
    }
    checked
}

#[test]
fn sidecar_manifest_matches_the_proxy_defaults() {
    assert_eq!(check_proxy_pods("deploy/kubernetes/sidecar.yaml"), 1);
    let docs = documents("deploy/kubernetes/sidecar.yaml");
    let pod = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    // A native sidecar: started before the app, stopped after it.
    let proxy = &pod["initContainers"][0];
    assert_eq!(proxy["restartPolicy"].as_str(), Some("Always"));
    // The proxy stays on loopback in the pod; the app points at it there.
    let map = &of_kind(&docs, "ConfigMap")[0];
    let config = Config::parse(map["data"]["klaviyo-proxy.toml"].as_str().unwrap(), "sidecar").unwrap();
    assert!(config.server.listen.ip().is_loopback());
    let app = pod["containers"].as_sequence().unwrap().iter().find(|c| c["name"].as_str() == Some("app")).unwrap();
    assert_eq!(
        env(app, "KLAVIYO_BASE_URL").unwrap()["value"].as_str(),
        Some(format!("http://{}", config.server.listen).as_str())
    );
}

#[test]
fn service_manifest_matches_the_proxy_defaults() {
    assert_eq!(check_proxy_pods("deploy/kubernetes/service.yaml"), 1);
    let docs = documents("deploy/kubernetes/service.yaml");
    let c = proxy_containers(&of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"])[0];
    // Off loopback the proxy insists on a client token; the manifest gives it one.
    assert_eq!(env(c, "KLAVIYO_PROXY_LISTEN").unwrap()["value"].as_str(), Some("0.0.0.0:8080"));
    assert!(env(c, "KLAVIYO_PROXY_CLIENT_TOKEN").unwrap()["valueFrom"]["secretKeyRef"].is_mapping());
    let service = of_kind(&docs, "Service")[0];
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(8080));
    // And the env the manifest sets is a config the proxy accepts.
    let vars = [
        ("KLAVIYO_PROXY_LISTEN", "0.0.0.0:8080"),
        ("KLAVIYO_PROXY_CLIENT_TOKEN", "t0ken-0123456789abcdef"),
        ("KLAVIYO_PROXY_AUTH_MODE", "inject"),
        ("KLAVIYO_PRIVATE_KEY", "pk_test_deploy"),
        ("KLAVIYO_PROXY_ALLOWED_HOSTS", env(c, "KLAVIYO_PROXY_ALLOWED_HOSTS").unwrap()["value"].as_str().unwrap()),
    ];
    let lookup = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    let config = Config::load(None, &lookup).unwrap();
    config.check_serve().unwrap();
    // Apps reach it by the Service's name.
    assert!(config.server.allowed_hosts.iter().any(|h| h == "klaviyo-proxy"), "{:?}", config.server.allowed_hosts);
}

#[test]
fn redis_manifest_parses_and_names_the_proxy_settings() {
    let docs = documents("deploy/kubernetes/redis-shared-limits.yaml");
    assert_eq!(of_kind(&docs, "Deployment").len(), 1);
    assert_eq!(of_kind(&docs, "Service")[0]["spec"]["ports"][0]["port"].as_u64(), Some(6379));
    let text = read("deploy/kubernetes/redis-shared-limits.yaml");
    for var in ["KLAVIYO_PROXY_LIMITER_STORE", "KLAVIYO_PROXY_REDIS_URL", "KLAVIYO_PROXY_ACCOUNT_HASH_KEY"] {
        assert!(text.contains(var), "{var} not documented");
    }
    // The variables it tells the sidecar to set make a Redis-backed config the proxy accepts.
    let vars = [
        ("KLAVIYO_PROXY_LIMITER_STORE", "redis"),
        ("KLAVIYO_PROXY_REDIS_URL", "redis://:password@klaviyo-proxy-redis:6379/0"),
        ("KLAVIYO_PROXY_ACCOUNT_HASH_KEY", "c2hhcmVkLWFjcm9zcy1yZXBsaWNhcy0zMi1ieXRlcw=="),
    ];
    let lookup = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    let sidecar = documents("deploy/kubernetes/sidecar.yaml");
    let toml = of_kind(&sidecar, "ConfigMap")[0]["data"]["klaviyo-proxy.toml"].as_str().unwrap().to_string();
    let file = std::env::temp_dir().join(format!("klaviyo-proxy-deploy-{}.toml", std::process::id()));
    std::fs::write(&file, toml).unwrap();
    let config = Config::load(Some(&file), &lookup);
    let _ = std::fs::remove_file(&file);
    let config = config.unwrap();
    config.check_serve().unwrap();
    assert_eq!(config.limiter.store, klaviyo_proxy::config::StoreKind::Redis);
}

#[test]
fn systemd_unit_is_hardened_and_outlasts_the_drain() {
    let unit = read("deploy/systemd/klaviyo-proxy.service");
    let get = |key: &str| -> Vec<&str> {
        unit.lines().filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).collect()
    };
    assert_eq!(get("ExecStart"), ["/usr/local/bin/klaviyo-proxy serve --config /etc/klaviyo-proxy/klaviyo-proxy.toml"]);
    let stop: u64 = get("TimeoutStopSec")[0].parse().unwrap();
    let drain = drain_secs();
    assert!(stop > drain, "TimeoutStopSec {stop} <= drain {drain} s");
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    // systemd's own checks, where its tools are installed (Debian: the systemd package).
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI: systemd-analyze (Debian package systemd) is needed");
        eprintln!("systemd-analyze not installed: skipping `systemd-analyze verify` and `security`");
        return;
    }
    let dir = std::env::temp_dir().join(format!("klaviyo-proxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("klaviyo-proxy.service");
    // verify wants the binary to exist; point ExecStart at one that does.
    std::fs::write(&copy, unit.replace("/usr/local/bin/klaviyo-proxy", env!("CARGO_BIN_EXE_klaviyo-proxy"))).unwrap();
    let verify = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let security =
        Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&copy).output();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(verify.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&verify.stderr));
    let security = security.unwrap();
    let out = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {out}"));
    assert!(exposure <= 2.0, "systemd-analyze security exposure {exposure} (want <= 2.0, \"OK\")");
}

#[test]
fn dockerfile_is_static_scratch_non_root_with_a_health_check() {
    let file = read("Dockerfile");
    let lines: Vec<&str> = file.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let from: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from, [&"FROM scratch"], "no stage may pull an image");
    let user = lines.iter().find_map(|l| l.strip_prefix("USER ")).unwrap();
    assert!(user.split(':').all(|id| id.parse::<u32>().is_ok_and(|id| id != 0)), "USER {user}: numeric, not root");
    assert!(file.contains(&format!("\"healthcheck\", \"http://{}{LIVE}\"", admin_addr())), "HEALTHCHECK target");
    assert!(file.contains("COPY target/x86_64-unknown-linux-gnu/release/klaviyo-proxy /klaviyo-proxy"));
    assert!(file.contains("COPY config/klaviyo-proxy.toml /etc/klaviyo-proxy/klaviyo-proxy.toml"));
    let script = read("deploy/build-image.sh");
    for needed in ["+crt-static", "--isolation chroot", "--storage-driver vfs", "ldd"] {
        assert!(script.contains(needed), "deploy/build-image.sh: {needed}");
    }
    // The build context lets in only what the Dockerfile copies.
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l == "*"));
    assert!(ignore.contains("!target/x86_64-unknown-linux-gnu/release/klaviyo-proxy"));
}

#[test]
fn healthcheck_command_exits_by_the_answer() {
    let bin = env!("CARGO_BIN_EXE_klaviyo-proxy");
    // Nothing listens on a just-closed port: the check fails, quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(bin).args(["healthcheck", &format!("http://127.0.0.1:{port}/live")]).output().unwrap();
    assert!(!out.status.success());
    // A simulator answers 200 on its stats path and 404 elsewhere.
    let mut sim = Command::new(bin)
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(sim.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    let ok = Command::new(bin).args(["healthcheck", &format!("{url}/__sim/stats")]).output().unwrap();
    let missing = Command::new(bin).args(["healthcheck", &format!("{url}/nothing")]).output().unwrap();
    let _ = sim.kill();
    let _ = sim.wait();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("HTTP 404"));
}
