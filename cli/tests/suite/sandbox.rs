//! The workload sandbox end to end: real workloads under real `aigrid supervise`
//! processes, driven through `aigrid_agent::runner::Runner` as the agent drives
//! them, play the attacker against the node's credentials, the servers' files,
//! the user's config and other allocations.
//!
//! The layout mirrors `aigrid up`: `<root>/agent` is the agent's data dir (its
//! node key in `identity.json`), `<root>/server` the server's (Raft files, left
//! readable by everyone here so only the sandbox stands in the way),
//! `<root>/demo-model/publisher.key` a publisher key. Tests that need root (a uid
//! per allocation) or Landlock are listed as `ignored, skipped: …` where the
//! machine that built them lacks it (see `build.rs`).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_agent::driver::ExecDriver;
use aigrid_agent::identity::Identity;
use aigrid_agent::runner::{Runner, RunnerConfig, SupervisorLaunch};
use aigrid_agent::sandbox::SandboxConfig;
use aigrid_api::{AllocState, AllocationReport, Assignment};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::common;

struct Harness {
    /// Kills what a test leaves running: supervisors (their command lines) and
    /// workloads (their environment) name the root. Dropped before `dir`.
    _reaper: common::Reaper,
    dir: tempfile::TempDir,
}

impl Harness {
    /// A root directory other users may pass through, as `/var/lib` is.
    fn new() -> Self {
        Harness::with_mode(0o711)
    }

    /// A root directory of mode `mode`.
    fn with_mode(mode: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        let root = dir.path().display().to_string();
        let h = Harness {
            _reaper: common::Reaper {
                root: root.clone(),
                marker: root,
            },
            dir,
        };
        Identity::load_or_create(&h.data_dir(), Some("node-1"), "host").unwrap();
        for (path, text, mode) in [
            (
                "server/raft.log",
                "raft log: every committed command",
                0o644,
            ),
            ("server/snapshot", "cluster state", 0o644),
            ("demo-model/publisher.key", &"ab".repeat(32), 0o600),
        ] {
            let path = h.root().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::set_permissions(h.root().join("server"), fs::Permissions::from_mode(0o755)).unwrap();
        h
    }

    fn root(&self) -> PathBuf {
        fs::canonicalize(self.dir.path()).unwrap()
    }

    fn data_dir(&self) -> PathBuf {
        self.root().join("agent")
    }

    fn alloc_dir(&self, id: &str) -> PathBuf {
        self.data_dir().join("allocs").join(id)
    }

    async fn open(&self) -> Runner {
        let mut config = RunnerConfig::new(
            self.data_dir(),
            SupervisorLaunch {
                program: env!("CARGO_BIN_EXE_aigrid").into(),
                args: vec!["supervise".into()],
            },
        );
        config.sandbox = SandboxConfig {
            protected: vec![self.root().join("server"), self.root().join("demo-model")],
            ..SandboxConfig::default()
        };
        Runner::open(config, Arc::new(ExecDriver::new()))
            .await
            .unwrap()
    }

    /// The workload's standard output so far.
    fn stdout(&self, id: &str) -> String {
        fs::read_to_string(self.alloc_dir(id).join("logs/stdout.log")).unwrap_or_default()
    }

    /// The `task.json` the agent wrote for `id`.
    fn task_file(&self, id: &str) -> Value {
        serde_json::from_slice(&fs::read(self.alloc_dir(id).join("task.json")).unwrap()).unwrap()
    }
}

/// A run of `/bin/sh -c script` with the variables `env`.
fn sh(id: &str, script: &str, env: Value) -> Assignment {
    serde_json::from_value(json!({
        "allocation": {
            "id": id, "job_id": "job-1", "job_version": 1, "node_id": "node-1",
            "group": "workers", "index": 0,
            "resources": {"cpu_millis": 500, "memory_mib": 128},
            "gpus": [], "state": "pending", "desired": "run",
            "created_at": 0, "updated_at": 0
        },
        "task": {
            "driver": "exec", "command": "/bin/sh", "args": ["-c", script],
            "env": env, "kill_timeout_ms": 2000, "restart": {"mode": "never"}
        },
    }))
    .unwrap()
}

async fn wait_for(
    runner: &Runner,
    id: &str,
    done: impl Fn(&AllocationReport) -> bool,
) -> AllocationReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = runner.reports().into_iter().find(|r| r.id.as_str() == id);
        if let Some(r) = report.filter(|r| done(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never got there: {:?}",
            runner.reports()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `id`'s output holds `line`.
async fn wait_output(h: &Harness, id: &str, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = h.stdout(id);
        if out.lines().any(|l| l == line) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never printed {line}: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A shell script that tries to read each of `paths` and prints, per path,
/// `read PATH` or `denied PATH: <cat's complaint>`.
fn try_reading(paths: &[PathBuf]) -> String {
    let mut script = String::new();
    for path in paths {
        let p = path.display();
        script.push_str(&format!(
            "if cat '{p}' > /dev/null 2> err; then echo 'read {p}'; \
             else echo \"denied {p}: $(cat err)\"; fi\n"
        ));
    }
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(root_user, landlock)),
    ignore = "skipped: needs root (a uid per allocation) and a kernel with Landlock"
)]
async fn a_workload_cannot_read_the_node_key_other_secrets_the_servers_files_or_the_users_config() {
    let h = Harness::new();
    let runner = h.open().await;
    let protections = runner.protections().expect("the exec driver reports");
    assert!(protections.landlock_abi.is_some(), "{protections:?}");
    assert!(protections.per_allocation_uid, "{protections:?}");

    // The victim holds a secret and keeps running.
    runner.apply(&[sh(
        "victim",
        "echo started; sleep 600",
        json!({"TOKEN": "victim-secret-7f3a"}),
    )]);
    wait_output(&h, "victim", "started").await;
    assert!(h.alloc_dir("victim").join("secrets/TOKEN").exists());

    let config_dir = dirs::config_dir().expect("a user config dir");
    fs::create_dir_all(&config_dir).unwrap();
    let data = h.data_dir();
    let targets = [
        data.join("identity.json"),
        data.join("allocs/victim/secrets/TOKEN"),
        data.join("allocs/victim/task.json"),
        h.root().join("demo-model/publisher.key"),
        h.root().join("server/raft.log"),
        h.root().join("server/snapshot"),
    ];
    let script = format!(
        "{}if ls '{}' > /dev/null 2> err; then echo 'listed config'; \
         else echo \"denied config: $(cat err)\"; fi\n\
         if ls '{}' > /dev/null 2> err; then echo 'listed data'; \
         else echo \"denied data: $(cat err)\"; fi\n\
         echo done",
        try_reading(&targets),
        config_dir.display(),
        data.display(),
    );
    runner.apply(&[
        sh(
            "victim",
            "echo started; sleep 600",
            json!({"TOKEN": "victim-secret-7f3a"}),
        ),
        sh("attacker", &script, json!({})),
    ]);
    let report = wait_for(&runner, "attacker", |r| r.state.is_terminal()).await;
    let out = h.stdout("attacker");
    assert_eq!(report.state, AllocState::Complete, "{report:?}: {out}");
    for target in &targets {
        let line = out
            .lines()
            .find(|l| l.contains(&target.display().to_string()))
            .unwrap_or_else(|| panic!("no line for {}: {out}", target.display()));
        assert!(
            line.starts_with("denied") && line.contains("Permission denied"),
            "the workload read {}: {out}",
            target.display()
        );
    }
    for what in ["config", "data"] {
        let line = out
            .lines()
            .find(|l| l == &format!("listed {what}") || l.starts_with(&format!("denied {what}:")))
            .unwrap_or_else(|| panic!("no line for {what}: {out}"));
        assert!(
            line.starts_with("denied") && line.contains("Permission denied"),
            "the workload listed the {what} dir: {out}"
        );
    }
    assert!(!out.contains("victim-secret-7f3a"), "{out}");
    runner.apply(&[]);
    wait_for(&runner, "victim", |r| r.state.is_terminal()).await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(landlock), ignore = "skipped: needs a kernel with Landlock")]
async fn a_workload_reads_its_own_secrets_and_writes_nowhere_but_its_own_dirs() {
    let h = Harness::new();
    let runner = h.open().await;
    let escape = std::env::temp_dir().join(format!(
        "aigrid-sandbox-escape-{:016x}",
        rand::random::<u64>()
    ));
    let data = h.data_dir();
    let outside = [
        escape.clone(),
        h.root().join("planted"),
        data.join("planted"),
        data.join("allocs/writer/task.json"),
        data.join("allocs/writer/exit.json"),
        data.join("allocs/writer/secrets/TOKEN"),
    ];
    let mut script = String::from(
        "echo \"file: $(cat \"$AIGRID_SECRETS_DIR/TOKEN\")\"\n\
         echo \"env: $TOKEN\"\n\
         echo mine > \"$AIGRID_TASK_DIR/mine\" && echo 'wrote local'\n\
         echo mine > \"$TMPDIR/mine\" && echo 'wrote tmp'\n",
    );
    for path in &outside {
        let p = path.display();
        script.push_str(&format!(
            "if echo x > '{p}' 2> err; then echo 'wrote {p}'; \
             else echo \"denied {p}: $(cat err)\"; fi\n"
        ));
    }
    runner.apply(&[sh(
        "writer",
        &script,
        json!({"TOKEN": "own-secret-41c9", "OTHER": "second"}),
    )]);
    let report = wait_for(&runner, "writer", |r| r.state.is_terminal()).await;
    let out = h.stdout("writer");
    assert_eq!(report.state, AllocState::Complete, "{report:?}: {out}");
    assert!(out.contains("file: own-secret-41c9\n"), "{out}");
    assert!(out.contains("env: own-secret-41c9\n"), "{out}");
    assert!(
        out.contains("wrote local\n") && out.contains("wrote tmp\n"),
        "{out}"
    );
    for path in &outside {
        let p = path.display().to_string();
        let line = out
            .lines()
            .find(|l| l.contains(&p))
            .unwrap_or_else(|| panic!("no line for {p}: {out}"));
        assert!(line.starts_with("denied"), "the workload wrote {p}: {out}");
    }
    assert!(!escape.exists());
    let secret = h.alloc_dir("writer").join("secrets/TOKEN");
    assert_eq!(fs::read_to_string(&secret).unwrap(), "own-secret-41c9");
    assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o777, 0o400);
    let task = h.task_file("writer");
    assert_eq!(task["env"]["TOKEN"], "own-secret-41c9");
    assert_eq!(
        fs::metadata(h.alloc_dir("writer").join("task.json"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root_user), ignore = "skipped: needs root (a uid per allocation)")]
async fn each_allocation_keeps_its_own_uid_across_agent_restarts() {
    let h = Harness::new();
    let first = h.open().await;
    let script = "echo \"uid $(id -u) gid $(id -g) groups $(id -G)\"; sleep 600";
    first.apply(&[sh("a", script, json!({})), sh("b", script, json!({}))]);
    let ids = |id: &str| -> (u32, u32) {
        let out = h.stdout(id);
        let line = out
            .lines()
            .find(|l| l.starts_with("uid "))
            .unwrap()
            .to_owned();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[5..], [words[3]], "supplementary groups: {line}");
        (words[1].parse().unwrap(), words[3].parse().unwrap())
    };
    for id in ["a", "b"] {
        wait_for(&first, id, |r| r.state == AllocState::Running).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !h.stdout(id).contains("uid ") {
            assert!(Instant::now() < deadline, "{id} printed nothing");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let (uid_a, gid_a) = ids("a");
    let (uid_b, _) = ids("b");
    assert_ne!(uid_a, 0);
    assert_ne!(uid_a, uid_b);
    assert_eq!(gid_a, uid_a, "its own group");
    assert_eq!(h.task_file("a")["sandbox"]["uid"], uid_a);
    let local = fs::metadata(h.alloc_dir("a").join("local")).unwrap();
    assert_eq!((local.uid(), local.mode() & 0o777), (uid_a, 0o700));
    let alloc_dir = fs::metadata(h.alloc_dir("a")).unwrap();
    assert_eq!(
        alloc_dir.uid(),
        0,
        "the allocation directory stays the agent's"
    );
    first.shutdown().await;
    drop(first);

    // A restarted agent re-adopts both uids: a newcomer gets neither.
    let second = h.open().await;
    wait_for(&second, "a", |r| r.state == AllocState::Running).await;
    let mut all = vec![sh("a", script, json!({})), sh("b", script, json!({}))];
    all.push(sh("c", script, json!({})));
    second.apply(&all);
    wait_for(&second, "c", |r| r.state == AllocState::Running).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h.stdout("c").contains("uid ") {
        assert!(Instant::now() < deadline, "c printed nothing");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (uid_c, _) = ids("c");
    assert!(uid_c != uid_a && uid_c != uid_b, "{uid_c} is taken");
    second.apply(&[]);
    for id in ["a", "b", "c"] {
        wait_for(&second, id, |r| r.state.is_terminal()).await;
    }
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(root_user, landlock)),
    ignore = "skipped: needs root and a kernel with Landlock"
)]
async fn a_workload_left_with_roots_uid_has_no_capability_and_still_cannot_read_the_node_key() {
    // Other users cannot pass through the root: allocations cannot have uids of
    // their own, and the node says why.
    let h = Harness::with_mode(0o700);
    let runner = h.open().await;
    let protections = runner.protections().unwrap();
    assert!(!protections.per_allocation_uid);
    let why = protections.uid_reason.clone().unwrap_or_default();
    assert!(why.contains("not searchable by other users"), "{why}");
    assert!(protections
        .summary()
        .contains("shared uid (root without capabilities"));

    let key = h.data_dir().join("identity.json");
    let script = format!(
        "echo \"uid $(id -u)\"; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status\n{}echo done",
        try_reading(std::slice::from_ref(&key))
    );
    runner.apply(&[sh("root-ish", &script, json!({}))]);
    let report = wait_for(&runner, "root-ish", |r| r.state.is_terminal()).await;
    let out = h.stdout("root-ish");
    assert_eq!(report.state, AllocState::Complete, "{report:?}: {out}");
    assert!(out.contains("uid 0\n"), "{out}");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let line = out.lines().find(|l| l.starts_with(set)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    let line = out.lines().find(|l| l.contains("identity.json")).unwrap();
    assert!(
        line.starts_with("denied") && line.contains("Permission denied"),
        "{out}"
    );
    runner.shutdown().await;
}

#[test]
#[cfg_attr(
    not(all(root_user, landlock)),
    ignore = "skipped: needs root and a kernel with Landlock"
)]
fn up_reports_its_sandbox_and_runs_its_model_server_under_a_uid_of_its_own() {
    use std::io::BufRead;
    let root = tempfile::tempdir().unwrap();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let listen = format!("127.0.0.1:{}", common::free_ports(1)[0]);
    let server = format!("http://{listen}");
    let _reapers = common::up_reapers(root.path(), &server, &server);
    let data = root.path().join("data");
    let log = root.path().join("up.log");
    let mut up = common::spawn_piped(
        &[
            "up",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &log,
    );
    let (lines, said) = std::sync::mpsc::channel();
    let out = std::io::BufReader::new(up.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match said.recv_timeout(left) {
            Ok(line) if line.contains("demo model tiny-llama is ready") => break,
            Ok(_) => {}
            Err(e) => panic!(
                "the demo model never got ready ({e}): {}",
                common::tail(&log, 30)
            ),
        }
    }

    // The node says what confines its workloads.
    let nodes: Value = serde_json::from_str(&common::assert_success(&common::aigrid(&[
        "node", "ls", "--json", "--server", &server,
    ])))
    .unwrap();
    let node = nodes[0]["id"].as_str().unwrap().to_owned();
    let shown = common::assert_success(&common::aigrid(&[
        "node", "status", &node, "--server", &server,
    ]));
    let line = shown.lines().find(|l| l.starts_with("sandbox ")).unwrap();
    assert!(
        line.contains("landlock abi ") && line.ends_with(", per-allocation uid"),
        "{shown}"
    );

    // The model server runs under its allocation's uid, in the shared group,
    // confined, and fills the model cache its group shares.
    let allocs = data.join("agent/allocs");
    let alloc = fs::read_dir(&allocs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let workload: Value =
        serde_json::from_slice(&fs::read(alloc.join("workload.json")).unwrap()).unwrap();
    let confined = workload["sandbox"].as_str().unwrap();
    assert!(
        confined.starts_with("landlock fully enforced, uid "),
        "{confined}"
    );
    let pid = workload["process"]["pid"].as_i64().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|w| w.parse().unwrap())
            .collect()
    };
    let (uid, gid) = (ids("Uid:")[0], ids("Gid:")[0]);
    assert!(uid > 200_000, "{status}");
    assert_eq!(gid, 200_000, "the model servers' shared group");
    assert!(ids("Groups:").is_empty(), "{status}");
    let cache = fs::metadata(data.join("agent/model-cache")).unwrap();
    assert_eq!((cache.gid(), cache.mode() & 0o7777), (200_000, 0o2770));
    assert!(fs::read_dir(data.join("agent/model-cache/chunks"))
        .unwrap()
        .next()
        .is_some());

    let _ = kill(Pid::from_raw(up.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "up did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}
