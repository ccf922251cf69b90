//! The CLI as a user runs it: `aigrid up`, then job and cluster commands against it.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_then_job_lifecycle_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let mut up = aigrid_cmd()
        .args(["up", "--no-demo-model", "--listen", &listen, "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = format!("http://{listen}");
    let mut first = String::new();
    let mut banner = BufReader::new(up.stdout.take().unwrap());
    banner.read_line(&mut first).unwrap();
    assert!(first.contains("aigrid is up"), "{first}");
    wait_leader(
        &http(),
        std::slice::from_ref(&server),
        Duration::from_secs(20),
    )
    .await;

    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/job.json");
    let out = aigrid(&["job", "submit", examples, "--server", &server]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("created"), "{}", stdout(&out));

    let out = aigrid(&["job", "ls", "--json", "--server", &server]);
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = jobs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(jobs[0]["name"], "llama-chat");

    let out = aigrid(&["job", "ls", "--server", &server]);
    assert!(stdout(&out).contains("llama-chat"));
    let out = aigrid(&["job", "status", &id, "--server", &server]);
    assert!(
        stdout(&out).contains("status      pending"),
        "{}",
        stdout(&out)
    );

    // Resubmitting the same name updates nothing when the spec is unchanged.
    let out = aigrid(&["job", "submit", examples, "--server", &server, "--json"]);
    let resp: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resp["created"], false);
    assert_eq!(resp["version"], 1);

    // TOML files submit the same shape.
    let toml_path = dir.path().join("batch.toml");
    std::fs::write(
        &toml_path,
        "name = \"nightly\"\nkind = \"batch\"\n[[groups]]\nname = \"g\"\n[groups.resources]\ncpu_millis = 500\nmemory_mib = 256\n[groups.task]\ndriver = \"exec\"\ncommand = \"/bin/true\"\n",
    )
    .unwrap();
    let out = aigrid(&[
        "job",
        "submit",
        toml_path.to_str().unwrap(),
        "--server",
        &server,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = aigrid(&["cluster", "status", "--json", "--server", &server]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["leader"], 1);

    let out = aigrid(&["job", "rm", &id, "--server", &server]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_one_line_failure(
        &aigrid(&["job", "status", &id, "--server", &server]),
        "not found",
    );
    assert_one_line_failure(
        &aigrid(&["job", "rm", &id, "--server", &server]),
        "not found",
    );

    // Client-side failures: one line, non-zero exit.
    assert_one_line_failure(
        &aigrid(&["job", "submit", "/no/such/file.json", "--server", &server]),
        "/no/such/file.json",
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"name": "x", "kind": "batch", "groups": [{"name": "g", "count": 0, "resources": {"cpu_millis": 1, "memory_mib": 1}, "task": {"driver": "exec", "command": "a"}}]}"#).unwrap();
    assert_one_line_failure(
        &aigrid(&["job", "submit", bad.to_str().unwrap(), "--server", &server]),
        "groups[0].count",
    );
    assert_one_line_failure(
        &aigrid(&["job", "ls", "--server", "http://127.0.0.1:1"]),
        "cannot reach",
    );
    // A list of servers skips the unreachable one.
    let out = aigrid(&[
        "job",
        "ls",
        "--server",
        &format!("http://127.0.0.1:1,{server}"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_one_line_failure(
        &aigrid(&["server", "--data-dir", "/tmp/x"]),
        "--id is required",
    );
    assert_one_line_failure(
        &aigrid(&[
            "server",
            "--id",
            "1",
            "--data-dir",
            "/tmp/x",
            "--peers",
            "2=127.0.0.1:5",
        ]),
        "own id",
    );

    drop(banner);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up.id().to_string())
        .status();
    let status = up.wait().unwrap();
    assert!(status.success(), "aigrid up did not stop cleanly: {status}");
}

#[test]
fn output_to_a_closed_pipe_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    assert_success(&aigrid(&[
        "--identity",
        key.to_str().unwrap(),
        "key",
        "new",
        "--name",
        "p",
    ]));
    // The reading end is gone before the command writes a byte.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = aigrid_cmd()
        .args(["--identity", key.to_str().unwrap(), "key", "show", "--json"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "no panic report: {}", stderr(&out));
}
