//! The Human Chain end to end, from the command line, against a real server and a
//! real agent: three people's identities, a 2-of-3 circle, a job that waits for
//! its quorum (nothing runs on one approval, it runs on the second), the refusals
//! a member, an outsider and a replay get, and an audit export that verifies
//! offline until one byte of it changes.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_two_of_three_circle_runs_a_job_only_on_its_quorum_and_the_audit_log_verifies() {
    let (cluster, s) = one_server();
    let root = tempfile::tempdir().unwrap();
    let marker = format!("AIGRID_TEST_MARK=chain-{}", std::process::id());
    let _reaper = Reaper {
        root: root.path().display().to_string(),
        marker: marker.clone(),
    };
    let admin = |args: &[&str]| aigrid_at(&s, args);

    // An agent to run what the circle approves.
    let token = assert_success(&admin(&["node", "token", "create"]))
        .trim()
        .to_owned();
    let agent_dir = root.path().join("agent");
    let mut agent = std::process::Command::new(aigrid_bin())
        .args(["agent", "--servers", &s, "--join-token", &token])
        .args(["--node-id", "lab-node", "--heartbeat-interval-ms", "300"])
        .arg("--data-dir")
        .arg(&agent_dir)
        .stderr(std::fs::File::create(root.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();

    // Three people; the admin makes them a 2-of-3 circle.
    let (alice, alice_pub) = new_person(root.path(), "alice");
    let (bob, bob_pub) = new_person(root.path(), "bob");
    let (carol, carol_pub) = new_person(root.path(), "carol");
    let (mallory, mallory_pub) = new_person(root.path(), "mallory");
    let made = json_output(&admin(&[
        "circle",
        "create",
        "lab",
        "--member",
        &alice_pub,
        "--member",
        &bob_pub,
        "--member",
        &carol_pub,
        "--threshold",
        "2",
        "--json",
    ]));
    assert_eq!(made["version"], 1, "{made}");
    assert_eq!(made["policy"]["threshold"], 2, "{made}");
    // A fourth person the cluster knows, outside the circle.
    assert_success(&admin(&["identity", "add", "mallory", &mallory_pub]));
    // A threshold one member reaches alone is refused before anything is sent.
    let one_of_three = admin(&[
        "circle",
        "create",
        "loose",
        "--member",
        &alice_pub,
        "--member",
        &bob_pub,
        "--threshold",
        "1",
    ]);
    assert_one_line_failure(&one_of_three, "threshold");

    // Alice submits a job of the circle: a proposal, and nothing runs.
    let (mark_key, mark_value) = marker.split_once('=').unwrap();
    let job = json!({
        "name": "trainer", "kind": "service", "circle": "lab",
        "groups": [{
            "name": "main", "count": 1,
            "resources": {"cpu_millis": 100, "memory_mib": 64},
            "task": {"driver": "exec", "command": "/bin/sleep", "args": ["300"],
                     "env": {mark_key: mark_value}}
        }]
    });
    let job_file = root.path().join("trainer.json");
    std::fs::write(&job_file, job.to_string()).unwrap();
    let job_path = job_file.to_str().unwrap();
    let proposed = json_output(&as_person(
        &alice,
        &s,
        &["job", "submit", job_path, "--json"],
    ));
    assert_eq!(proposed["state"], "pending", "{proposed}");
    let id = proposed["proposal"].as_str().unwrap().to_owned();
    let not_yet = admin(&["job", "status", "trainer"]);
    assert!(!not_yet.status.success(), "the job exists before approval");

    // Every member sees it; the listing and the proposal agree.
    let listed = json_output(&as_person(&bob, &s, &["proposal", "ls", "--json"]));
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(mine["kind"], "job.create");
    assert_eq!(mine["circle"], "lab");
    let shown = json_output(&as_person(&bob, &s, &["proposal", "show", &id, "--json"]));
    assert_eq!(shown["digest"], proposed["digest"]);
    assert!(shown["approvals"].as_array().unwrap().is_empty());
    // The secret in the job is shown only as a commitment.
    let env = &shown["payload"]["spec"]["groups"][0]["task"]["env"][mark_key];
    assert!(
        env.as_str().unwrap().starts_with("<secret sha256:"),
        "{env}"
    );
    assert!(!shown.to_string().contains(mark_value));
    let text = assert_success(&as_person(&bob, &s, &["proposal", "show", &id]));
    assert!(
        text.contains(proposed["digest"].as_str().unwrap()),
        "{text}"
    );
    assert!(
        text.contains("+ groups[0].task.command: \"/bin/sleep\""),
        "{text}"
    );

    // Alice approves her own proposal: one of two, still pending, nothing runs.
    let one = assert_success(&as_person(&alice, &s, &["proposal", "approve", &id]));
    assert!(one.contains("pending"), "{one}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!admin(&["job", "status", "trainer"]).status.success());
    // Her approval sent again counts once: the same decision, still one of two.
    let again = json_output(&as_person(
        &alice,
        &s,
        &["proposal", "approve", &id, "--json"],
    ));
    assert_eq!(again["state"], "pending", "{again}");
    assert_eq!(again["approved_weight"], 1, "{again}");
    assert_eq!(again["decisions"].as_array().unwrap().len(), 1, "{again}");
    // A rejection after her approval is a second decision: refused.
    let turn = as_person(&alice, &s, &["proposal", "reject", &id]);
    assert_one_line_failure(&turn, "already_decided");
    // Someone outside the circle cannot even read it, and an unknown key is
    // nobody: neither can decide.
    let outsider = as_person(&mallory, &s, &["proposal", "approve", &id]);
    assert_one_line_failure(&outsider, "forbidden");
    let stranger_file = root.path().join("stranger.json");
    let stranger = as_person(&stranger_file, &s, &["key", "new"]);
    assert_success(&stranger);
    let unknown = as_person(&stranger_file, &s, &["proposal", "approve", &id]);
    assert_one_line_failure(&unknown, "unauthorized");
    // Nobody but a veto member may veto (there are none).
    let veto = as_person(&carol, &s, &["proposal", "veto", &id]);
    assert_one_line_failure(&veto, "not_a_vetoer");

    // Bob's approval completes the quorum: the job is made and runs.
    let two = json_output(&as_person(
        &bob,
        &s,
        &["proposal", "approve", &id, "--json"],
    ));
    assert_eq!(two["state"], "applied", "{two}");
    eventually(Duration::from_secs(30), "the approved job running", || {
        let status = json_output(&admin(&["job", "status", "trainer", "--json"]));
        status["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["state"] == "running")
            .then_some(())
    });
    // A decision after it applied is refused.
    let late = as_person(&carol, &s, &["proposal", "approve", &id]);
    assert_one_line_failure(&late, "proposal_closed");

    // The audit log: exported, verified offline (pinned to the cluster key), and
    // refused after a one-byte edit or under another key.
    let checkpoint = json_output(&admin(&["audit", "checkpoint", "--json"]));
    let cluster_key = checkpoint["cluster_key"].as_str().unwrap().to_owned();
    let export = root.path().join("audit.json");
    assert_success(&admin(&["audit", "export", export.to_str().unwrap()]));
    let verify = |file: &Path, key: &str| {
        aigrid(&[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--cluster-key",
            key,
        ])
    };
    let ok = assert_success(&verify(&export, &cluster_key));
    assert!(ok.starts_with("ok: "), "{ok}");
    let bytes = std::fs::read(&export).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    for event in ["proposal_applied", "decision", "proposed"] {
        assert!(
            text.contains(&format!("event\\\":\\\"{event}")),
            "the log lacks {event}"
        );
    }
    let edited = root.path().join("edited.json");
    let at = text.find("proposal_applied").unwrap() + 2;
    let mut changed = bytes.clone();
    changed[at] ^= 0x01;
    std::fs::write(&edited, &changed).unwrap();
    assert_one_line_failure(&verify(&edited, &cluster_key), "verification failed");
    assert_one_line_failure(&verify(&export, &alice_pub), "verification failed");
    // The older checkpoint is consistent with the later export: the log only grew.
    let older = root.path().join("older.note");
    std::fs::write(&older, checkpoint["note"].as_str().unwrap()).unwrap();
    let grown = aigrid(&[
        "audit",
        "verify",
        export.to_str().unwrap(),
        "--cluster-key",
        &cluster_key,
        "--older",
        older.to_str().unwrap(),
    ]);
    assert!(assert_success(&grown).contains("only grew"));

    let _ = agent.kill();
    let _ = agent.wait();
    drop(cluster);
}
