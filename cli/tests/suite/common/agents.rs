//! Real `aigrid agent` processes with simulated GPUs for the tests that need a
//! node: started, killed, their workloads found, a server and an agent joined.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use serde_json::Value;

use super::*;

/// One agent process.
pub struct AgentProc {
    pub name: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn new(root: &Path, name: &str, args: Vec<String>) -> Self {
        AgentProc {
            name: name.to_owned(),
            data_dir: root.join(name),
            args,
            child: None,
            log: root.join(format!("{name}.log")),
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent {} already running", self.name);
        let mut args: Vec<std::ffi::OsString> = vec![
            "agent".into(),
            "--data-dir".into(),
            self.data_dir.clone().into(),
        ];
        args.extend(self.args.iter().map(Into::into));
        self.child = Some(spawn_logged(&args, &self.log));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the agent gets no chance to do anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Workload processes alive with `marker` in their environment.
pub fn workloads(marker: &str) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Zombies are gone as far as the workload is concerned.
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&environ).contains(marker) {
            pids.insert(pid);
        }
    }
    pids
}

pub fn cli(server: &str, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend(["--server", server]);
    aigrid(&all)
}

pub fn cli_json(server: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    json_output(&cli(server, &all))
}

pub fn new_token(server: &str) -> String {
    assert_success(&cli(
        server,
        &["node", "token", "create", "--max-uses", "10"],
    ))
    .trim()
    .to_owned()
}

pub fn agent_args(urls: &[String], token: &str, node: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--servers",
        &urls.join(","),
        "--join-token",
        token,
        "--node-id",
        node,
        "--heartbeat-interval-ms",
        "300",
        "--poll-wait-ms",
        "5000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Live allocations of a job: wanted and not finished.
pub fn live(job: &Value) -> Vec<Value> {
    job["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["desired"] == "run"
                && !["complete", "failed", "lost", "stopped"]
                    .contains(&a["state"].as_str().unwrap())
        })
        .cloned()
        .collect()
}

/// The running allocations of `job`, by id, with their node, once there are `n`.
pub fn running(server: &str, job: &str, n: usize) -> Option<BTreeMap<String, String>> {
    let job = cli_json(server, &["job", "status", job]);
    let running: BTreeMap<String, String> = live(&job)
        .iter()
        .filter(|a| a["state"] == "running")
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["node_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (running.len() == n).then_some(running)
}

/// A stand-in for a UUID: unique per test run.
pub fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}-{}", std::process::id())
}

/// What `{base}/metrics` answers.
pub fn metrics_text(rt: &tokio::runtime::Runtime, base: &str) -> String {
    rt.block_on(async {
        let response = http().get(format!("{base}/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    })
}

/// One server and one agent with simulated GPUs, joined; what a test holds of them.
pub struct OneNode {
    pub cluster: Cluster,
    pub urls: Vec<String>,
    pub rt: tokio::runtime::Runtime,
    pub root: tempfile::TempDir,
    /// In every workload's environment, for [`workloads`] and the reaper.
    pub marker: String,
    pub reaper: Reaper,
    pub agent: AgentProc,
}

/// Starts a server with `server_args` and an agent `name` with `gpus` simulated.
pub fn one_node(server_args: &[&str], name: &str, gpus: &str) -> OneNode {
    one_node_with(server_args, name, &["--simulate-gpus", gpus])
}

/// Starts a server with `server_args` and an agent `name` with `agent_extra` flags.
pub fn one_node_with(server_args: &[&str], name: &str, agent_extra: &[&str]) -> OneNode {
    let cluster = Cluster::start(1, server_args);
    let urls = cluster.urls();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_leader(&http(), &urls, Duration::from_secs(20)));
    let root = tempfile::tempdir().unwrap();
    let marker = format!("AIGRID_TEST_MARK={}", uuid_like());
    let reaper = Reaper {
        root: root.path().display().to_string(),
        marker: marker.clone(),
    };
    let token = new_token(&urls[0]);
    let mut agent = AgentProc::new(
        root.path(),
        name,
        agent_args(&urls, &token, name, agent_extra),
    );
    agent.start();
    OneNode {
        cluster,
        urls,
        rt,
        root,
        marker,
        reaper,
        agent,
    }
}
