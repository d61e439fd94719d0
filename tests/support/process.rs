//! The real binary as a child process, stopped by its PID when dropped. Shared by the
//! CLI tests and the benches.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A child process killed (by its PID) and reaped when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin` with `args` and `envs` and returns it with the URL from its first
/// stdout line (`... listening on URL`).
pub fn start(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> (Running, String) {
    let (child, mut urls) = start_urls(bin, args, envs, 1);
    (child, urls.remove(0))
}

/// Like [`start`], with the URLs of its first `n` stdout lines (`serve` prints the
/// proxy's, then the admin listener's).
pub fn start_urls(bin: &str, args: &[&str], envs: &[(&str, &str)], n: usize) -> (Running, Vec<String>) {
    let mut cmd = Command::new(bin);
    cmd.args(args).envs(envs.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start klaviyo-proxy");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut reader = BufReader::new(stdout);
    let child = Running(child);
    let urls = (0..n)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a stdout line");
            let url = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
            assert!(url.starts_with("http"), "unexpected line {line:?}");
            url
        })
        .collect();
    (child, urls)
}

/// The arguments of `serve` on loopback port 0 (proxy and admin listener, so several
/// proxies can run at once) in front of `upstream`, with an optional config file.
pub fn serve_args<'a>(upstream: &'a str, config: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", upstream];
    if let Some(file) = config {
        args.extend(["--config", file]);
    }
    args
}
