//! `aigrid up` as a process for the serving tests: started on a loopback port with
//! its demo model, read back through the control API and the gateway, and what
//! the control plane says of a job when a wait fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::openai::*;
use super::*;

/// The demo model `aigrid up` deploys, and its job.
pub const DEMO: &str = "tiny-llama";

/// `path` opened for appending, made when missing.
pub fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A child process, killed when dropped, its stderr in `log`.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// SIGTERM; it must exit cleanly within `limit`.
    pub fn terminate(mut self, limit: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit {status}: {}", self.log_tail());
                return;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `aigrid up` without the demo model, with `--data-dir` under `root`.
pub struct UpProc {
    pub proc: Proc,
    pub base: String,
    /// Its banner, up to `Press Ctrl-C`.
    pub banner: String,
    /// Kept open: `up` writes nothing more, and must not see a closed pipe.
    _stdout: BufReader<ChildStdout>,
    /// Dropped after `proc` (fields drop in order): once `up` is dead, what it
    /// started and what outlives it by design (supervisors, workloads, model
    /// servers) goes too; reaped while `up` lives, it could start them again.
    _reapers: [Reaper; 2],
}

impl UpProc {
    /// Starts it on `port`, or on a free one.
    pub fn start(root: &Path, port: Option<u16>, extra: &[&str]) -> UpProc {
        let port = port.unwrap_or_else(|| free_ports(1)[0]);
        let listen = format!("127.0.0.1:{port}");
        let log = root.join("up.log");
        let mut child = aigrid_cmd()
            .args(["up", "--listen", &listen, "--data-dir"])
            .arg(root.join("data"))
            .args(extra)
            .env("AIGRID_LOG", "info")
            .env_remove("AIGRID_STORE")
            .stdout(Stdio::piped())
            .stderr(append(&log))
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // An `up` that never finishes its banner is killed after a while, which
        // ends the read below.
        let printed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let (printed, pid) = (printed.clone(), child.id().to_string());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !printed.load(std::sync::atomic::Ordering::SeqCst) {
                    if Instant::now() >= deadline {
                        let _ = Command::new("kill").args(["-KILL", &pid]).status();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let mut banner = String::new();
        while !banner.contains("Press Ctrl-C") {
            if stdout.read_line(&mut banner).unwrap() == 0 {
                let _ = child.kill();
                panic!("up stopped: {banner}\n{}", tail(&log, 20));
            }
        }
        printed.store(true, std::sync::atomic::Ordering::SeqCst);
        watchdog.join().unwrap();
        let base = format!("http://{listen}");
        UpProc {
            proc: Proc { child, log },
            _reapers: up_reapers(root, &base, &base),
            base,
            banner,
            _stdout: stdout,
        }
    }

    pub fn log_tail(&self) -> String {
        self.proc.log_tail()
    }

    /// Waits until `/v1/models` on this up's gateway lists `model` (with `listed`
    /// false: until it no longer does), within `limit`; `job` serves it.
    pub async fn wait_listed(
        &self,
        http: &reqwest::Client,
        (model, job): (&str, &str),
        listed: bool,
        limit: Duration,
    ) {
        let what = if listed {
            format!("{model} in /v1/models")
        } else {
            format!("{model} gone from /v1/models")
        };
        poll(
            http,
            &format!("{}/v1/models", self.base),
            limit,
            &what,
            lists(model, listed),
            || self.report(job),
        )
        .await;
    }

    /// Waits until the demo model is registered (`up` pushes it in the
    /// background); answers its digest.
    pub async fn demo_digest(&self, http: &reqwest::Client) -> String {
        poll(
            http,
            &format!("{}/api/v1/models?name={DEMO}", self.base),
            Duration::from_secs(120),
            "tiny-llama registered",
            |status, body| {
                ok_json(status, body)?[0]["digest"]
                    .as_str()
                    .map(str::to_owned)
            },
            || self.report(DEMO),
        )
        .await
    }

    /// Waits for the demo model's job and checks that it serves `digest` with the
    /// `model-server` driver.
    pub async fn demo_job(&self, http: &reqwest::Client, digest: &str) {
        let job = poll(
            http,
            &format!("{}/api/v1/jobs/{DEMO}", self.base),
            Duration::from_secs(60),
            "the demo job",
            ok_json,
            || self.report(DEMO),
        )
        .await;
        let task = &job["spec"]["groups"][0]["task"];
        assert_eq!(task["driver"], "model-server", "{job}");
        assert_eq!(task["model"], digest, "{job}");
    }

    /// Removes the demo model's job and waits until the gateway no longer lists it.
    pub async fn remove_demo(&self, http: &reqwest::Client) {
        assert_success(&aigrid(&["job", "rm", DEMO, "--server", &self.base]));
        self.wait_listed(http, (DEMO, DEMO), false, Duration::from_secs(30))
            .await;
    }

    /// What the control plane says about `job`, and the end of this up's log.
    pub fn report(&self, job: &str) -> String {
        format!(
            "{}\n--- up ---\n{}",
            job_report(&self.base, job),
            self.log_tail()
        )
    }

    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn terminate(self) {
        self.proc.terminate(Duration::from_secs(30));
    }
}

/// Pushes the model in `dir` as `name`, signed with `key`; answers its digest.
pub fn push(server: &str, key: &Path, dir: &Path, name: &str) -> String {
    let dir = dir.to_str().unwrap();
    let args = ["model", "push", dir, "--name", name, "--json"];
    let pushed = json_output(&aigrid_as_publisher(server, key, &args));
    pushed["model"]["digest"].as_str().unwrap().to_owned()
}

/// Submits a `model-server` job for `digest` named `name`.
pub fn submit_model_job(server: &str, root: &Path, name: &str, digest: &str, cpu_millis: u64) {
    let spec = json!({
        "name": name,
        "kind": "service",
        "groups": [{
            "name": "server",
            "count": 1,
            "resources": {"cpu_millis": cpu_millis, "memory_mib": 1024},
            "task": {"driver": "model-server", "model": digest},
        }],
    });
    let file = root.join(format!("{name}.json"));
    std::fs::write(&file, spec.to_string()).unwrap();
    let out = aigrid(&["job", "submit", file.to_str().unwrap(), "--server", server]);
    assert_success(&out);
}

/// What the control plane says about a job, for failure messages.
pub fn job_report(server: &str, job: &str) -> String {
    let out = aigrid(&["job", "status", job, "--server", server]);
    let mut report = format!("{}{}", stdout(&out), stderr(&out));
    let status = aigrid(&["job", "status", job, "--server", server, "--json"]);
    if let Ok(v) = serde_json::from_slice::<Value>(&status.stdout) {
        for alloc in v["allocations"].as_array().into_iter().flatten() {
            if let Some(id) = alloc["id"].as_str() {
                for stream in [&[][..], &["--stderr"][..]] {
                    let mut args = vec!["alloc", "logs", id, "--server", server];
                    args.extend_from_slice(stream);
                    let logs = aigrid(&args);
                    let text = stdout(&logs);
                    let lines: Vec<&str> = text.lines().collect();
                    report.push_str(&format!(
                        "\n--- alloc {id} {stream:?} ---\n{}",
                        lines[lines.len().saturating_sub(20)..].join("\n")
                    ));
                }
            }
        }
    }
    report
}

/// `aigrid up` under `root`, a client, and the demo model's digest once it is
/// registered.
pub async fn up_with_demo(root: &Path) -> (UpProc, reqwest::Client, String) {
    let up = UpProc::start(root, None, &[]);
    let http = client();
    let digest = up.demo_digest(&http).await;
    (up, http, digest)
}

/// [`up_with_demo`] once the demo job serves its model through the gateway.
pub async fn serving_demo(root: &Path) -> (UpProc, reqwest::Client, String) {
    let (up, http, digest) = up_with_demo(root).await;
    up.demo_job(&http, &digest).await;
    up.wait_listed(&http, (DEMO, DEMO), true, Duration::from_secs(180))
        .await;
    (up, http, digest)
}
