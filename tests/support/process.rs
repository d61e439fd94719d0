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

/// The binary serving (`serve`, which prints the proxy's URL, then the admin
/// listener's), with its stderr (the logs) kept line by line. Killed by its PID and
/// reaped when dropped.
pub struct Served {
    /// The process.
    pub child: Running,
    /// `http://host:port` of the proxy listener.
    pub proxy: String,
    /// `http://host:port` of the admin listener.
    pub admin: String,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    /// Starts `bin` with `args` (see [`serve_args`]) and `envs`.
    pub fn start(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Served {
        let mut cmd = Command::new(bin);
        cmd.args(args).envs(envs.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start klaviyo-proxy");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let child = Running(child);
        let mut url = || {
            let mut line = String::new();
            out.read_line(&mut line).expect("a stdout line");
            line.trim().rsplit(' ').next().unwrap_or_default().to_string()
        };
        let (proxy, admin) = (url(), url());
        assert!(proxy.starts_with("http://") && admin.starts_with("http://"), "{proxy} {admin}");
        // Later stdout lines are drained so the binary never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines().map_while(Result::ok) {});
        Served { child, proxy, admin, stderr }
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded, 10 s) for a stderr line containing `text`.
    pub fn wait_for_log(&self, text: &str) -> String {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if let Some(line) = self.stderr.lock().unwrap().iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("no log line with {text:?}: {:?}", self.logs());
    }

    /// Sends a signal (`-HUP`, `-TERM`) to the process, by its PID.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.0.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    /// Stops with SIGTERM (waiting, bounded, for the exit) and returns all of stderr.
    pub fn stop(mut self) -> Vec<String> {
        self.signal("-TERM");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.child.0.try_wait().unwrap().is_none() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The stderr reader's last lines.
        std::thread::sleep(std::time::Duration::from_millis(100));
        self.logs()
    }
}

/// `bin` run through `sh` under a file size limit of `blocks` × 512 bytes, with
/// SIGXFSZ ignored: a write past the limit fails with EFBIG as one to a full disk fails
/// with ENOSPC, and no mount privileges are needed. Add `bin`'s arguments to it.
pub fn file_size_limited(bin: &str, blocks: u32) -> Command {
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" \"$@\""), bin]);
    sh
}

/// Fills a store on a full disk: `send(n)` for n = 0, 1, … (at most 300) until it is
/// refused (`None`, the caller having checked the refusal) three times in a row.
/// Returns what was acknowledged; something was, and the refusals came.
pub async fn fill_until_refused<T, F: std::future::Future<Output = Option<T>>>(
    mut send: impl FnMut(usize) -> F,
) -> Vec<T> {
    let (mut acked, mut in_a_row, mut refused) = (Vec::new(), 0, 0);
    for n in 0..300 {
        match send(n).await {
            Some(ack) => {
                acked.push(ack);
                in_a_row = 0;
            }
            None => {
                refused += 1;
                in_a_row += 1;
                if in_a_row == 3 {
                    break;
                }
            }
        }
    }
    assert!(!acked.is_empty() && refused >= 3, "{} acknowledged, {refused} refused", acked.len());
    acked
}
