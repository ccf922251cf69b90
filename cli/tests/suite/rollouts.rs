//! Steering a rollout from the CLI against a real 3-server cluster: a pause is
//! replicated state, so it holds through a SIGKILL of the leader; strangers and
//! unsigned requests steer nothing.

use crate::common;

use std::time::Duration;

use common::identity::{stranger_key, write_key_file};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_rollout_stays_paused_across_a_leader_change() {
    let mut cluster = Cluster::start(3, &[]);
    let urls = cluster.urls();
    let client = http();
    let leader = wait_leader(&client, &urls, Duration::from_secs(20)).await;
    let at = |id: u64| urls[usize::try_from(id).unwrap() - 1].clone();
    let lead = at(leader);

    // Version 1, then version 2 under an update policy: a rollout starts.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.json");
    let mut spec = job("web");
    std::fs::write(&file, spec.to_string()).unwrap();
    let submit = ["job", "submit", file.to_str().unwrap(), "--wait-secs", "0"];
    assert_success(&aigrid_at(&lead, &submit));
    spec["groups"][0]["task"]["args"] = json!(["serve.py", "--v2"]);
    spec["groups"][0]["update"] = json!({"max_parallel": 1, "min_healthy_time": "1s",
        "healthy_deadline": "1m", "progress_deadline": "10m"});
    std::fs::write(&file, spec.to_string()).unwrap();
    assert_success(&aigrid_at(&lead, &submit));
    let status =
        |url: &str| json_output(&aigrid_at(url, &["deployment", "status", "web", "--json"]));
    let running = status(&lead);
    assert_eq!(
        (running["version"].as_u64(), running["state"].as_str()),
        (Some(2), Some("running"))
    );

    // A stranger is refused in one line, and so is a known identity that is not
    // an operator of the job's circle; an unsigned request is 401; none of them
    // changes anything.
    let stranger = dir.path().join("stranger.json");
    write_key_file(&stranger, "stranger", &stranger_key());
    let as_stranger = || {
        aigrid_cmd()
            .args(["deployment", "pause", "web", "--server", &lead])
            .env("AIGRID_IDENTITY", &stranger)
            .output()
            .unwrap()
    };
    assert_one_line_failure(&as_stranger(), "not known to this cluster");
    let public = stranger_key().public().to_string();
    assert_success(&aigrid_at(&lead, &["identity", "add", "someone", &public]));
    assert_one_line_failure(&as_stranger(), "forbidden");
    let unsigned = client
        .post(format!("{lead}/api/v1/jobs/web/deployment/pause"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert_eq!(status(&lead)["state"], "running");
    // A word that is no action is refused.
    let unknown = aigrid_at(&lead, &["deployment", "status", "no-such-job"]);
    assert_one_line_failure(&unknown, "no-such-job");

    let paused = json_output(&aigrid_at(&lead, &["deployment", "pause", "web", "--json"]));
    assert_eq!(paused["state"], "paused", "{paused}");
    let shown = assert_success(&aigrid_at(&lead, &["deployment", "status", "web"]));
    assert!(shown.contains("paused"), "{shown}");

    cluster.server(leader).kill();
    let survivors: Vec<String> = cluster
        .servers
        .iter()
        .filter(|s| s.id != leader)
        .map(|s| s.url())
        .collect();
    let new_leader =
        wait_leader_other_than(&client, &survivors, Duration::from_secs(20), Some(leader)).await;
    let new_lead = at(new_leader);
    for url in &survivors {
        assert_eq!(status(url)["state"], "paused", "{url}\n{}", cluster.logs());
    }
    // Resumed through the new leader, for the version it rolls out; a stale
    // version is refused.
    let stale = aigrid_at(
        &new_lead,
        &["deployment", "resume", "web", "--rollout-version", "1"],
    );
    assert_one_line_failure(&stale, "not the one rolling out");
    let resumed = json_output(&aigrid_at(
        &new_lead,
        &["deployment", "resume", "web", "--json"],
    ));
    assert_eq!(resumed["state"], "running", "{resumed}");
    cluster.server(leader).start();
}
