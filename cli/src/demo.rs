//! The demo model `aigrid up` deploys, so its first run ends with a working `/v1`:
//! a tiny real Llama (random weights, a trained byte-level BPE tokenizer, a ChatML
//! template) written once into the data directory, pushed into the store like any
//! model, and run by a `model-server` job. It answers in gibberish: it shows the path
//! a real model takes, not what one says.

use std::sync::Arc;

use aigrid_api::IdentityKey;
use std::path::{Path, PathBuf};

use aigrid_api::{JobSpec, JobSummary, SubmitJobResponse};
use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use anyhow::{anyhow, Context};
use reqwest::Method;

use crate::client::Client;
use crate::model::push::{push_dir, PushArgs};
use crate::model::store::StoreArgs;
use crate::output::say;

/// The demo model's name, and its job's.
pub const NAME: &str = "tiny-llama";

/// What to ask the demo model, as the `up` banner shows it.
pub fn curl_line(base: &str) -> String {
    format!(
        r#"curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{{"model":"{NAME}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16}}'"#
    )
}

/// The job that serves model `digest` on one CPU core, for `circle` (the admins'
/// when none).
pub fn job_spec(digest: &str, circle: Option<&str>) -> anyhow::Result<JobSpec> {
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": NAME,
        "kind": "service",
        "circle": circle,
        "groups": [{
            "name": "server",
            "count": 1,
            "resources": {"cpu_millis": 1000, "memory_mib": 1024},
            "task": {"driver": "model-server", "model": digest},
        }],
    }))
    .context("building the demo job")?;
    spec.validate().map_err(|e| anyhow!("the demo job: {e}"))?;
    Ok(spec)
}

/// Writes (once), pushes and deploys the demo model through the control API at
/// `base`; `dir` is `<data-dir>/demo-model`. A failure is logged on one line and
/// leaves `aigrid up` running.
pub async fn deploy(base: String, key: Arc<IdentityKey>, dir: PathBuf, store: StoreArgs) {
    let deployed = match Client::new(&base, Some(key)) {
        Ok(client) => try_deploy(&client, &dir, store, None).await,
        Err(e) => Err(e),
    };
    match deployed {
        Ok(Deployed::Submitted(digest)) => {
            tracing::info!(model = NAME, %digest, "demo model pushed and its job submitted")
        }
        Ok(Deployed::JobExists(digest)) => tracing::info!(
            model = NAME,
            %digest,
            "demo model pushed; its job already exists and is left as it is"
        ),
        Err(e) => {
            let reason = format!("{e:#}").replace('\n', " ");
            tracing::warn!("demo model {NAME} not deployed: {reason}");
        }
    }
}

/// Says on stdout when the demo model becomes ready (the gateway at `base` lists
/// it) and when it stops being served, until `stop` turns true; answers whether it
/// was ready then, so `up` can say that it stopped once its workloads are gone.
pub async fn announce(base: String, mut stop: tokio::sync::watch::Receiver<bool>) -> bool {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    let Ok(http) = http else {
        return false;
    };
    let url = format!("{base}/v1/models");
    let mut ready = false;
    loop {
        let listed = listed(&http, &url).await;
        if listed != ready {
            ready = listed;
            if ready {
                say(&format!(
                    "demo model {NAME} is ready: {base}/v1 answers for it\n"
                ));
            } else {
                say(&stopped_line());
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return ready,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// The line `up` prints when the demo model stops being served.
pub fn stopped_line() -> String {
    format!("demo model {NAME} stopped\n")
}

/// Whether the gateway's `/v1/models` at `url` lists the demo model.
async fn listed(http: &reqwest::Client, url: &str) -> bool {
    let Ok(resp) = http.get(url).send().await else {
        return false;
    };
    let Ok(body) = resp.json::<serde_json::Value>().await else {
        return false;
    };
    body["data"]
        .as_array()
        .is_some_and(|models| models.iter().any(|m| m["id"] == NAME))
}

/// What [`deploy`] did.
pub enum Deployed {
    /// The job was submitted for the model of this digest.
    Submitted(String),
    /// The model of this digest is registered; a job of the demo's name already was.
    JobExists(String),
}

/// Writes (once, under `dir`), pushes and deploys the demo model through `client`,
/// for `circle` (the admins' when none): `aigrid model demo` and `up` alike.
pub async fn try_deploy(
    client: &Client,
    dir: &Path,
    store: StoreArgs,
    circle: Option<&str>,
) -> anyhow::Result<Deployed> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let model_dir = write_once(dir).await?;
    let args = PushArgs {
        dir: model_dir,
        name: NAME.to_owned(),
        k: None,
        m: None,
        policy: Vec::new(),
        chunk_kib: 4096,
        encrypt_key: None,
        // The data directory's own key: the same publisher on every start, so a
        // second push finds every chunk stored and registers the same digest.
        publisher_key: Some(dir.join("publisher.key")),
        hybrid: false,
        circle: circle.map(str::to_owned),
        store,
    };
    let pushed = push_dir(client, &args, false).await.context("pushing it")?;
    let summary = match pushed.registered {
        crate::client::Answer::Done(summary) => summary,
        crate::client::Answer::Proposed(p) => anyhow::bail!(
            "the demo model's registration is proposal {} of circle {}, which guards \
             model.register: once its quorum approves (aigrid proposal approve {}), run \
             this again",
            p.proposal,
            p.circle,
            p.proposal
        ),
    };
    let digest = summary.digest;
    let jobs: Vec<JobSummary> = client
        .call::<(), _>(Method::GET, "/api/v1/jobs", None)
        .await
        .context("listing jobs")?;
    // A job of that name is left alone: its operator may have changed it.
    if jobs.iter().any(|j| j.name == NAME) {
        return Ok(Deployed::JobExists(digest));
    }
    let spec = job_spec(&digest, circle)?;
    let _: SubmitJobResponse = client
        .call(Method::POST, "/api/v1/jobs", Some(&spec))
        .await
        .context("submitting its job")?;
    Ok(Deployed::Submitted(digest))
}

/// The demo model's directory under `dir`, written on first use: into a scratch
/// directory first, renamed into place when whole, so an interrupted start leaves
/// nothing half-written behind that name.
async fn write_once(dir: &Path) -> anyhow::Result<PathBuf> {
    let model_dir = dir.join(NAME);
    if model_dir.is_dir() {
        return Ok(model_dir);
    }
    let scratch = dir.join(format!(".{NAME}.partial"));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("removing {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let target = scratch.clone();
    tokio::task::spawn_blocking(move || write_tiny_llama(&target, &TinyLlama::default()))
        .await
        .context("writing the tiny model")?
        .map_err(|e| anyhow!("writing the tiny model: {e}"))?;
    std::fs::rename(&scratch, &model_dir)
        .with_context(|| format!("moving it to {}", model_dir.display()))?;
    Ok(model_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_job_is_a_valid_model_server_service() {
        let digest = "ab".repeat(32);
        let spec = job_spec(&digest, None).unwrap();
        assert_eq!(spec.name, NAME);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["kind"], "service");
        assert_eq!(json["groups"][0]["task"]["driver"], "model-server");
        assert_eq!(json["groups"][0]["task"]["model"], digest.as_str());
        assert_eq!(json["groups"][0]["resources"]["memory_mib"], 1024);
    }

    #[test]
    fn the_curl_line_asks_the_demo_model() {
        let line = curl_line("http://127.0.0.1:7700");
        assert!(line.starts_with("curl -s http://127.0.0.1:7700/v1/chat/completions "));
        let body = line.split('\'').nth(3).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["model"], NAME);
        assert_eq!(body["max_tokens"], 16);
    }
}
