//! Scale to zero and back with a real model server: `aigrid up`'s demo model,
//! given a `scaling` block with `aigrid job submit`, goes to zero once idle, and
//! the next request through the gateway is held while the leader's wake places a
//! replica, the agent starts `aigrid serve` and the model loads, then answered.
//! `aigrid job status` shows each change with its reason.

use crate::common;

use std::time::{Duration, Instant};

use common::openai::*;
use common::up::*;
use common::*;
use serde_json::{json, Value};

fn job(base: &str) -> Value {
    json_output(&aigrid(&[
        "job", "status", DEMO, "--server", base, "--json",
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_model_scales_to_zero_and_its_next_request_is_answered() {
    let root = tempfile::tempdir().unwrap();
    let (up, http, _) = serving_demo(root.path()).await;
    let base = up.base.clone();

    // The running job, resubmitted with a scaling block: the same instances, so
    // its replica keeps serving.
    let mut spec = job(&base)["spec"].clone();
    spec["groups"][0]["scaling"] = json!({"min": 0, "max": 2, "target_concurrency": 4,
                                          "scale_down_window": "2s", "idle_to_zero": "3s"});
    let file = root.path().join("scaled.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let submit = || {
        assert_success(&aigrid(&[
            "job",
            "submit",
            file.to_str().unwrap(),
            "--server",
            &base,
        ]))
    };
    submit();

    // Idle for 3 s: the count goes to 0 and the replica is stopped.
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&base)["spec"]["groups"][0]["count"] != 0 {
        assert!(Instant::now() < deadline, "{}", up.report(DEMO));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    up.wait_listed(&http, (DEMO, DEMO), false, Duration::from_secs(60))
        .await;
    let shown = assert_success(&aigrid(&["job", "status", DEMO, "--server", &base]));
    assert!(
        shown.contains("x0 (scales 0..2 at 4 requests in flight per replica)"),
        "{shown}"
    );
    assert!(shown.contains("server 1 -> 0"), "{shown}");
    assert!(shown.contains("no request for 3s"), "{shown}");

    // The next request is held, not refused, and answered once a replica loaded.
    let asked = Instant::now();
    let body = json!({"model": DEMO, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hello"}]});
    let (status, text) = post(&http, &format!("{base}/v1/chat/completions"), &body).await;
    let waited = asked.elapsed();
    assert_eq!(status, 200, "{text}\n{}", up.report(DEMO));
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    let events = job(&base)["scale_events"].clone();
    let woke = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["from"] == 0 && e["to"] == 1)
        .unwrap_or_else(|| panic!("no wake in {events}"));
    assert_eq!(
        woke["reason"],
        format!("a request for `{DEMO}` arrived while it had no replica")
    );
    eprintln!("from zero to an answer: {waited:?}");

    // The same file again is an unchanged resubmission: the count the leader
    // reached stays, and no version is made.
    let version = job(&base)["version"].clone();
    submit();
    let now = job(&base);
    assert_eq!(now["version"], version);
    assert_eq!(now["spec"]["groups"][0]["count"], 1, "{now}");

    up.remove_demo(&http).await;
    up.terminate();
}
