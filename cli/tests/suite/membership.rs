//! A fourth server joins a running cluster and catches up from a snapshot, then a
//! server leaves; a writer keeps submitting throughout, and its writes keep being
//! acknowledged through the join and after the leave.

use crate::common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Waits until `acked` holds at least `n` acknowledgements.
async fn wait_acked(acked: &Mutex<Vec<(String, Instant)>>, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "writes stopped {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_by_snapshot_then_leave_while_writing() {
    let snapshot_args = ["--snapshot-entries", "20", "--compact-keep", "5"];
    let mut cluster = Cluster::start(3, &snapshot_args);
    let urls = cluster.urls();
    let client = http();
    wait_leader(&client, &urls, Duration::from_secs(20)).await;

    // A writer that round-robins over whichever servers are members.
    let targets = Arc::new(Mutex::new(urls.clone()));
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (targets, acked, stop, client) =
            (targets.clone(), acked.clone(), stop.clone(), client.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let urls = targets.lock().unwrap().clone();
                let url = &urls[n % urls.len()];
                let resp = post_job(&client, url, &format!("w-{n}")).await;
                if let Ok(resp) = resp {
                    if resp.status().is_success() {
                        let v: serde_json::Value = resp.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push((v["id"].as_str().unwrap().into(), Instant::now()));
                        n += 1;
                        continue;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_acked(&acked, 60, "before the join").await;

    // Server 4 starts empty and asks server 1 to add it.
    let port = free_ports(1)[0];
    let join_args = vec!["--join".to_string(), urls[0].clone()];
    let mut s4 = ServerProc::new(4, port, cluster.root.path(), join_args);
    s4.start();
    let url4 = s4.url();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Server 4 joins as a learner and is promoted to voter once caught up.
        let status = get_json(&client, &format!("{}/api/v1/cluster", urls[0])).await;
        let voters = status
            .and_then(|s| s["members"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|m| m["role"] == "voter")
            .count();
        let applied4 = get_json(&client, &format!("{url4}/api/v1/cluster"))
            .await
            .and_then(|s| s["applied_index"].as_u64())
            .unwrap_or(0);
        if voters == 4 && applied4 > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server 4 did not join\n{}",
            s4.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    targets.lock().unwrap().push(url4.clone());
    let installed = metric(&client, &url4, "aigrid_raft_snapshots_installed_total")
        .await
        .unwrap_or(0.0);
    assert!(installed >= 1.0, "server 4 caught up without a snapshot");

    // Let writes land through the 4-server cluster, then remove server 2 with the CLI.
    let before_leave = acked.lock().unwrap().len();
    wait_acked(&acked, before_leave + 30, "in the 4-server cluster").await;
    targets.lock().unwrap().retain(|u| *u != urls[1]);
    let out = aigrid_cmd()
        .args(["cluster", "leave", "2", "--server", &urls[0]])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster leave failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after_leave = acked.lock().unwrap().len();
    wait_acked(&acked, after_leave + 30, "after the leave").await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    cluster.server(2).terminate();

    let acked = acked.lock().unwrap().clone();

    let remaining = vec![urls[0].clone(), urls[2].clone(), url4.clone()];
    wait_converged(&client, &remaining, Duration::from_secs(30)).await;
    let status = get_json(&client, &format!("{url4}/api/v1/cluster"))
        .await
        .unwrap();
    let ids: BTreeSet<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 3, 4]));
    let expected: BTreeSet<String> = acked.into_iter().map(|(id, _)| id).collect();
    for url in &remaining {
        let held: BTreeSet<String> = local_job_ids(&client, url)
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert!(expected.is_subset(&held), "{url} lacks acknowledged jobs");
    }
}
