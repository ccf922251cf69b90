//! Real `aigrid agent` processes with simulated GPUs against a real server cluster:
//! joining with a token, running GPU work on distinct devices, healing after an
//! agent dies, reattaching after a restart, refusing tampered artifacts, and
//! listening on nothing.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::agents::*;
use common::*;
use serde_json::json;

#[test]
fn agents_run_gpu_work_heal_and_reattach() {
    const TTL_MS: u64 = 3000;
    let cluster = Cluster::start(3, &["--node-ttl-ms", &TTL_MS.to_string()]);
    let urls = cluster.urls();
    let s = urls[0].as_str();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_leader(&http(), &urls, Duration::from_secs(20)));
    let root = tempfile::tempdir().unwrap();
    let marker = format!("AIGRID_TEST_MARK={}", uuid_like());
    let _reaper = Reaper {
        root: root.path().display().to_string(),
        marker: marker.clone(),
    };

    let token = new_token(s);
    let mut agents: Vec<AgentProc> = ["edge-a", "edge-b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let site = format!("site={}", ["ghent", "lyon"][i]);
            let args = agent_args(
                &urls,
                &token,
                name,
                &["--simulate-gpus", "2xH100-80GB", "--attr", &site],
            );
            AgentProc::new(root.path(), name, args)
        })
        .collect();
    for a in &mut agents {
        a.start();
    }
    eventually(Duration::from_secs(20), "two ready nodes", || {
        let nodes = cli_json(s, &["node", "ls"]);
        let ready = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| {
                n["status"] == "ready" && n["resources"]["gpus"].as_array().unwrap().len() == 2
            })
            .count();
        (ready == 2).then_some(())
    });

    // Two instances of one GPU each, spread over the sites: one per agent.
    let (key, value) = marker.split_once('=').unwrap();
    let job = json!({
        "name": "gpu-work", "kind": "service",
        "groups": [{
            "name": "w", "count": 2,
            "resources": {"cpu_millis": 100, "memory_mib": 64, "gpus": {"count": 1}},
            "spread": [{"attribute": "site"}],
            "task": {"driver": "exec", "command": "/bin/sh",
                     "args": ["-c", "echo \"$CUDA_VISIBLE_DEVICES\" > \"$AIGRID_TASK_DIR/cuda\"; echo started $AIGRID_ALLOC_ID; exec sleep 600"],
                     "env": {key: value},
                     "kill_timeout_ms": 2000}
        }]
    });
    let file = root.path().join("job.json");
    std::fs::write(&file, job.to_string()).unwrap();
    assert_success(&cli(s, &["job", "submit", file.to_str().unwrap()]));
    let first = eventually(Duration::from_secs(30), "two running instances", || {
        running(s, "gpu-work", 2)
    });
    let nodes: BTreeSet<&String> = first.values().collect();
    assert_eq!(nodes.len(), 2, "one instance per agent: {first:?}");

    // Each process saw its own GPU, the one its allocation reserved.
    let job_view = cli_json(s, &["job", "status", "gpu-work"]);
    let mut seen = BTreeSet::new();
    for alloc in live(&job_view) {
        let id = alloc["id"].as_str().unwrap();
        // Written in its own directory: the sandbox lets it write nowhere else.
        let cuda = eventually(Duration::from_secs(10), "the CUDA file", || {
            ["edge-a", "edge-b"].iter().find_map(|agent| {
                let local = root.path().join(agent).join("allocs").join(id);
                std::fs::read_to_string(local.join("local/cuda")).ok()
            })
        });
        let want = alloc["gpus"][0].as_str().unwrap();
        assert_eq!(cuda.trim(), want, "allocation {id}");
        seen.insert(cuda.trim().to_owned());
    }
    assert_eq!(seen.len(), 2, "distinct CUDA_VISIBLE_DEVICES: {seen:?}");
    assert_eq!(workloads(&marker).len(), 2);

    // Their output reaches users through the servers.
    let some_id = first.keys().next().unwrap().clone();
    eventually(Duration::from_secs(15), "shipped logs", || {
        let logs = cli(s, &["alloc", "logs", &some_id]);
        stdout(&logs)
            .contains(&format!("started {some_id}"))
            .then_some(())
    });

    // SIGKILL agent a: its node goes down after the TTL and its instance moves to b.
    let victim = first
        .iter()
        .find(|(_, n)| n.as_str() == "edge-a")
        .map(|(id, _)| id.clone())
        .unwrap();
    agents[0].kill();
    let healed = eventually(
        Duration::from_millis(TTL_MS * 2 + 30_000),
        "the instance rescheduled on edge-b",
        || {
            let r = running(s, "gpu-work", 2)?;
            (!r.contains_key(&victim) && r.values().all(|n| n == "edge-b")).then_some(r)
        },
    );
    // It moved because its node went down, not for any other reason.
    let node_a = cli_json(s, &["node", "status", "edge-a"]);
    assert_eq!(node_a["status"], "down", "{node_a}");
    // The orphaned process of the dead agent still runs: nobody could stop it.
    assert_eq!(workloads(&marker).len(), 3);

    // Agent a comes back with its data dir: it stops the instance that moved away
    // and starts nothing.
    agents[0].start();
    eventually(Duration::from_secs(20), "the orphan stopped", || {
        (workloads(&marker).len() == 2).then_some(())
    });
    let node_a = cli_json(s, &["node", "status", "edge-a"]);
    assert_eq!(node_a["status"], "ready", "{node_a}");

    // Agent b restarts (SIGKILL, then the same data dir): it reattaches to its two
    // processes instead of starting them again.
    let before = workloads(&marker);
    agents[1].kill();
    agents[1].start();
    eventually(
        Duration::from_secs(20),
        "edge-b reattached and registered",
        || {
            let log = std::fs::read_to_string(&agents[1].log).unwrap_or_default();
            let reattached = log.matches("reattached to a running allocation").count();
            // Its second registration: the first was the agent's first start.
            (reattached == 2 && log.matches("registered").count() == 2).then_some(())
        },
    );
    assert_eq!(workloads(&marker), before, "{}", agents[1].log_tail());
    assert_eq!(running(s, "gpu-work", 2), Some(healed.clone()));

    // The server both agents started with dies: they move to the others on their
    // own, so their nodes stay up past the TTL and nothing is rescheduled.
    let mut cluster = cluster;
    cluster.server(1).kill();
    let killed_at = epoch_millis();
    let s = urls[1].as_str();
    // Both nodes heard from (through the other servers) after a whole TTL without
    // server 1, and still ready.
    eventually(
        Duration::from_millis(TTL_MS * 2 + 30_000),
        "heartbeats a TTL after the server died",
        || {
            let nodes = cli_json(s, &["node", "ls"]);
            let nodes = nodes.as_array()?;
            let heard = nodes
                .iter()
                .all(|n| n["last_seen"].as_u64().unwrap_or(0) >= killed_at + TTL_MS);
            (nodes.len() == 2 && heard).then_some(())
        },
    );
    for name in ["edge-a", "edge-b"] {
        let node = cli_json(s, &["node", "status", name]);
        assert_eq!(node["status"], "ready", "{name}: {node}");
    }
    assert_eq!(running(s, "gpu-work", 2), Some(healed));

    // Removing the job stops every process (SIGTERM through the supervisor).
    assert_success(&cli(s, &["job", "rm", "gpu-work"]));
    eventually(Duration::from_secs(20), "all workloads stopped", || {
        workloads(&marker).is_empty().then_some(())
    });
}

/// Milliseconds since the Unix epoch, as servers stamp `last_seen`.
fn epoch_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Listening TCP sockets owned by `pid`: the socket inodes among its fds that the
/// kernel's tables show in state LISTEN, with their local ports.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f[1], f[3], f[9]);
            // TCP LISTEN is 0A; a bound UDP socket (07, unconnected) also takes
            // datagrams from anyone.
            let listening = if table.starts_with("tcp") {
                state == "0A"
            } else {
                state == "07"
            };
            if listening && inodes.contains(inode) {
                let port = u16::from_str_radix(local.rsplit(':').next().unwrap(), 16).unwrap();
                ports.push(port);
            }
        }
    }
    ports
}

#[test]
fn an_agent_listens_on_nothing_but_an_enabled_metrics_address() {
    let cluster = Cluster::start(1, &[]);
    let urls = cluster.urls();
    let s = urls[0].as_str();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_leader(&http(), &urls, Duration::from_secs(20)));
    let root = tempfile::tempdir().unwrap();
    let _reaper = Reaper {
        root: root.path().display().to_string(),
        marker: format!("AIGRID_TEST_MARK={}", uuid_like()),
    };
    let token = new_token(s);

    let mut quiet = AgentProc::new(
        root.path(),
        "quiet",
        agent_args(&urls, &token, "quiet", &["--simulate-gpus", "1xL4-24GB"]),
    );
    quiet.start();
    let metrics_port = free_ports(1)[0];
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut open = AgentProc::new(
        root.path(),
        "open",
        agent_args(&urls, &token, "open", &["--metrics-listen", &metrics_addr]),
    );
    open.start();
    eventually(Duration::from_secs(20), "both agents registered", || {
        let nodes = cli_json(s, &["node", "ls"]);
        (nodes.as_array().unwrap().len() == 2).then_some(())
    });
    // Both have heartbeated (their readings are in), so each is past its start,
    // where anything it listens on would be bound.
    eventually(Duration::from_secs(20), "both agents heartbeated", || {
        let nodes = cli_json(s, &["node", "ls"]);
        let all = nodes.as_array()?;
        all.iter().all(|n| !n["telemetry"].is_null()).then_some(())
    });
    assert_eq!(
        listening_ports(quiet.pid()),
        Vec::<u16>::new(),
        "{}",
        quiet.log_tail()
    );
    assert_eq!(listening_ports(open.pid()), vec![metrics_port]);
    let text = metrics_text(&rt, &format!("http://{metrics_addr}"));
    assert!(
        text.contains("aigrid_agent_heartbeats_sent_total"),
        "{text}"
    );
    // The metrics listener serves metrics and nothing else.
    let status = rt.block_on(async {
        http()
            .get(format!("http://{metrics_addr}/api/v1/nodes"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 404);
}

#[test]
fn a_tampered_artifact_is_never_started_and_a_revoked_node_is_refused() {
    let OneNode {
        cluster: _cluster,
        urls,
        rt,
        root,
        marker,
        reaper: _reaper,
        mut agent,
    } = one_node(&["--node-ttl-ms", "3000"], "vault", "2xL4-24GB");
    let s = urls[0].as_str();
    eventually(Duration::from_secs(20), "the agent registered", || {
        let nodes = cli_json(s, &["node", "ls"]);
        (nodes.as_array().unwrap().len() == 1).then_some(())
    });

    // The artifact as reviewed, and the same file one bit away from it.
    let good = b"weights: 0123456789abcdef\n".to_vec();
    let digest = blake3_hex(&good);
    let mut bad = good.clone();
    bad[3] ^= 0x01;
    let artifacts = root.path().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("good.bin"), &good).unwrap();
    std::fs::write(artifacts.join("bad.bin"), &bad).unwrap();
    // The intact artifact comes over HTTP, the tampered one from a file.
    let served = good.clone();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        let app = axum::Router::new().route(
            "/models/good.bin",
            axum::routing::get(move || {
                let body = served.clone();
                async move { body }
            }),
        );
        axum::serve(listener, app).await
    });
    let sources = [
        (
            "tampered",
            "bad.bin",
            format!("file://{}/bad.bin", artifacts.display()),
        ),
        (
            "intact",
            "good.bin",
            format!("http://127.0.0.1:{port}/models/good.bin"),
        ),
    ];
    let (key, value) = marker.split_once('=').unwrap();
    let job = |name: &str, file: &str, source: &str| {
        json!({
            "name": name, "kind": "batch",
            "groups": [{
                "name": "g", "count": 1,
                "resources": {"cpu_millis": 100, "memory_mib": 64},
                "task": {"driver": "exec", "command": "/bin/sh",
                         "args": ["-c", format!("cat {file}")],
                         "env": {key: value},
                         "artifacts": [{"source": source, "blake3": digest}]}
            }]
        })
    };
    for (name, file, source) in &sources {
        let path = root.path().join(format!("{name}.json"));
        std::fs::write(&path, job(name, file, source).to_string()).unwrap();
        assert_success(&cli(s, &["job", "submit", path.to_str().unwrap()]));
    }
    let failed = eventually(Duration::from_secs(20), "the tampered job failed", || {
        let job = cli_json(s, &["job", "status", "tampered"]);
        job["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["state"] == "failed")
            .cloned()
    });
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.starts_with("digest_mismatch"), "{reason}");
    let human = assert_success(&cli(s, &["job", "status", "tampered"]));
    assert!(human.contains("digest_mismatch"), "{human}");
    eventually(Duration::from_secs(20), "the intact job completed", || {
        let job = cli_json(s, &["job", "status", "intact"]);
        (job["status"] == "complete").then_some(())
    });
    // The verified bytes reached the process (it prints them; the sandbox lets it
    // write nowhere but its own directory); the tampered job never ran.
    let intact = cli_json(s, &["job", "status", "intact"]);
    let id = intact["allocations"][0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(30), "the intact job's output", || {
        let logs = stdout(&cli(s, &["alloc", "logs", &id]));
        logs.contains(std::str::from_utf8(&good).unwrap())
            .then_some(())
    });
    assert!(
        !stdout(&cli(s, &["alloc", "logs", failed["id"].as_str().unwrap()])).contains("weights"),
        "the tampered artifact ran"
    );

    // A simulated GPU fault reaches the servers with the next heartbeat, and its
    // end too.
    let faults = agent.data_dir.join("simulated-gpu-faults");
    let gpu_health = |index: usize| {
        let node = cli_json(s, &["node", "status", "vault"]);
        let gpu = node["resources"]["gpus"][index].clone();
        (
            gpu["healthy"].as_bool().unwrap(),
            gpu["health_reason"].clone(),
        )
    };
    std::fs::write(&faults, "1 XID 79\n").unwrap();
    eventually(Duration::from_secs(10), "GPU 1 unhealthy", || {
        (gpu_health(1) == (false, json!("XID 79"))).then_some(())
    });
    assert!(gpu_health(0).0);
    std::fs::remove_file(&faults).unwrap();
    eventually(Duration::from_secs(10), "GPU 1 healthy again", || {
        gpu_health(1).0.then_some(())
    });

    // Revoking the node's key: the agent is refused, stops its work and exits.
    let node = cli_json(s, &["node", "revoke", "vault"]);
    assert_eq!(node["revoked"], true, "{node}");
    assert_eq!(node["status"], "down", "{node}");
    let status = eventually(Duration::from_secs(20), "the agent exits", || {
        agent.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!status.success());
    assert!(agent.log_tail().contains("refused"), "{}", agent.log_tail());
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A circle's GPU work is metered while it runs: `aigrid usage` shows its GPU-hours
/// by model, job and node to the circle's members and admins, `/metrics` counts
/// them, and a stranger or another circle's member reads nothing.
#[test]
fn running_gpu_work_is_metered_for_its_circle_only() {
    let OneNode {
        cluster: _cluster,
        urls,
        rt,
        root,
        marker,
        reaper: _reaper,
        agent: _agent,
    } = one_node(&["--meter-every-ms", "200"], "gpu-node", "2xH100-80GB");
    let s = urls[0].as_str();

    let viewer = member_of(s, root.path(), "vera", "ml", "viewer");
    let outsider = member_of(s, root.path(), "otto", "web", "viewer");

    let resources = json!({"cpu_millis": 500, "memory_mib": 256, "gpus": {"count": 2}});
    let mut job = sleeper("train", &marker, resources, 600);
    job["circle"] = json!("ml");
    let file = job_file(root.path(), &job);
    assert_success(&cli(s, &["job", "submit", file.to_str().unwrap()]));
    eventually(Duration::from_secs(30), "the instance running", || {
        running(s, "train", 1)
    });
    let usage = eventually(Duration::from_secs(20), "two GPU-seconds metered", || {
        let u = cli_json(s, &["usage", "--circle", "ml", "--since", "1h"]);
        (u["total"]["gpu_seconds"].as_f64().unwrap() >= 2.0).then_some(u)
    });
    assert_eq!(usage["circle"], "ml");
    assert!(usage["by_gpu_model"][0]["key"]
        .as_str()
        .unwrap()
        .contains("H100"));
    assert_eq!(usage["by_node"][0]["key"], "gpu-node");
    // Two GPUs, half a core: the CPU-seconds are a quarter of the GPU-seconds.
    let (gpu, cpu) = (
        usage["total"]["gpu_seconds"].as_f64().unwrap(),
        usage["total"]["cpu_seconds"].as_f64().unwrap(),
    );
    assert!((cpu * 4.0 - gpu).abs() < 1e-6, "{usage}");
    let human = assert_success(&cli(s, &["usage", "--circle", "ml"]));
    assert!(
        human.contains("GPU-hours") && human.contains("train"),
        "{human}"
    );

    // The circle's viewer reads it; another circle's member and a stranger do not.
    let seen = as_person(&viewer, s, &["usage", "--circle", "ml", "--json"]);
    assert_eq!(json_output(&seen)["circle"], "ml");
    assert_one_line_failure(
        &as_person(&outsider, s, &["usage", "--circle", "ml"]),
        "(forbidden)",
    );
    assert_one_line_failure(&as_person(&outsider, s, &["usage"]), "(forbidden)");
    let stranger = root.path().join("stranger.json");
    common::identity::write_key_file(&stranger, "eve", &common::identity::stranger_key());
    assert_one_line_failure(
        &as_person(&stranger, s, &["usage", "--circle", "ml"]),
        "(unauthorized)",
    );
    assert_one_line_failure(&cli(s, &["usage", "--since", "forever"]), "not a duration");

    let text = metrics_text(&rt, s);
    let metered: f64 = text
        .lines()
        .find(|l| l.starts_with("aigrid_usage_gpu_seconds_total{circle=\"ml\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    assert!(metered >= 2.0, "/metrics: {text}");
}
