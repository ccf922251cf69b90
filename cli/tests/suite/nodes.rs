//! Nodes through the CLI, without an agent: register simulated GPU nodes by hand,
//! place GPU work on them, watch usage change, mark a GPU unhealthy, drain and
//! undrain.

use crate::common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Where hand-registered nodes keep their keys, and the join token they present.
static NODE_KEYS: OnceLock<(PathBuf, String)> = OnceLock::new();

/// Runs the CLI against `server`. `node register` and `node heartbeat` sign as the
/// node, with its key under [`NODE_KEYS`]; registrations present the join token.
fn cli(server: &str, args: &[&str]) -> std::process::Output {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    if let Some((keys, token)) = NODE_KEYS.get() {
        let node = match args {
            ["node", "register", ..] => args
                .iter()
                .position(|a| *a == "--id")
                .and_then(|i| args.get(i + 1)),
            ["node", "heartbeat", id, ..] => Some(id),
            _ => None,
        };
        if let Some(node) = node {
            let dir = keys.join(node.replace('/', "_"));
            all.extend(["--key-dir".to_owned(), dir.display().to_string()]);
            if args[1] == "register" {
                all.extend(["--join-token".to_owned(), token.clone()]);
            }
        }
    }
    all.extend(["--server".to_owned(), server.to_owned()]);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    aigrid(&all)
}

/// Runs the CLI against `server` and decodes its `--json` output.
fn cli_json(server: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    json_output(&cli(server, &all))
}

/// The `node ls` row of `id`, split on whitespace.
fn ls_row(server: &str, id: &str) -> Vec<String> {
    let out = assert_success(&cli(server, &["node", "ls"]));
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("USED") && header.contains("FREE"),
        "{out}"
    );
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("no row for {id}: {out}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The job's live allocations (wanted and not finished).
fn live(job: &Value) -> Vec<Value> {
    let finished = ["complete", "failed", "lost", "stopped"];
    job["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["desired"] == "run" && !finished.contains(&a["state"].as_str().unwrap()))
        .cloned()
        .collect()
}

fn job_file(dir: &std::path::Path, name: &str, count: u32, model: &str) -> String {
    let path = dir.join(format!("{name}.json"));
    let spec = json!({
        "name": name,
        "kind": "service",
        "groups": [{
            "name": "worker",
            "count": count,
            "resources": {"cpu_millis": 2000, "memory_mib": 8192,
                          "gpus": {"count": 1, "model": model}},
            "task": {"driver": "exec", "command": "/bin/sleep", "args": ["infinity"]}
        }]
    });
    std::fs::write(&path, spec.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_take_gpu_work_through_the_cli() {
    // Nobody heartbeats these nodes on a timer; a long TTL keeps them up.
    let cluster = Cluster::start(1, &["--node-ttl-ms", "600000"]);
    let url = cluster.urls()[0].clone();
    let s = url.as_str();
    let client = http();
    wait_leader(&client, std::slice::from_ref(&url), Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let token = assert_success(&cli(s, &["node", "token", "create"]))
        .trim()
        .to_owned();
    NODE_KEYS
        .set((dir.path().join("keys"), token))
        .expect("set once");

    // Register two simulated nodes by hand.
    let out = assert_success(&cli(
        s,
        &[
            "node",
            "register",
            "--id",
            "gpu-a",
            "--attr",
            "country=BE",
            "--attr",
            "site=ghent",
            "--simulate-gpus",
            "8xH100-80GB",
        ],
    ));
    assert!(out.contains("node gpu-a registered: 8 GPUs"), "{out}");
    let out = assert_success(&cli(
        s,
        &[
            "node",
            "register",
            "--id",
            "gpu-b",
            "--name",
            "box-b",
            "--attr",
            "country=NL",
            "--simulate-gpus",
            "2xL4-24GB",
            "--cpu-millis",
            "16000",
            "--memory-mib",
            "65536",
            "--disk-mib",
            "100000",
        ],
    ));
    assert!(out.contains("node gpu-b registered: 2 GPUs"), "{out}");
    // Registering again refreshes the node with the same GPUs.
    let again = cli_json(
        s,
        &[
            "node",
            "register",
            "--id",
            "gpu-b",
            "--name",
            "box-b",
            "--attr",
            "country=NL",
            "--simulate-gpus",
            "2xL4-24GB",
            "--cpu-millis",
            "16000",
            "--memory-mib",
            "65536",
        ],
    );
    assert_eq!(again["created"], false, "{again}");

    let row = ls_row(s, "gpu-a");
    assert_eq!(
        row[..10],
        [
            "gpu-a",
            "gpu-a",
            "ready",
            "8",
            "0",
            "8",
            "0/64000",
            "0/524288",
            "0",
            "country=BE"
        ],
        "{row:?}"
    );
    assert_eq!(row[10], "site=ghent");
    let row = ls_row(s, "gpu-b");
    assert_eq!(row[1..6], ["box-b", "ready", "2", "0", "2"], "{row:?}");
    let nodes = cli_json(s, &["node", "ls"]);
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    let uuids: Vec<String> = nodes[0]["resources"]["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(uuids.len(), 8);

    // A GPU job lands on the H100 node; node ls shows the GPUs it holds.
    assert_success(&cli(
        s,
        &["job", "submit", &job_file(dir.path(), "trainer", 3, "H100")],
    ));
    let job = eventually_async(Duration::from_secs(20), "3 placements", || async {
        let job = get_json(&client, &format!("{url}/api/v1/jobs/trainer")).await?;
        (live(&job).len() == 3).then_some(job)
    })
    .await;
    let row = ls_row(s, "gpu-a");
    assert_eq!(
        row[3..9],
        ["8", "3", "5", "6000/64000", "24576/524288", "3"]
    );
    let nodes = cli_json(s, &["node", "ls"]);
    assert_eq!(nodes[0]["usage"]["gpus_used"], 3, "{nodes}");
    assert_eq!(nodes[0]["usage"]["gpus_free"], 5, "{nodes}");
    assert_eq!(nodes[1]["usage"]["gpus_used"], 0, "{nodes}");

    // job status, by name, shows each allocation with its node and GPU uuids.
    let out = assert_success(&cli(s, &["job", "status", "trainer"]));
    for a in live(&job) {
        let id = a["id"].as_str().unwrap();
        let gpu = a["gpus"][0].as_str().unwrap();
        assert!(uuids.iter().any(|u| u == gpu), "{gpu} is not gpu-a's");
        let line = out
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no line for {id}: {out}"));
        assert!(line.contains("gpu-a"), "{line}");
        assert!(line.contains(gpu), "{line}");
        assert!(line.contains("worker["), "{line}");
        assert!(line.contains("/run"), "{line}");
    }

    // node status shows which allocation holds each GPU.
    let out = assert_success(&cli(s, &["node", "status", "gpu-a"]));
    assert!(out.contains("status      ready"), "{out}");
    assert!(out.contains("gpus        3 used, 5 free of 8"), "{out}");
    assert!(out.contains("attributes  country=BE site=ghent"), "{out}");
    let first = live(&job)[0].clone();
    let (held_id, held_gpu) = (
        first["id"].as_str().unwrap().to_owned(),
        first["gpus"][0].as_str().unwrap().to_owned(),
    );
    let gpu_line = out.lines().find(|l| l.contains(&held_gpu)).unwrap();
    assert!(gpu_line.contains("healthy"), "{gpu_line}");
    assert!(gpu_line.contains("NVIDIA H100"), "{gpu_line}");
    assert!(gpu_line.contains("81920 MiB"), "{gpu_line}");
    assert!(gpu_line.contains(&held_id), "{gpu_line}");
    let allocs = cli_json(s, &["node", "status", "gpu-a"]);
    assert_eq!(allocs["id"], "gpu-a");

    // The agent's view: the allocations it should run.
    let on_a = get_json(&client, &format!("{url}/api/v1/nodes/gpu-a/allocations"))
        .await
        .unwrap();
    assert_eq!(on_a.as_array().unwrap().len(), 3, "{on_a}");

    // Heartbeats report the allocations running; another node may not report them.
    let reports: Vec<String> = live(&job)
        .iter()
        .map(|a| format!("{}=running", a["id"].as_str().unwrap()))
        .collect();
    let mut args = vec!["node", "heartbeat", "gpu-a"];
    for r in &reports {
        args.extend(["--alloc", r.as_str()]);
    }
    let out = assert_success(&cli(s, &args));
    assert!(out.contains("node gpu-a ready"), "{out}");
    let out = assert_success(&cli(s, &["job", "status", "trainer"]));
    assert!(out.contains("status      running"), "{out}");
    assert!(out.contains("running/run"), "{out}");
    assert_one_line_failure(
        &cli(s, &["node", "heartbeat", "gpu-b", "--alloc", &reports[0]]),
        "not on node `gpu-b`",
    );

    // An impossible job says why it is unplaced.
    assert_success(&cli(
        s,
        &[
            "job",
            "submit",
            &job_file(dir.path(), "needs-b200", 1, "B200"),
        ],
    ));
    let out = eventually_async(Duration::from_secs(20), "an unplaced reason", || async {
        let out = stdout(&cli(s, &["job", "status", "needs-b200"]));
        out.contains("unplaced").then_some(out)
    })
    .await;
    let line = out.lines().find(|l| l.starts_with("unplaced")).unwrap();
    assert!(line.contains("worker x1: "), "{line}");
    assert!(line.contains("0/2 nodes"), "{line}");
    assert!(line.contains("B200"), "{line}");

    // A GPU reported unhealthy is cordoned; only the allocation holding it moves.
    let unhealthy = format!("{held_gpu}:XID 79");
    let out = assert_success(&cli(
        s,
        &["node", "heartbeat", "gpu-a", "--gpu-unhealthy", &unhealthy],
    ));
    assert!(
        out.contains("node gpu-a ready (1 job re-evaluated)"),
        "{out}"
    );
    let out = assert_success(&cli(s, &["node", "status", "gpu-a"]));
    let gpu_line = out.lines().find(|l| l.contains(&held_gpu)).unwrap();
    assert!(gpu_line.contains("unhealthy: XID 79"), "{gpu_line}");
    assert!(!gpu_line.contains(&held_id), "{gpu_line}");
    let job = eventually_async(
        Duration::from_secs(20),
        "a replacement on a healthy GPU",
        || async {
            let job = get_json(&client, &format!("{url}/api/v1/jobs/trainer")).await?;
            let live = live(&job);
            (live.len() == 3 && live.iter().all(|a| a["gpus"][0] != held_gpu.as_str()))
                .then_some(job)
        },
    )
    .await;
    assert!(live(&job).iter().all(|a| a["id"] != held_id.as_str()));
    assert_eq!(ls_row(s, "gpu-a")[3..6], ["8", "3", "4"]);
    // By index, it comes back.
    let node = cli_json(s, &["node", "status", "gpu-a"]);
    let index = node["resources"]["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["uuid"] == held_gpu.as_str())
        .unwrap()["index"]
        .to_string();
    assert_success(&cli(
        s,
        &["node", "heartbeat", "gpu-a", "--gpu-healthy", &index],
    ));
    let out = assert_success(&cli(s, &["node", "status", "gpu-a"]));
    let gpu_line = out.lines().find(|l| l.contains(&held_gpu)).unwrap();
    assert!(!gpu_line.contains("unhealthy"), "{gpu_line}");
    assert_eq!(ls_row(s, "gpu-a")[3..6], ["8", "3", "5"]);

    // Drain and undrain. Nothing else has H100s, so the allocations stay put.
    let out = assert_success(&cli(s, &["node", "drain", "gpu-a", "--max-parallel", "2"]));
    assert_eq!(
        out.trim(),
        "node gpu-a draining: 3 allocations to move, at most 2 at a time"
    );
    let out = assert_success(&cli(s, &["node", "status", "gpu-a"]));
    assert!(
        out.contains("status      draining (at most 2 allocations moving at a time)"),
        "{out}"
    );
    assert_eq!(ls_row(s, "gpu-a")[2], "draining");
    let node = cli_json(s, &["node", "status", "gpu-a"]);
    assert_eq!(node["drain"]["max_parallel"], 2, "{node}");
    let out = assert_success(&cli(s, &["node", "undrain", "gpu-a"]));
    assert_eq!(out.trim(), "node gpu-a ready");
    let node = cli_json(s, &["node", "status", "gpu-a"]);
    assert_eq!(node["status"], "ready");
    assert!(node.get("drain").is_none(), "{node}");
    // Undraining a ready node changes nothing.
    let out = assert_success(&cli(s, &["node", "undrain", "gpu-a"]));
    assert_eq!(out.trim(), "node gpu-a ready");
    // An empty body drains one at a time.
    let resp = client
        .post(format!("{url}/api/v1/nodes/gpu-b/drain"))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let node: Value = resp.json().await.unwrap();
    assert_eq!(node["status"], "draining");
    assert_eq!(node["drain"]["max_parallel"], 1);
    let resp = client
        .delete(format!("{url}/api/v1/nodes/gpu-b/drain"))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ready");

    // Mistakes: one line and a non-zero exit.
    assert_one_line_failure(&cli(s, &["node", "status", "nope"]), "not found");
    assert_one_line_failure(
        &cli(s, &["node", "heartbeat", "nope"]),
        "has no registered key",
    );
    assert_one_line_failure(&cli(s, &["node", "drain", "nope"]), "not found");
    assert_one_line_failure(
        &cli(
            s,
            &["node", "heartbeat", "gpu-a", "--gpu-unhealthy", "GPU-nope"],
        ),
        "has no GPU `GPU-nope`",
    );
    assert_one_line_failure(
        &cli(s, &["node", "heartbeat", "gpu-a", "--gpu-unhealthy", "99"]),
        "no GPU with index 99",
    );
    assert_one_line_failure(
        &cli(s, &["node", "heartbeat", "gpu-a", "--alloc", "x=sleeping"]),
        "must be one of",
    );
    assert_one_line_failure(
        &cli(s, &["node", "drain", "gpu-a", "--max-parallel", "0"]),
        "--max-parallel",
    );
    assert_one_line_failure(
        &cli(s, &["node", "register", "--id", "a/b"]),
        "id: may contain only",
    );
    assert_one_line_failure(
        &cli(
            s,
            &["node", "register", "--id", "x", "--simulate-gpus", "2xH100"],
        ),
        "MEMGB",
    );
    assert_one_line_failure(
        &cli(s, &["node", "register", "--id", "x", "--attr", "country"]),
        "KEY=VALUE",
    );
    assert_one_line_failure(
        &cli(s, &["node", "register", "--id", "x", "--cpu-millis", "0"]),
        "resources.cpu_millis",
    );
    assert_eq!(cli_json(s, &["node", "ls"]).as_array().unwrap().len(), 2);

    // Jobs are removed by name too.
    assert_success(&cli(s, &["job", "rm", "needs-b200"]));
    assert_one_line_failure(&cli(s, &["job", "status", "needs-b200"]), "not found");
}
