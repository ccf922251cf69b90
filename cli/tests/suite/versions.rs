//! Versioned jobs from the command line: every update is a new version, kept with
//! the ones before it; `job history` lists them, `job diff` shows what changed, and
//! `job revert` runs an earlier one again (its secrets as they were) as a new
//! version.

use crate::common;

use common::*;
use serde_json::json;

#[test]
fn updates_are_versions_that_can_be_listed_compared_and_reverted() {
    let (_cluster, s) = one_server();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| aigrid_at(&s, args);
    let submit = |count: u32, token: &str| {
        let file = dir.path().join(format!("web-{count}.json"));
        let spec = json!({
            "name": "web", "kind": "service",
            "groups": [{"name": "main", "count": count,
                        "resources": {"cpu_millis": 100, "memory_mib": 64},
                        "task": {"driver": "exec", "command": "/bin/sleep", "args": ["300"],
                                 "env": {"TOKEN": token}}}]
        });
        std::fs::write(&file, spec.to_string()).unwrap();
        json_output(&run(&[
            "job",
            "submit",
            file.to_str().unwrap(),
            "--wait-secs",
            "0",
            "--json",
        ]))
    };
    assert_eq!(submit(1, "first-secret")["version"], 1);
    assert_eq!(submit(3, "second-secret")["version"], 2);

    let history = json_output(&run(&["job", "history", "web", "--json"]));
    let versions: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2, 1]);
    assert_eq!(history[0]["current"], true);
    assert!(!history.to_string().contains("secret"), "{history}");

    let diff = assert_success(&run(&["job", "diff", "web", "1", "2"]));
    assert!(
        diff.contains("- groups[0].count: 1\n+ groups[0].count: 3"),
        "{diff}"
    );
    assert_one_line_failure(&run(&["job", "diff", "web", "1", "9"]), "not kept");

    // Version 1 again, as version 3: its count, and its secret as it was.
    let reverted = json_output(&run(&["job", "revert", "web", "1", "--json"]));
    assert_eq!(reverted["version"], 3, "{reverted}");
    let job = json_output(&run(&["job", "status", "web", "--json"]));
    assert_eq!(job["spec"]["groups"][0]["count"], 1);
    assert_eq!(job["version"], 3);
    let after = json_output(&run(&["job", "history", "web", "--json"]));
    assert_eq!(after.as_array().unwrap().len(), 3);
    // Version 3 is version 1 again, field for field; the secret is compared by the
    // servers (both are shown redacted).
    assert_eq!(after[0]["spec"], after[2]["spec"]);
    assert_one_line_failure(&run(&["job", "revert", "web", "3"]), "the one running");
    assert_one_line_failure(&run(&["job", "revert", "web", "7"]), "not_found");
    assert_one_line_failure(&run(&["job", "history", "nope"]), "not_found");
}
