//! Nodes' private data ports over TLS, end to end: two agents are issued their
//! data port certificates with their registrations, a fleet rollout spreads a
//! model from the first to the second over mutual TLS, and a stranger (plain
//! HTTP, no certificate, another CA's certificate) is kept out of the peer routes.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// An agent on `server` with a TLS data port on loopback, in `root/<node>`.
fn agent(root: &Path, server: &str, token: &str, node: &str) -> Child {
    let dir = root.join(node);
    let args: Vec<std::ffi::OsString> = [
        "agent",
        "--servers",
        server,
        "--join-token",
        token,
        "--node-id",
        node,
        "--data-dir",
        dir.to_str().unwrap(),
        "--shard-listen",
        "127.0.0.1:0",
        "--data-tls",
        "--attr",
        "site=edge-7",
        "--heartbeat-interval-ms",
        "300",
        "--poll-wait-ms",
        "2000",
    ]
    .iter()
    .map(Into::into)
    .collect();
    spawn_logged(&args, &root.join(format!("{node}.log")))
}

/// The node's record once it registered with a TLS data port.
async fn registered(client: &reqwest::Client, server: &str, node: &str, root: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(n) = get_json(client, &format!("{server}/api/v1/nodes/{node}")).await {
            if n["data_tls"] == true && n["data_port"].as_u64().is_some() {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{node} never registered a TLS data port:\n{}",
            tail(&root.join(format!("{node}.log")), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client presenting `identity`'s certificate to data ports.
fn member_client(identity: &aigrid_tls::NodeIdentity) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(identity.data_client_config().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_spreads_between_nodes_over_tls_and_strangers_stay_out() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let data = root.join("up");
    let mut up = aigrid_cmd()
        .args(["up", "--no-demo-model", "--listen", &listen, "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(root.join("up.log")).unwrap())
        .spawn()
        .unwrap();
    let server = format!("http://{listen}");
    let mut banner = BufReader::new(up.stdout.take().unwrap());
    let mut lines = String::new();
    for _ in 0..6 {
        banner.read_line(&mut lines).unwrap();
    }
    let client = http();
    wait_leader(
        &client,
        std::slice::from_ref(&server),
        Duration::from_secs(20),
    )
    .await;
    let ca_dir = walk(&data)
        .into_iter()
        .find(|p| p.ends_with("ca/ca.key"))
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .expect("the one-server cluster made its CA");

    // A model of several chunks.
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let weights: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(model.join("weights.bin"), &weights).unwrap();
    std::fs::write(model.join("config.json"), br#"{"hidden": 64}"#).unwrap();
    let key = root.join("publisher.key");
    let pushed = json_output(&aigrid_as_publisher(
        &server,
        &key,
        &[
            "model",
            "push",
            model.to_str().unwrap(),
            "--name",
            "cam",
            "--json",
        ],
    ));
    let digest = pushed["model"]["digest"].as_str().unwrap().to_owned();

    let token = assert_success(&aigrid_at(
        &server,
        &["node", "token", "create", "--max-uses", "2"],
    ))
    .trim()
    .to_owned();
    let mut a = agent(root, &server, &token, "edge-a");
    let node_a = registered(&client, &server, "edge-a", root).await;
    let mut b = agent(root, &server, &token, "edge-b");
    registered(&client, &server, "edge-b", root).await;
    let data_port = node_a["data_port"].as_u64().unwrap();
    let https = format!("https://127.0.0.1:{data_port}");
    // The node's certificate was issued with its registration; its key stayed on
    // the node (nothing of it is in the registration or the log).
    assert!(!node_a.to_string().contains("PRIVATE KEY"), "{node_a}");

    // Strangers. Plain HTTP gets no answer.
    let plain = format!("http://127.0.0.1:{data_port}/health");
    assert!(client.get(&plain).send().await.is_err());
    // A client that trusts the CA but has no certificate reads shards as a store
    // client, but gets 403 on the peer routes, and nothing is read.
    let anonymous = https_client(&ca_dir);
    let health = anonymous
        .get(format!("{https}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let asked = anonymous
        .post(format!("{https}/.peer/have"))
        .body(vec![0u8; 32])
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), 403);
    let body: Value = asked.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    let chunk = anonymous
        .get(format!("{https}/.peer/chunks/{}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(chunk.status(), 403);
    // A certificate from another CA fails the handshake.
    let other = aigrid_tls::ClusterCa::create().unwrap();
    let forged = other.issue_node_identity("edge-b", &[]).unwrap();
    assert!(member_client(&forged)
        .post(format!("{https}/.peer/have"))
        .body(vec![0u8; 32])
        .send()
        .await
        .is_err());
    // A member's certificate from the cluster CA is answered.
    let ca = aigrid_tls::ClusterCa::load(&ca_dir).unwrap();
    let member = ca.issue_node_identity("edge-c", &[]).unwrap();
    let answered = member_client(&member)
        .post(format!("{https}/.peer/have"))
        .body(vec![0u8; 32])
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    assert_eq!(answered.bytes().await.unwrap().as_ref(), &[0u8]);

    // The rollout: the first wave stages from the store, the second from the
    // first over mutual TLS.
    let created = aigrid_at(
        &server,
        &[
            "rollout",
            "create",
            "--model",
            &digest,
            "--select",
            "site=edge-7",
            "--waves",
            "1,all",
            "--node-timeout",
            "2m",
            "--wait",
            "--json",
        ],
    );
    let out = String::from_utf8_lossy(&created.stdout).into_owned();
    let logs = || {
        format!(
            "--- a ---\n{}\n--- b ---\n{}",
            tail(&root.join("edge-a.log"), 30),
            tail(&root.join("edge-b.log"), 30)
        )
    };
    assert!(created.status.success(), "{out}\n{}", logs());
    let last: Value = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!(last["state"], "succeeded", "{out}\n{}", logs());
    let from_peers = |log: &str| -> u64 {
        std::fs::read_to_string(root.join(log))
            .unwrap()
            .lines()
            .filter(|l| l.contains("model staged and active"))
            .filter_map(|l| l.split("from_peers=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let peered = from_peers("edge-a.log") + from_peers("edge-b.log");
    assert!(
        peered >= 6_000_000,
        "the second wave fetched {peered} bytes from its peer\n{}",
        logs()
    );

    for child in [&mut a, &mut b, &mut up] {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    for child in [&mut a, &mut b, &mut up] {
        let _ = child.wait();
    }
}
