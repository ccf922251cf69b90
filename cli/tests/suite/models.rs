//! `aigrid model` against a real `aigrid up` and its embedded 4+2 store of six local
//! directories: push, list, show, pull, verify, repair, remove, and refusals that
//! leave nothing registered.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

fn model_cmd(server: &str, key: &Path, args: &[&str]) -> std::process::Output {
    aigrid_as_publisher(server, key, &[&["model"], args].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_pushed_through_up_lists_pulls_survives_a_lost_site_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let mut up = aigrid_cmd()
        .args(["up", "--no-demo-model", "--listen", &listen, "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = format!("http://{listen}");
    let mut banner = BufReader::new(up.stdout.take().unwrap());
    let mut lines = String::new();
    for _ in 0..6 {
        banner.read_line(&mut lines).unwrap();
    }
    assert!(
        lines.contains("store        6 backends, 4+2 (max 1 per site)"),
        "{lines}"
    );
    wait_leader(
        &http(),
        std::slice::from_ref(&server),
        Duration::from_secs(20),
    )
    .await;

    let key = dir.path().join("publisher.key");
    let model = dir.path().join("model");
    std::fs::create_dir_all(model.join("tokenizer")).unwrap();
    let weights: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(model.join("weights.bin"), &weights).unwrap();
    std::fs::write(model.join("config.json"), br#"{"hidden": 64}"#).unwrap();
    std::fs::write(model.join("tokenizer/tokenizer.json"), br#"{"model": {}}"#).unwrap();

    // Refusals first: nothing may be registered by them.
    let out = model_cmd(&server, &key, &["push", "/nonexistent/dir", "--name", "x"]);
    assert_one_line_failure(&out, "/nonexistent/dir");
    let out = model_cmd(
        &server,
        &key,
        &[
            "push",
            model.to_str().unwrap(),
            "--name",
            "x",
            "--k",
            "5",
            "--m",
            "2",
        ],
    );
    assert_one_line_failure(&out, "needs 7 distinct backends");
    let out = model_cmd(
        &server,
        &key,
        &[
            "push",
            model.to_str().unwrap(),
            "--name",
            "x",
            "--policy",
            "country in BE",
        ],
    );
    assert_one_line_failure(&out, "country in BE");
    let out = model_cmd(
        &server,
        &key,
        &[
            "push",
            model.to_str().unwrap(),
            "--name",
            "x",
            "--policy",
            "max 1 per",
        ],
    );
    assert_one_line_failure(&out, "invalid placement policy");
    assert!(!key.exists(), "a refused push created a publisher key");
    let out = model_cmd(&server, &key, &["ls", "--json"]);
    assert_eq!(json_output(&out), serde_json::json!([]));
    let shards = data.join("store");
    let files_under = |p: &Path| walk(p).len();
    assert_eq!(files_under(&shards), 0, "a refused push wrote shards");

    // Push, list, show.
    let out = model_cmd(
        &server,
        &key,
        &["push", model.to_str().unwrap(), "--name", "tiny", "--json"],
    );
    let pushed = json_output(&out);
    let digest = pushed["model"]["digest"].as_str().unwrap().to_owned();
    assert_eq!(pushed["model"]["size"], 5_000_000 + 14 + 13);
    assert_eq!(pushed["model"]["signature"], "ed25519");
    assert!(key.exists());
    let out = model_cmd(&server, &key, &["ls"]);
    let listing = assert_success(&out);
    assert!(
        listing.contains("tiny") && listing.contains(&digest[..16]),
        "{listing}"
    );
    let out = model_cmd(&server, &key, &["show", &digest[..10], "--json"]);
    let shown = json_output(&out);
    assert_eq!(shown["manifest"]["manifest"]["name"], "tiny");
    assert_eq!(
        shown["locations"]["stripes"][0].as_array().unwrap().len(),
        6
    );
    let out = model_cmd(&server, &key, &["show", &digest]);
    let text = assert_success(&out);
    assert!(
        text.contains("parity") && text.contains("shards/"),
        "{text}"
    );
    // Counted nouns: config.json is one chunk, the weights several.
    assert!(
        text.lines()
            .any(|l| l.contains("config.json") && l.ends_with(" 1 chunk")),
        "{text}"
    );
    assert!(!text.contains(" 1 chunks"), "{text}");

    // A second push of the same bytes uploads nothing.
    let out = model_cmd(
        &server,
        &key,
        &[
            "push",
            model.to_str().unwrap(),
            "--name",
            "tiny-again",
            "--hybrid",
            "--json",
        ],
    );
    let again = json_output(&out);
    assert_eq!(again["bytes_uploaded"], 0, "{again}");
    // Signed hybrid this time: `model show` says so, having checked both signatures.
    assert_eq!(again["model"]["signature"], "ed25519+ml-dsa-65", "{again}");
    let hybrid = again["model"]["digest"].as_str().unwrap();
    let text = assert_success(&model_cmd(&server, &key, &["show", hybrid]));
    assert!(
        text.contains("signature  ed25519+ml-dsa-65 (both verified)"),
        "{text}"
    );

    // Pull back, bit for bit.
    let dest = dir.path().join("pulled");
    let out = model_cmd(&server, &key, &["pull", &digest, dest.to_str().unwrap()]);
    assert_success(&out);
    assert!(std::fs::read(dest.join("weights.bin")).unwrap() == weights);
    assert_eq!(
        std::fs::read(dest.join("tokenizer/tokenizer.json")).unwrap(),
        br#"{"model": {}}"#
    );

    // Lose a site: verify fails, repair restores, verify passes.
    std::fs::remove_dir_all(shards.join("site-3/shards")).unwrap();
    let out = model_cmd(&server, &key, &["verify", &digest]);
    assert_one_line_failure(&out, "bad shard");
    assert!(stdout(&out).contains("site-3: missing"), "{}", stdout(&out));
    let out = model_cmd(&server, &key, &["repair", &digest]);
    assert!(assert_success(&out).contains("rebuilt"));
    // What the repair found and did is kept with the model, for the console and
    // the store's gauges.
    let listed = json_output(&model_cmd(&server, &key, &["ls", "--json"]));
    let repaired = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["digest"] == digest.as_str())
        .unwrap();
    let health = &repaired["health"];
    assert!(health["missing"].as_u64().unwrap() > 0, "{repaired}");
    assert_eq!(health["rebuilt"], health["missing"], "{repaired}");
    assert_eq!(health["lost_stripes"], 0, "{repaired}");
    let metrics = reqwest::get(format!("{server}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aigrid_store_shards{state=\"missing\"} "),
        "{metrics}"
    );
    let out = model_cmd(&server, &key, &["verify", &digest]);
    assert!(assert_success(&out).contains("every shard is intact"));

    // Remove both; the shards go with the last one.
    let out = model_cmd(&server, &key, &["rm", &digest]);
    assert!(
        assert_success(&out).contains("deleted 0 shards"),
        "the second model shares them"
    );
    let out = model_cmd(&server, &key, &["ls", "--json"]);
    let left = json_output(&out);
    let other = left[0]["digest"].as_str().unwrap().to_owned();
    let out = model_cmd(&server, &key, &["rm", &other]);
    assert_success(&out);
    assert_eq!(files_under(&shards), 0);
    let out = model_cmd(&server, &key, &["show", &other]);
    assert_one_line_failure(&out, "");

    // The demo model, pushed and deployed from the command line (as on a grid
    // without `up`); a second run finds it all there and changes nothing.
    let demo_dir = dir.path().join("demo");
    let demo = |args: &[&str]| {
        let mut all = vec!["model", "demo", "--dir", demo_dir.to_str().unwrap()];
        all.extend_from_slice(args);
        aigrid_at(&server, &all)
    };
    let first = json_output(&demo(&["--json"]));
    assert_eq!(first["model"], "tiny-llama", "{first}");
    assert_eq!(first["job_submitted"], true, "{first}");
    let again = assert_success(&demo(&[]));
    assert!(again.contains("exists already"), "{again}");
    assert!(again.contains(first["digest"].as_str().unwrap()), "{again}");
    let job = json_output(&aigrid_at(
        &server,
        &["job", "status", "tiny-llama", "--json"],
    ));
    assert_eq!(
        job["spec"]["groups"][0]["task"]["model"], first["digest"],
        "{job}"
    );

    up.kill().unwrap();
    let _ = up.wait();
}
