//! `aigrid up` as a new user meets it: simulated GPUs with node attributes so the
//! example job places, `job submit` saying where a job went, logs by job and by
//! allocation prefix, the demo model's ready and stopped lines, plain text when
//! output is not a terminal, SIGTERM taking every workload and model server `up`
//! started down with it, and a second `up` on the same data bringing them back.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Lines `up` writes on stdout, read on a thread so the test can wait for one.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(child: &mut Child) -> Lines {
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `what`, within `limit`.
    fn wait_for(&mut self, what: &str, limit: Duration, log: &Path) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(what)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with `{what}` on up's stdout within {limit:?}:\n{}\n--- up.log ---\n{}",
                    self.seen.join("\n"),
                    tail(log, 30)
                ),
            }
        }
    }
}

fn write_job(dir: &Path, name: &str, spec: &Value) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Every allocation id of job `name`.
fn alloc_ids(server: &str, name: &str) -> Vec<String> {
    let out = aigrid(&["job", "status", name, "--server", server, "--json"]);
    let job = json_output(&out);
    job["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends `up` SIGTERM and waits until it has exited cleanly.
fn terminate(up: &mut Child, log: &Path) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(up.id().to_string())
        .status();
    let status = eventually(Duration::from_secs(120), "up to exit", || {
        up.try_wait().unwrap()
    });
    assert!(status.success(), "up exit {status}: {}", tail(log, 30));
}

#[test]
fn up_places_reports_logs_and_takes_its_workloads_down_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let server = format!("http://{listen}");
    let log = root.path().join("up.log");
    let marker = format!("AIGRID_TEST_UP_OWNS_{port}");
    // Whatever the test leaves running goes with it: supervisors (under its data
    // dir), workloads (carrying the marker) and model servers (told this up's URL).
    let reapers = up_reapers(root.path(), &server, &marker);
    let data = root.path().join("data");
    let up_args = [
        "up",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().unwrap(),
        "--simulate-gpus",
        "2xH100-80GB",
        "--attr",
        "country=BE",
        "--attr",
        "site=ghent",
    ];
    let mut up = spawn_piped(&up_args, &log);
    let mut lines = Lines::of(&mut up);
    lines.wait_for("Press Ctrl-C", Duration::from_secs(60), &log);

    // The README's example job places on the simulated H100s in country BE (its
    // CPU and memory cut to what any test machine has).
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/job.json");
    let mut example: Value =
        serde_json::from_str(&std::fs::read_to_string(examples).unwrap()).unwrap();
    example["groups"][0]["resources"]["cpu_millis"] = json!(100);
    example["groups"][0]["resources"]["memory_mib"] = json!(64);
    let example = write_job(root.path(), "example", &example);
    let out = aigrid(&["job", "submit", &example, "--server", &server]);
    let said = assert_success(&out);
    assert!(said.contains("job llama-chat created"), "{said}");
    assert!(said.contains("placed 2 of 2 instances on "), "{said}");
    // An identical resubmit changes nothing and says so.
    let out = aigrid(&["job", "submit", &example, "--server", &server]);
    let said = assert_success(&out);
    assert!(said.contains("job llama-chat unchanged"), "{said}");
    // What does not fit says why.
    let mut huge: Value =
        serde_json::from_str(&std::fs::read_to_string(examples).unwrap()).unwrap();
    huge["name"] = json!("too-big");
    huge["groups"][0]["resources"]["gpus"]["count"] = json!(3);
    let huge = write_job(root.path(), "huge", &huge);
    let said = assert_success(&aigrid(&["job", "submit", &huge, "--server", &server]));
    assert!(
        said.contains("not placed: 2 instances of group replica: "),
        "{said}"
    );

    // A workload that talks, carrying the marker.
    let talker = json!({
        "name": "talker",
        "kind": "service",
        "groups": [{
            "name": "main",
            "count": 1,
            "resources": {"cpu_millis": 100, "memory_mib": 64},
            "task": {"driver": "exec", "command": "/bin/sh",
                     "args": ["-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"],
                     "env": {marker.clone(): "1"}},
        }],
    });
    let talker = write_job(root.path(), "talker", &talker);
    let said = assert_success(&aigrid(&["job", "submit", &talker, "--server", &server]));
    assert!(said.contains("placed 1 of 1 instance on "), "{said}");
    let workloads = || {
        reapers[0]
            .matching()
            .into_iter()
            .filter(|p| *p != up.id() as i32)
    };
    eventually(Duration::from_secs(30), "the talker's process", || {
        (workloads().count() > 0).then_some(())
    });

    // Its output by job, and by allocation prefix.
    let job_logs = eventually(
        Duration::from_secs(60),
        "the talker's shipped output",
        || {
            let out = aigrid(&["job", "logs", "talker", "--server", &server]);
            let text = stdout(&out);
            text.contains("tick 1").then_some(text)
        },
    );
    assert!(job_logs.starts_with("==> "), "{job_logs}");
    let talker_alloc = alloc_ids(&server, "talker").remove(0);
    let out = aigrid(&["alloc", "logs", &talker_alloc[..8], "--server", &server]);
    assert!(assert_success(&out).contains("tick 0"), "{}", stderr(&out));
    // Followed: later output arrives without asking again.
    let mut follow = aigrid_cmd()
        .args(["job", "logs", "talker", "-f", "--server", &server])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut followed = Lines::of(&mut follow);
    let first = followed.wait_for("tick", Duration::from_secs(30), &log);
    let n = |line: &str| line.trim_start_matches("tick ").parse::<u64>().unwrap_or(0);
    let last_seen = n(&first);
    eventually(Duration::from_secs(60), "followed output to grow", || {
        while let Ok(line) = followed.rx.try_recv() {
            followed.seen.push(line);
        }
        followed
            .seen
            .iter()
            .filter(|l| l.starts_with("tick "))
            .any(|l| n(l) > last_seen + 5)
            .then_some(())
    });
    let _ = follow.kill();
    let _ = follow.wait();

    // Seventeen allocations: two of them share a first character, so one
    // character is an ambiguous prefix, answered in one line naming the candidates.
    let many = json!({
        "name": "many",
        "kind": "batch",
        "groups": [{
            "name": "g",
            "count": 17,
            "resources": {"cpu_millis": 10, "memory_mib": 16},
            "task": {"driver": "exec", "command": "/bin/true"},
        }],
    });
    let many = write_job(root.path(), "many", &many);
    assert_success(&aigrid(&["job", "submit", &many, "--server", &server]));
    let ids = alloc_ids(&server, "many");
    assert_eq!(ids.len(), 17, "{ids:?}");
    let shared = ids
        .iter()
        .find(|a| ids.iter().filter(|b| b[..1] == a[..1]).count() > 1)
        .unwrap();
    let out = aigrid(&["alloc", "logs", &shared[..1], "--server", &server]);
    assert_one_line_failure(
        &out,
        &format!("allocation prefix `{}` matches", &shared[..1]),
    );
    assert!(stderr(&out).contains(shared.as_str()), "{}", stderr(&out));

    // The demo model says when it is ready, and its server runs.
    lines.wait_for(
        "demo model tiny-llama is ready",
        Duration::from_secs(240),
        &log,
    );
    let model_servers = || {
        reapers[1]
            .matching()
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains("serve\0")
            })
            .count()
    };
    assert!(model_servers() > 0, "no model server process");

    // Plain text where output is not a terminal: no colour codes in logs.
    let up_log = std::fs::read_to_string(&log).unwrap();
    assert!(!up_log.contains('\u{1b}'), "colour codes in up's log");
    let demo_alloc = alloc_ids(&server, "tiny-llama").remove(0);
    let out = aigrid(&[
        "alloc",
        "logs",
        &demo_alloc,
        "--stderr",
        "--server",
        &server,
    ]);
    let demo_log = assert_success(&out);
    assert!(
        !demo_log.contains('\u{1b}'),
        "colour codes in the model server's log"
    );

    // SIGTERM: up stops its workloads and model servers, says the demo stopped,
    // and exits cleanly.
    terminate(&mut up, &log);
    lines.wait_for(
        "demo model tiny-llama stopped",
        Duration::from_secs(5),
        &log,
    );
    let all_gone = || {
        eventually(Duration::from_secs(30), "every child process gone", || {
            let left: Vec<i32> = reapers.iter().flat_map(Reaper::matching).collect();
            left.is_empty().then_some(())
        })
    };
    all_gone();

    // Started again on the same data: what the first run stopped at its end is
    // not taken for finished. The same allocations run again (none replaced),
    // and the demo model answers.
    let log = root.path().join("up-again.log");
    let mut again = spawn_piped(&up_args, &log);
    let mut lines = Lines::of(&mut again);
    lines.wait_for(
        "demo model tiny-llama is ready",
        Duration::from_secs(240),
        &log,
    );
    assert_eq!(alloc_ids(&server, "tiny-llama"), [demo_alloc]);
    eventually(
        Duration::from_secs(30),
        "the talker's process again",
        || {
            let pids = reapers[0].matching();
            pids.iter().any(|p| *p != again.id() as i32).then_some(())
        },
    );
    assert_eq!(alloc_ids(&server, "talker"), [talker_alloc]);
    terminate(&mut again, &log);
    all_gone();
}
