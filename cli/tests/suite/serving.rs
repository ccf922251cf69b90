//! Serving end to end: `aigrid serve` on a model directory and on a pushed model read
//! from the dispersed store, and `aigrid up`'s demo model behind the `/v1` gateway,
//! called with reqwest and with the PyPI `openai` client.
//!
//! The models are tiny real Llamas with random weights written by
//! `aigrid_serving::tiny`: their words are gibberish, their shapes are OpenAI's.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::openai::*;
use common::up::*;
use common::*;
use serde_json::{json, Value};

/// A running `aigrid serve`.
struct ServeProc {
    proc: Proc,
    /// `http://HOST:PORT`, from the line it printed.
    base: String,
}

impl ServeProc {
    /// Starts `aigrid serve ARGS --listen 127.0.0.1:0` and reads where it serves.
    fn start(args: &[&str], log: PathBuf) -> ServeProc {
        let all = [
            &["serve"],
            args,
            &["--listen", "127.0.0.1:0", "--device", "cpu"],
        ]
        .concat();
        let mut child = spawn_piped(&all, &log);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "no `serving ... on http://...` line: {line:?}\n{}",
                    tail(&log, 20)
                )
            })
            .to_owned();
        assert!(line.starts_with("serving "), "{line}");
        assert!(line.trim_end().ends_with("(device cpu)"), "{line}");
        ServeProc {
            proc: Proc { child, log },
            base,
        }
    }

    async fn wait_ready(&self, http: &reqwest::Client) {
        poll(
            http,
            &format!("{}/ready", self.base),
            Duration::from_secs(120),
            "a ready model server",
            |status, _| (status == 200).then_some(()),
            || self.proc.log_tail(),
        )
        .await;
    }

    fn terminate(self) {
        self.proc.terminate(Duration::from_secs(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "tiny");
    let http = client();

    // Bad input first: one line, non-zero exit.
    let missing = dir.path().join("no-such-model");
    let out = aigrid(&["serve", "--model", missing.to_str().unwrap()]);
    assert_one_line_failure(&out, "no such directory");
    let file = model.join("config.json");
    let out = aigrid(&["serve", "--model", file.to_str().unwrap()]);
    assert_one_line_failure(&out, "not a directory");
    let serve_with = |flag: &str, value: &str| {
        aigrid(&["serve", "--model", model.to_str().unwrap(), flag, value])
    };
    let out = serve_with("--max-body-bytes", "0");
    assert_one_line_failure(&out, "--max-body-bytes");
    let out = serve_with("--matmul-precision", "fp8");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fp8") && err.contains("f32 or bf16"), "{err}");
    if !aigrid_serving::kernels::cpu::amx::available() {
        let out = aigrid(&[
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--matmul-precision",
            "bf16",
        ]);
        assert_one_line_failure(&out, "AMX");
    }
    // A GPU this build or machine does not have: a one-line error before anything
    // listens (nothing printed as served).
    if aigrid_serving::DeviceSpec::Cuda(0).open().is_err() {
        let out = serve_with("--device", "cuda:0");
        assert_one_line_failure(&out, "cuda:0");
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    }

    let server = ServeProc::start(
        &["--model", model.to_str().unwrap()],
        dir.path().join("serve.log"),
    );
    // Alive at once, ready once loaded and warmed.
    let health = http
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
    server.wait_ready(&http).await;
    // Named after its directory.
    assert_eq!(model_ids(&http, &server.base).await.unwrap(), ["tiny"]);
    exercise(&http, &server.base, "tiny").await;
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_a_pushed_model_from_the_store() {
    let root = tempfile::tempdir().unwrap();
    let up = UpProc::start(root.path(), None, &["--no-demo-model"]);
    assert!(!up.banner.contains(DEMO), "{}", up.banner);
    let http = client();
    wait_leader(
        &http,
        std::slice::from_ref(&up.base),
        Duration::from_secs(20),
    )
    .await;
    let key = root.path().join("publisher.key");
    let model = tiny_model(root.path(), "model");
    let digest = push(&up.base, &key, &model, "pushed-llama");

    // Refused in one line: a digest nobody registered, and something that is
    // neither a directory nor a digest.
    let unknown = "0".repeat(64);
    let out = aigrid_as_publisher(&up.base, &key, &["serve", "--model", &unknown]);
    assert_one_line_failure(&out, "");
    let out = aigrid_as_publisher(&up.base, &key, &["serve", "--model", "not/a/model"]);
    assert_one_line_failure(&out, "not a model digest");

    // Served by a digest prefix, under the name it was pushed with and its digest;
    // its chunks land in the cache as they are verified.
    let cache = root.path().join("cache");
    let server = ServeProc::start(
        &[
            "--model",
            &digest[..12],
            "--server",
            &up.base,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-gib",
            "1",
        ],
        root.path().join("serve.log"),
    );
    server.wait_ready(&http).await;
    let ids = model_ids(&http, &server.base).await.unwrap();
    assert_eq!(
        ids.first().map(String::as_str),
        Some("pushed-llama"),
        "{ids:?}"
    );
    exercise(&http, &server.base, "pushed-llama").await;
    let body = json!({"model": digest, "prompt": "hi", "max_tokens": 2});
    let (status, text) = post(&http, &format!("{}/v1/completions", server.base), &body).await;
    assert_eq!(status, 200, "by digest: {text}");
    let cached = std::fs::read_dir(cache.join("chunks")).unwrap().count();
    assert!(cached > 0, "nothing cached in {}", cache.display());
    server.terminate();
    up.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_its_demo_model_through_the_gateway_and_the_openai_client() {
    let root = tempfile::tempdir().unwrap();
    let up = UpProc::start(root.path(), None, &[]);
    let base = up.base.clone();
    let curl = format!("try          curl -s {base}/v1/chat/completions");
    assert!(up.banner.contains(&curl), "{}", up.banner);
    assert!(up.banner.contains("random"), "{}", up.banner);
    let http = client();

    // The demo model is pushed and its job submitted in the background.
    let digest = up.demo_digest(&http).await;
    up.demo_job(&http, &digest).await;

    // Through the gateway on the up's own port, once a replica is ready.
    up.wait_listed(&http, (DEMO, DEMO), true, Duration::from_secs(180))
        .await;
    exercise(&http, &base, DEMO).await;
    answers_as_documented(&http, &base, DEMO).await;

    // The PyPI openai client against the same gateway; embeddings too when the
    // fixtures hold a BERT model.
    let python = fixture_python();
    let mut script_args = vec![format!("{base}/v1"), DEMO.to_owned()];
    let minilm = fixtures().join("all-minilm-l6-v2");
    if minilm.is_dir() {
        let key = root.path().join("publisher.key");
        let digest = push(&base, &key, &minilm, "all-minilm-l6-v2");
        submit_model_job(&base, root.path(), "minilm", &digest, 500);
        up.wait_listed(
            &http,
            ("all-minilm-l6-v2", "minilm"),
            true,
            Duration::from_secs(240),
        )
        .await;
        script_args.push("all-minilm-l6-v2".to_owned());
    } else {
        eprintln!(
            "{} is missing: embeddings through the openai client not tried",
            minilm.display()
        );
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(&python)
        .arg(script)
        .args(&script_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("openai client: ok"),
        "{}",
        stdout(&out)
    );

    // Stop the model servers before the up: supervised work outlives its agent.
    if minilm.is_dir() {
        assert_success(&aigrid(&["job", "rm", "minilm", "--server", &base]));
    }
    up.remove_demo(&http).await;
    let port = up.port();
    up.terminate();

    // A second start on the same data dir writes nothing new: the model directory
    // is kept, the push finds every chunk stored and registers the same digest,
    // and the job (removed above) comes back for it.
    let demo_dir = root.path().join("data").join("demo-model").join(DEMO);
    let written = std::fs::metadata(demo_dir.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    let up = UpProc::start(root.path(), Some(port), &[]);
    up.demo_job(&http, &digest).await;
    let registered = get_json(&http, &format!("{base}/api/v1/models?name={DEMO}"))
        .await
        .unwrap();
    assert_eq!(registered.as_array().unwrap().len(), 1, "{registered}");
    let modified = std::fs::metadata(demo_dir.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(written, modified, "the demo model was written again");
    up.wait_listed(&http, (DEMO, DEMO), true, Duration::from_secs(180))
        .await;
    up.remove_demo(&http).await;
    up.terminate();
}

/// A new version of the demo model's job whose model never loads: its canary
/// fails, the rollout reverts by itself within its healthy deadline, and the
/// running version answers every request by name throughout, the gateway sending
/// none to the canary that never turned ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_reverts_by_itself_while_the_old_version_serves() {
    let root = tempfile::tempdir().unwrap();
    let (up, http, digest) = serving_demo(root.path()).await;
    let base = up.base.clone();
    let job = get_json(&http, &format!("{base}/api/v1/jobs/{DEMO}"))
        .await
        .unwrap();
    let serving: Vec<String> = job["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();

    // The same model under the same name, its weights garbage: it pushes and
    // registers, and its server cannot load it.
    let broken = root.path().join("broken");
    let demo_dir = root.path().join("data").join("demo-model").join(DEMO);
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(&demo_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
    }
    let weights = broken.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::write(&weights, vec![0xA5u8; usize::try_from(len).unwrap()]).unwrap();
    let bad = push(&base, &root.path().join("publisher.key"), &broken, DEMO);
    assert_ne!(bad, digest);

    // Requests by name, one after another, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (http, stop) = (http.clone(), stop.clone());
        let url = format!("{base}/v1/chat/completions");
        tokio::spawn(async move {
            let body = json!({"model": DEMO, "max_tokens": 4,
                              "messages": [{"role": "user", "content": "hello"}]});
            let mut failures = Vec::new();
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (status, text) = post(&http, &url, &body).await;
                sent += 1;
                if status != 200 {
                    failures.push(format!("{status}: {text}"));
                }
            }
            (sent, failures)
        })
    };

    let mut spec = job["spec"].clone();
    spec["groups"][0]["task"]["model"] = json!(bad);
    spec["groups"][0]["update"] = json!({"canary": 1, "auto_revert": true,
        "min_healthy_time": "2s", "healthy_deadline": "15s", "progress_deadline": "2m"});
    let file = root.path().join("v2.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let started = Instant::now();
    assert_success(&aigrid(&[
        "job",
        "update",
        file.to_str().unwrap(),
        "--wait-secs",
        "0",
        "--server",
        &base,
    ]));
    let status = |args: &[&str]| {
        let mut all = vec!["deployment", "status", DEMO, "--server", &base, "--json"];
        all.extend_from_slice(args);
        json_output(&aigrid(&all))
    };
    let first = status(&[]);
    assert_eq!(first["version"], 2, "{first}");
    assert_eq!(first["groups"][0]["desired_canaries"], 1, "{first}");
    // Followed until it settles: reverted, within its deadline.
    let settled = aigrid(&["deployment", "status", DEMO, "--watch", "--server", &base]);
    let followed = assert_success(&settled);
    let took = started.elapsed();
    let last = status(&[]);
    assert_eq!(
        last["state"],
        "reverted",
        "{last}\n{followed}\n{}",
        up.report(DEMO)
    );
    assert_eq!(last["reverted_to"], 3, "{last}");
    assert!(
        last["description"].as_str().unwrap().contains("unhealthy"),
        "{last}"
    );
    assert!(took < Duration::from_secs(45), "reverted after {took:?}");
    assert!(followed.contains("reverted"), "{followed}");

    // A few more requests after the revert, then the tally: none failed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (sent, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
    assert!(sent >= 10, "only {sent} requests");

    // Version 3 is version 1 again, served by the same instance as before.
    let job = get_json(&http, &format!("{base}/api/v1/jobs/{DEMO}"))
        .await
        .unwrap();
    assert_eq!(job["version"], 3, "{job}");
    assert_eq!(job["spec"]["groups"][0]["task"]["model"], digest, "{job}");
    let running: Vec<&str> = job["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["desired"] == "run")
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(running, serving, "{job}");
    let history = json_output(&aigrid(&[
        "job", "history", DEMO, "--server", &base, "--json",
    ]));
    assert_eq!(history.as_array().unwrap().len(), 3, "{history}");

    up.remove_demo(&http).await;
    up.terminate();
}

/// The edge operator's path on `aigrid up`'s own node: a fleet rollout of the demo
/// model, staged through the node's store reader (every chunk checked against
/// the signed manifest) and attested with the node key; the attested digest is
/// the one asked for. A stranger cannot start one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rollout_stages_and_attests_the_model_on_the_node() {
    let root = tempfile::tempdir().unwrap();
    let (up, _, digest) = up_with_demo(root.path()).await;
    let base = up.base.clone();

    let stranger = root.path().join("stranger.json");
    common::identity::write_key_file(&stranger, "stranger", &common::identity::stranger_key());
    let refused = aigrid_cmd()
        .args([
            "rollout", "create", "--model", &digest, "--waves", "1", "--server", &base,
        ])
        .env("AIGRID_IDENTITY", &stranger)
        .output()
        .unwrap();
    assert_one_line_failure(&refused, "not known to this cluster");
    let bad = aigrid(&[
        "rollout", "create", "--model", &digest, "--waves", "0", "--server", &base,
    ]);
    assert!(!bad.status.success());

    let created = aigrid(&[
        "rollout",
        "create",
        "--model",
        &digest,
        "--waves",
        "1,all",
        "--node-timeout",
        "2m",
        "--wait",
        "--json",
        "--server",
        &base,
    ]);
    let out = assert_success(&created);
    let last: Value = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!(last["state"], "succeeded", "{out}\n{}", up.report(DEMO));
    let id = last["id"].as_str().unwrap();
    let status = json_output(&aigrid(&[
        "rollout", "status", id, "--json", "--server", &base,
    ]));
    let nodes: Vec<&Value> = status["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["nodes"].as_array().unwrap())
        .collect();
    assert!(!nodes.is_empty(), "{status}");
    for node in nodes {
        assert_eq!(node["state"], "active", "{status}");
        assert_eq!(node["attested"], digest.as_str(), "{status}");
        assert!(
            node["signature"].as_str().is_some_and(|s| s.len() == 128),
            "{status}"
        );
    }
    let listed = assert_success(&aigrid(&["rollout", "ls", "--server", &base]));
    assert!(
        listed.contains(id) && listed.contains("succeeded"),
        "{listed}"
    );
    // The node recorded the model as its active version.
    let agent_dir = root.path().join("data").join("agent");
    let active = std::fs::read_to_string(agent_dir.join("model-cache").join("active.json"))
        .unwrap_or_else(|e| {
            let listing: Vec<String> = walk(&agent_dir)
                .into_iter()
                .map(|p| p.display().to_string())
                .filter(|p| !p.contains("/chunks/"))
                .collect();
            panic!(
                "active.json: {e}\n{listing:#?}\n{status}\n{}",
                up.report(DEMO)
            )
        });
    let active: Value = serde_json::from_str(&active).unwrap();
    assert_eq!(active[DEMO]["active"], digest.as_str(), "{active}");
    up.terminate();
}
