//! A real `redis-server` per test, on a free loopback port, stopped by its PID.
//! A missing `redis-server` fails the test (CI must install it: Debian package
//! `redis-server`); nothing is skipped.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` that this test started.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

/// A port free right now on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a fresh server on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts a server on `port` (to restart one that was stopped).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::start_with(port, &["--port", &port.to_string()])
    }

    /// Starts a node of a Redis Cluster (not yet joined to the others).
    pub fn start_cluster_node() -> RedisServer {
        let port = free_port();
        let conf = format!("nodes-{port}.conf");
        RedisServer::start_with(
            port,
            &["--port", &port.to_string(), "--cluster-enabled", "yes", "--cluster-config-file", &conf],
        )
    }

    /// Starts a server that wants `password` (the default user's).
    pub fn start_with_password(password: &str) -> RedisServer {
        let port = free_port();
        RedisServer::start_with(port, &["--port", &port.to_string(), "--requirepass", password])
    }

    /// Starts a server speaking only TLS on a free port, with this certificate and key.
    pub fn start_tls(cert_file: &str, key_file: &str) -> RedisServer {
        let port = free_port();
        let args = ["--port", "0", "--tls-port", &port.to_string(), "--tls-cert-file", cert_file];
        RedisServer::start_with(port, &[&args[..], &["--tls-key-file", key_file, "--tls-auth-clients", "no"]].concat())
    }

    fn start_with(port: u16, listen: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("kp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it (Debian package `redis-server`) to run these tests")
            });
        let server = RedisServer { child: Some(child), port, dir };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < until, "redis-server did not listen on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `redis://127.0.0.1:<port>/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (by its PID) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` primaries on loopback, made with `redis-cli --cluster create`.
pub struct RedisCluster {
    /// The nodes; stopped (by PID) when the cluster is dropped.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` nodes, joins them and waits until every slot is served.
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n).map(|_| RedisServer::start_cluster_node()).collect();
        let addrs: Vec<String> = nodes.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian package redis-tools, installed with redis-server)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let until = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info =
                    Command::new("redis-cli").args(["-p", &node.port.to_string(), "cluster", "info"]).output().unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < until, "cluster not ready within 20 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    /// A node's URL: the client finds the others from it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }
}
