//! Quotas end to end: a real server and an agent with four simulated H100s. An
//! admin sets circles' quotas; a circle borrows idle GPUs beyond its quota and
//! gives them back when the owner of that capacity needs it; `aigrid circle
//! usage` shows quota, use, borrowing and share; others are refused.

use crate::common;

use std::time::Duration;

use common::agents::*;
use common::*;
use serde_json::json;

#[test]
fn a_circle_borrows_idle_gpus_and_gives_them_back_to_their_owner() {
    let OneNode {
        cluster: _cluster,
        urls,
        rt: _rt,
        root,
        marker,
        reaper: _reaper,
        agent: _agent,
    } = one_node(&[], "pool-node", "4xH100-80GB");
    let s = urls[0].as_str();
    eventually(Duration::from_secs(20), "the node registered", || {
        let nodes = cli_json(s, &["node", "ls"]);
        (nodes.as_array().unwrap().len() == 1).then_some(())
    });
    let set = cli_json(s, &["circle", "quota", "vision", "--gpus", "H100=1"]);
    assert_eq!(set["quota"]["gpus"]["H100"], 1, "{set}");
    assert_success(&cli(s, &["circle", "quota", "speech", "--gpus", "H100=3"]));
    // Refused before anything is sent, and by the server for non-admins.
    assert_one_line_failure(
        &cli(s, &["circle", "quota", "vision", "--gpus", "H100"]),
        "MODEL=COUNT",
    );
    assert_one_line_failure(&cli(s, &["circle", "quota", "vision"]), "--clear");
    let viewer = member_of(s, root.path(), "vera", "vision", "viewer");
    assert_one_line_failure(
        &as_person(
            &viewer,
            s,
            &["circle", "quota", "vision", "--gpus", "H100=4"],
        ),
        "(forbidden)",
    );
    assert_one_line_failure(
        &as_person(&viewer, s, &["circle", "usage", "speech"]),
        "(forbidden)",
    );
    let stranger = root.path().join("stranger.json");
    common::identity::write_key_file(&stranger, "eve", &common::identity::stranger_key());
    assert_one_line_failure(
        &as_person(&stranger, s, &["circle", "usage", "vision"]),
        "(unauthorized)",
    );

    // Speech is idle: vision's three instances run, two on borrowed GPUs.
    let resources = json!({"cpu_millis": 100, "memory_mib": 64, "gpus": {"count": 1}});
    let mut job = sleeper("detect", &marker, resources.clone(), 600);
    job["circle"] = json!("vision");
    job["groups"][0]["count"] = json!(3);
    assert_success(&cli(
        s,
        &[
            "job",
            "submit",
            job_file(root.path(), &job).to_str().unwrap(),
        ],
    ));
    eventually(
        Duration::from_secs(30),
        "vision's instances running",
        || running(s, "detect", 3),
    );
    let usage = json_output(&as_person(
        &viewer,
        s,
        &["circle", "usage", "vision", "--json"],
    ));
    assert_eq!(usage["used"]["gpus"]["H100"], 3.0, "{usage}");
    assert_eq!(usage["borrowed"]["gpus"]["H100"], 2.0, "{usage}");
    let human = assert_success(&as_person(&viewer, s, &["circle", "usage", "vision"]));
    assert!(
        human.contains("BORROWED") && human.contains("GPUs H100"),
        "{human}"
    );

    // Speech wants its three: one GPU was idle, two come back from vision.
    let mut wanted = sleeper("transcribe", &marker, resources, 600);
    wanted["circle"] = json!("speech");
    wanted["groups"][0]["count"] = json!(3);
    assert_success(&cli(
        s,
        &[
            "job",
            "submit",
            job_file(root.path(), &wanted).to_str().unwrap(),
        ],
    ));
    eventually(
        Duration::from_secs(30),
        "speech's instances running",
        || running(s, "transcribe", 3),
    );
    eventually(Duration::from_secs(30), "vision back to its quota", || {
        let usage = cli_json(s, &["circle", "usage", "vision"]);
        (usage["used"]["gpus"]["H100"] == 1.0 && usage["pending"] == 2).then_some(())
    });
    let status = cli_json(s, &["job", "status", "detect"]);
    let reason = status["unplaced"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("beyond its quota"), "{status}");

    let cleared = cli_json(s, &["circle", "quota", "vision", "--clear"]);
    assert!(cleared.get("quota").is_none(), "{cleared}");
}
