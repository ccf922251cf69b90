//! Starts real `aigrid server` processes on loopback ports for the integration tests.
#![allow(dead_code)]

pub mod agents;
pub mod identity;
pub mod openai;
pub mod schema;
pub mod up;

pub use identity::Sign;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod bad_requests;

/// The binary under test.
pub fn aigrid_bin() -> &'static str {
    env!("CARGO_BIN_EXE_aigrid")
}

/// The CLI, acting as the tests' admin identity.
pub fn aigrid_cmd() -> Command {
    let mut cmd = Command::new(aigrid_bin());
    cmd.env("AIGRID_IDENTITY", identity::admin_identity_file());
    cmd
}

/// Runs the CLI to completion, as the tests' admin.
pub fn aigrid(args: &[&str]) -> Output {
    aigrid_cmd().args(args).output().unwrap()
}

/// Runs `aigrid ARGS --server SERVER`, signing pushes with the publisher key `key`,
/// and with the store the server announces whatever the caller's `AIGRID_STORE`.
pub fn aigrid_as_publisher(server: &str, key: &Path, args: &[&str]) -> Output {
    aigrid_cmd()
        .args(args)
        .args(["--server", server])
        .env("AIGRID_PUBLISHER_KEY", key)
        .env_remove("AIGRID_STORE")
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with exactly one line on stderr and a non-zero exit.
pub fn assert_one_line_failure(o: &Output, has: &str) {
    assert!(!o.status.success(), "expected failure, got {}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(has), "`{err}` lacks `{has}`");
}

/// Succeeds, answering its stdout; the failure message carries its stderr.
pub fn assert_success(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", stderr(o));
    stdout(o)
}

/// Decodes the JSON a successful CLI run printed.
pub fn json_output(o: &Output) -> Value {
    let out = assert_success(o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Starts `aigrid ARGS`, its stderr appended to `log`.
pub fn spawn_logged(args: &[std::ffi::OsString], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    aigrid_cmd()
        .args(args)
        .env("AIGRID_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn aigrid")
}

/// Every file under `dir`, depth first.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Ports free right now on 127.0.0.1, distinct, each with the port after it free
/// too (a server's peer listener defaults to its API port + 1), and below the
/// kernel's ephemeral range (32768 and up by default), so no outgoing connection can
/// take one while a server that owns it is down for a restart.
pub fn free_ports(n: usize) -> Vec<u16> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut held = Vec::new();
    while held.len() < n {
        let port = rng.random_range(20_000..32_000u16);
        if let (Ok(api), Ok(peer)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", port + 1)),
        ) {
            held.push((api, peer));
        }
    }
    held.iter()
        .map(|(l, _)| l.local_addr().unwrap().port())
        .collect()
}

/// The peer listener address of the server whose API is on `port`.
pub fn peer_addr(port: u16) -> String {
    format!("127.0.0.1:{}", port + 1)
}

/// Makes the cluster CA in `dir` with `aigrid ca init`.
pub fn ca_init(dir: &Path) {
    let out = aigrid(&["ca", "init", "--dir", dir.to_str().unwrap()]);
    assert_success(&out);
}

/// An HTTP client that trusts the cluster CA in `ca_dir`.
pub fn https_client(ca_dir: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca_dir.join("ca.pem")).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// One server process. Under a root holding the cluster CA (`ca/`, as
/// [`Cluster::start`] makes), it is started with `--ca-dir` pointing there.
pub struct ServerProc {
    pub id: u64,
    pub port: u16,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub ca_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProc {
    pub fn new(id: u64, port: u16, root: &Path, args: Vec<String>) -> Self {
        ServerProc {
            id,
            port,
            data_dir: root.join(format!("server-{id}")),
            args,
            ca_dir: root.join("ca"),
            child: None,
            log: root.join(format!("server-{id}.log")),
        }
    }

    /// The control API's URL: `https://` when started with `--api-tls`.
    pub fn url(&self) -> String {
        let scheme = if self.args.iter().any(|a| a == "--api-tls") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Its peer listener's address.
    pub fn peer_addr(&self) -> String {
        peer_addr(self.port)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "server {} already running", self.id);
        let mut args: Vec<std::ffi::OsString> = vec![
            "server".into(),
            "--id".into(),
            self.id.to_string().into(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port).into(),
            "--data-dir".into(),
            self.data_dir.clone().into(),
            "--admin".into(),
            identity::admin_public().into(),
        ];
        if self.ca_dir.join("ca.pem").is_file() {
            args.extend(["--ca-dir".into(), self.ca_dir.clone().into()]);
        }
        args.extend(self.args.iter().map(Into::into));
        self.child = Some(spawn_logged(&args, &self.log));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 20)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of server processes sharing one temp dir.
pub struct Cluster {
    pub servers: Vec<ServerProc>,
    pub root: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` servers that bootstrap one cluster with `--peers`, under a cluster
    /// CA made with `aigrid ca init` in `root/ca`: Raft runs over mutual TLS.
    pub fn start(n: usize, extra: &[&str]) -> Self {
        let root = tempfile::tempdir().unwrap();
        ca_init(&root.path().join("ca"));
        let ports = free_ports(n);
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}={}", i + 1, peer_addr(*p)))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let mut args = vec!["--peers".to_string(), peers.clone()];
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut s = ServerProc::new(i as u64 + 1, *port, root.path(), args);
            s.start();
            servers.push(s);
        }
        Cluster { servers, root }
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ServerProc::url).collect()
    }

    /// The cluster CA's directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.root.path().join("ca")
    }

    pub fn server(&mut self, id: u64) -> &mut ServerProc {
        self.servers.iter_mut().find(|s| s.id == id).unwrap()
    }

    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- server {} ---\n{}", s.id, s.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One server that leads, and its URL, for tests that drive the CLI.
pub fn one_server() -> (Cluster, String) {
    let cluster = Cluster::start(1, &[]);
    let url = cluster.urls()[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_leader(
        &http(),
        &cluster.urls(),
        Duration::from_secs(20),
    ));
    (cluster, url)
}

/// Runs the CLI as the tests' admin against `server`.
pub fn aigrid_at(server: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--server", server]);
    aigrid(&all)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

pub async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let resp = client.get(url).signed().send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// Waits until every running server in `urls` agrees on one leader; returns its id.
pub async fn wait_leader(client: &reqwest::Client, urls: &[String], timeout: Duration) -> u64 {
    wait_leader_other_than(client, urls, timeout, None).await
}

/// Like [`wait_leader`], but a leader equal to `exclude` does not count.
pub async fn wait_leader_other_than(
    client: &reqwest::Client,
    urls: &[String],
    timeout: Duration,
    exclude: Option<u64>,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let mut leaders = Vec::new();
        for url in urls {
            let status = get_json(client, &format!("{url}/api/v1/cluster")).await;
            leaders.push(status.and_then(|s| s["leader"].as_u64()));
        }
        if let Some(Some(first)) = leaders.first() {
            if leaders.iter().all(|l| *l == Some(*first)) && exclude != Some(*first) {
                return *first;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every server in `urls` has applied the same index, equal to its commit.
pub async fn wait_converged(client: &reqwest::Client, urls: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut applied = Vec::new();
        for url in urls {
            let status = get_json(client, &format!("{url}/api/v1/cluster")).await;
            applied.push(status.map(|s| {
                (
                    s["applied_index"].as_u64().unwrap_or(0),
                    s["commit_index"].as_u64().unwrap_or(0),
                )
            }));
        }
        let first = applied.first().cloned().flatten();
        if let Some((a, c)) = first {
            if a == c && applied.iter().all(|x| *x == Some((a, c))) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "servers did not converge: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A valid job spec named `name`.
pub fn job(name: &str) -> Value {
    serde_json::json!({
        "name": name,
        "kind": "service",
        "priority": 50,
        "groups": [{
            "name": "replica",
            "count": 2,
            "resources": {"cpu_millis": 2000, "memory_mib": 8192,
                          "gpus": {"count": 1, "model": "H100", "min_memory_mib": 40000}},
            "task": {"driver": "exec", "command": "/usr/bin/python3", "args": ["serve.py"]}
        }]
    })
}

/// A service of one instance that sleeps `secs` holding `resources`, with `marker`
/// (`KEY=VALUE`, what a [`Reaper`] looks for) in its environment.
pub fn sleeper(name: &str, marker: &str, resources: Value, secs: u32) -> Value {
    let (key, value) = marker.split_once('=').unwrap();
    serde_json::json!({
        "name": name, "kind": "service",
        "groups": [{
            "name": "w", "count": 1,
            "resources": resources,
            "task": {"driver": "exec", "command": "/bin/sh", "args": ["-c", format!("exec sleep {secs}")],
                     "env": {key: value}, "kill_timeout_ms": 1000}
        }]
    })
}

/// Writes `job` to `dir/NAME.json` for `aigrid job submit`; answers the path.
pub fn job_file(dir: &Path, job: &Value) -> PathBuf {
    let file = dir.join(format!("{}.json", job["name"].as_str().unwrap()));
    std::fs::write(&file, job.to_string()).unwrap();
    file
}

/// Submits the job [`job`] builds for `name` to the server at `url`.
pub async fn post_job(
    client: &reqwest::Client,
    url: &str,
    name: &str,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{url}/api/v1/jobs"))
        .json(&job(name))
        .signed()
        .send()
        .await
}

/// Job ids a server holds in its own applied state.
pub async fn local_job_ids(client: &reqwest::Client, url: &str) -> Option<Vec<String>> {
    let jobs = get_json(client, &format!("{url}/api/v1/jobs?stale=true")).await?;
    Some(
        jobs.as_array()?
            .iter()
            .filter_map(|j| j["id"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Reads one metric value from `/metrics`.
pub async fn metric(client: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Kills, when dropped, every process started under `root` (supervisors) or
/// carrying `marker` in its environment (workloads), so a failed test leaves
/// nothing running.
pub struct Reaper {
    /// Matched in a process's command line.
    pub root: String,
    /// Matched in a process's environment.
    pub marker: String,
}

impl Reaper {
    pub fn matching(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let read = |f: &str| std::fs::read(entry.path().join(f)).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&read("cmdline")).into_owned();
            let environ = String::from_utf8_lossy(&read("environ")).into_owned();
            if cmdline.contains(&self.root) || environ.contains(&self.marker) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Reaper {
    /// Sweeps until a sweep finds nothing (a few at most): a supervisor being
    /// killed may have just started its workload, or a model server its own.
    fn drop(&mut self) {
        for _ in 0..5 {
            let pids = self.matching();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Polls `probe` every 100 ms until it answers `Some`, for at most `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`eventually`] for an async `probe`, sleeping on the runtime between tries.
pub async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reapers for what an `aigrid up` at `base` with its data under `root` starts:
/// supervisors (their command lines name the data dir), workloads (carrying
/// `marker` in their environment) and model servers (told `base`).
pub fn up_reapers(root: &Path, base: &str, marker: &str) -> [Reaper; 2] {
    [
        Reaper {
            root: root.display().to_string(),
            marker: marker.to_owned(),
        },
        Reaper {
            root: base.to_owned(),
            marker: base.to_owned(),
        },
    ]
}

/// Starts `aigrid ARGS` logging at info into a new file `log`, its stdout piped to
/// the test, and the caller's `AIGRID_STORE` ignored.
pub fn spawn_piped<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &Path) -> Child {
    aigrid_cmd()
        .args(args)
        .env("AIGRID_LOG", "info")
        .env_remove("AIGRID_STORE")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The CLI as the person whose key file is `key`, against `server`.
pub fn as_person(key: &Path, server: &str, args: &[&str]) -> Output {
    std::process::Command::new(aigrid_bin())
        .args(args)
        .args(["--server", server])
        .env("AIGRID_IDENTITY", key)
        .output()
        .unwrap()
}

/// Makes a person's identity with `aigrid key new` and answers its key file and
/// public key (from `aigrid key show --json`).
pub fn new_person(dir: &Path, name: &str) -> (PathBuf, String) {
    let file = dir.join(format!("{name}.json"));
    let made = as_person(&file, "http://127.0.0.1:1", &["key", "new", "--name", name]);
    assert_success(&made);
    let shown = json_output(&as_person(
        &file,
        "http://127.0.0.1:1",
        &["key", "show", "--json"],
    ));
    assert_eq!(shown["type"], "ed25519", "{shown}");
    assert!(shown["id"].is_string(), "{shown}");
    (file, shown["public_key"].as_str().unwrap().to_owned())
}

/// The identity id of the key in `key`.
pub fn person_id(key: &Path) -> String {
    json_output(&as_person(
        key,
        "http://127.0.0.1:1",
        &["key", "show", "--json"],
    ))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A new person `name` (a key under `dir`) made known to the cluster at `server`
/// and given `role` in `circle`: the key file.
pub fn member_of(server: &str, dir: &Path, name: &str, circle: &str, role: &str) -> PathBuf {
    let (key, public) = new_person(dir, name);
    assert_success(&aigrid_at(server, &["identity", "add", name, &public]));
    let id = person_id(&key);
    assert_success(&aigrid_at(
        server,
        &["circle", "grant", circle, &id, "--role", role],
    ));
    key
}
