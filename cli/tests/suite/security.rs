//! The control API as a stranger, a replayer and a member with too little of a role
//! sees it: refused (401 or 403) with nothing changed; and secrets never read back.

use crate::common;

use std::time::Duration;

use aigrid_api::{IdentityKey, KeyAlgorithm};
use common::identity::{admin_key, stranger_key, write_key_file};
use common::*;
use serde_json::{json, Value};

fn key(seed: u8) -> IdentityKey {
    IdentityKey::from_seed(KeyAlgorithm::Ed25519, [seed; 32])
}

async fn started() -> (Cluster, reqwest::Client, String) {
    let cluster = Cluster::start(1, &[]);
    let client = http();
    wait_leader(&client, &cluster.urls(), Duration::from_secs(20)).await;
    let url = cluster.urls()[0].clone();
    (cluster, client, url)
}

/// Everything a refused request must leave as it was.
async fn state(client: &reqwest::Client, url: &str) -> (Value, Value, Value, Value) {
    let (jobs, nodes, commit) = bad_requests::snapshot(client, url).await;
    let tokens = get_json(client, &format!("{url}/api/v1/join-tokens"))
        .await
        .unwrap();
    (jobs, nodes, commit, tokens)
}

/// The JSON `url` answers to `k`'s signed GET.
async fn read_as(client: &reqwest::Client, url: &str, k: &IdentityKey) -> Value {
    let resp = client.get(url).signed_by(k).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.json().await.unwrap()
}

async fn answer(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_forgers_and_replayers_change_nothing() {
    let (_cluster, client, url) = started().await;
    let before = state(&client, &url).await;
    let jobs = format!("{url}/api/v1/jobs");
    let mutations: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", jobs.clone(), Some(job("evil"))),
        ("POST", format!("{url}/api/v1/join-tokens"), Some(json!({}))),
        (
            "POST",
            format!("{url}/api/v1/nodes/n1/drain"),
            Some(json!({})),
        ),
        ("POST", format!("{url}/api/v1/nodes/n1/revoke"), None),
        (
            "POST",
            format!("{url}/api/v1/cluster/members"),
            Some(json!({"id": 9, "addr": "127.0.0.1:1"})),
        ),
        ("DELETE", format!("{url}/api/v1/cluster/members/1"), None),
        (
            "POST",
            format!("{url}/api/v1/identities"),
            Some(json!({"name": "me", "public_key": stranger_key().public(), "admin": true})),
        ),
    ];
    for (method, target, body) in &mutations {
        let build = || {
            let mut req = client.request(method.parse().unwrap(), target);
            if let Some(b) = body {
                req = req.json(b);
            }
            req
        };
        // Unsigned.
        let (status, body_back) = answer(build().send().await.unwrap()).await;
        assert_eq!(status, 401, "unsigned {method} {target}: {body_back}");
        assert_eq!(body_back["error"]["code"], "unauthorized", "{body_back}");
        // Signed by a key the cluster does not know.
        let (status, body_back) =
            answer(build().signed_by(&stranger_key()).send().await.unwrap()).await;
        assert_eq!(status, 401, "stranger {method} {target}: {body_back}");
        assert!(
            body_back["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not known"),
            "{body_back}"
        );
    }
    // Signed by the admin, then tampered with: another body under the same signature.
    let signed = client
        .post(&jobs)
        .json(&job("fine"))
        .signed()
        .build()
        .unwrap();
    let mut forged = client.post(&jobs).json(&job("forged"));
    for (name, value) in signed.headers() {
        if ["signature", "signature-input", "content-digest"].contains(&name.as_str()) {
            forged = forged.header(name, value);
        }
    }
    let (status, body_back) = answer(forged.send().await.unwrap()).await;
    assert_eq!(status, 401, "{body_back}");
    assert!(
        body_back["error"]["message"]
            .as_str()
            .unwrap()
            .contains("content-digest"),
        "{body_back}"
    );
    // And to another target.
    let mut moved = client.delete(format!("{jobs}/fine"));
    for (name, value) in signed.headers() {
        moved = moved.header(name, value);
    }
    assert_eq!(moved.send().await.unwrap().status(), 401);
    assert_eq!(
        state(&client, &url).await,
        before,
        "a refused request changed the state"
    );

    // A replay: the same signed request twice. The first is served, the second refused.
    let once = client
        .post(&jobs)
        .json(&job("once"))
        .signed()
        .build()
        .unwrap();
    let again = once.try_clone().unwrap();
    assert_eq!(client.execute(once).await.unwrap().status(), 201);
    let after_first = state(&client, &url).await;
    let (status, body_back) = answer(client.execute(again).await.unwrap()).await;
    assert_eq!(status, 401, "{body_back}");
    assert!(
        body_back["error"]["message"]
            .as_str()
            .unwrap()
            .contains("replayed"),
        "{body_back}"
    );
    assert_eq!(
        state(&client, &url).await,
        after_first,
        "a replay changed the state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_bound_what_members_do_and_secrets_are_never_read_back() {
    let (_cluster, client, url) = started().await;
    let (viewer, operator) = (key(7), key(8));
    for (name, k) in [("vic", &viewer), ("olga", &operator)] {
        let resp = client
            .post(format!("{url}/api/v1/identities"))
            .json(&json!({"name": name, "public_key": k.public()}))
            .signed()
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    for (k, role) in [(&viewer, "viewer"), (&operator, "operator")] {
        let resp = client
            .put(format!("{url}/api/v1/circles/lab/members/{}", k.id()))
            .json(&json!({"role": role}))
            .signed()
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let mut lab_job = job("lab-job");
    lab_job["circle"] = json!("lab");
    lab_job["groups"][0]["task"]["env"] = json!({"API_TOKEN": "s3cret-value", "MODE": "prod"});
    let post = |k: &IdentityKey, body: &Value| {
        client
            .post(format!("{url}/api/v1/jobs"))
            .json(body)
            .signed_by(k)
            .send()
    };
    // A viewer reads but may not change; an operator changes its circle only.
    let (status, body) = answer(post(&viewer, &lab_job).await.unwrap()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(post(&operator, &lab_job).await.unwrap().status(), 201);
    let mut other = job("other-job");
    other["circle"] = json!("other");
    assert_eq!(post(&operator, &other).await.unwrap().status(), 403);
    assert_eq!(
        post(&operator, &job("no-circle")).await.unwrap().status(),
        403
    );
    assert_eq!(post(&admin_key(), &other).await.unwrap().status(), 201);
    // Nor may she take the admins' job over by submitting its name into her circle.
    // (The commit index is left out: the scheduler commits the admins' job's
    // verdict meanwhile.)
    let unchanged = |(jobs, nodes, _, tokens): (Value, Value, Value, Value)| (jobs, nodes, tokens);
    let before = unchanged(state(&client, &url).await);
    let mut hijack = job("other-job");
    hijack["circle"] = json!("lab");
    let (status, body) = answer(post(&operator, &hijack).await.unwrap()).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("circle `other`")),
        "{body}"
    );
    assert_eq!(unchanged(state(&client, &url).await), before);
    let other_job = read_as(
        &client,
        &format!("{url}/api/v1/jobs/other-job"),
        &admin_key(),
    )
    .await;
    assert_eq!(other_job["spec"]["circle"], "other");
    for k in [&viewer, &operator] {
        let resp = client
            .post(format!("{url}/api/v1/join-tokens"))
            .json(&json!({}))
            .signed_by(k)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
        let resp = client
            .delete(format!("{url}/api/v1/jobs/other-job"))
            .signed_by(k)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }
    // The viewer lists its circle's jobs only, and reads them redacted.
    let listed = read_as(&client, &format!("{url}/api/v1/jobs"), &viewer).await;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lab-job"]);
    for k in [&viewer, &admin_key()] {
        let resp = client
            .get(format!("{url}/api/v1/jobs/lab-job"))
            .signed_by(k)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains("s3cret-value"),
            "a secret was read back: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["spec"]["groups"][0]["task"]["env"],
            json!({"API_TOKEN": "<redacted>", "MODE": "<redacted>"})
        );
    }
    assert_eq!(
        client
            .get(format!("{url}/api/v1/jobs/other-job"))
            .signed_by(&viewer)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    // Nor does the CLI show it.
    let out = aigrid(&["job", "status", "lab-job", "--json", "--server", &url]);
    assert!(!stdout(&out).contains("s3cret-value"));
    // The spec as read, submitted again, keeps its secrets: nothing changes.
    let read = read_as(&client, &format!("{url}/api/v1/jobs/lab-job"), &operator).await;
    let (status, body) = answer(post(&operator, &read["spec"]).await.unwrap()).await;
    assert_eq!((status, &body["version"]), (200, &json!(1)), "{body}");
}

#[test]
fn the_cli_makes_shows_and_uses_identities() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_cluster, _client, url) = rt.block_on(started());
    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice.json");
    let alice_s = alice.to_str().unwrap();
    let made = aigrid(&[
        "key",
        "new",
        "--name",
        "alice",
        "--hybrid",
        "--identity",
        alice_s,
    ]);
    assert!(assert_success(&made).contains("made identity"));
    // Never replaced by accident.
    let again = aigrid(&["key", "new", "--identity", alice_s]);
    assert_one_line_failure(&again, "exists");
    let shown = json_output(&aigrid(&["key", "show", "--json", "--identity", alice_s]));
    let public = shown["public_key"].as_str().unwrap().to_owned();
    let id = shown["id"].as_str().unwrap().to_owned();
    assert!(public.starts_with("ed25519+ml-dsa-65:"), "{public}");
    // Unknown to the cluster until an admin adds her.
    let before = aigrid(&["whoami", "--server", &url, "--identity", alice_s]);
    assert_one_line_failure(&before, "not known");
    assert_success(&aigrid(&[
        "identity", "add", "alice", &public, "--server", &url,
    ]));
    assert_success(&aigrid(&[
        "circle", "grant", "lab", &id, "--role", "owner", "--server", &url,
    ]));
    let me = json_output(&aigrid(&[
        "whoami",
        "--json",
        "--server",
        &url,
        "--identity",
        alice_s,
    ]));
    assert_eq!(me["admin"], false);
    assert_eq!(me["circles"], json!([{"circle": "lab", "role": "owner"}]));
    // An owner makes her circle's API keys; the key is shown once, listed by id.
    let created = json_output(&aigrid(&[
        "apikey",
        "create",
        "--circle",
        "lab",
        "--json",
        "--server",
        &url,
        "--identity",
        alice_s,
    ]));
    let key_text = created["key"].as_str().unwrap();
    assert!(key_text.starts_with("aigrid-key."), "{key_text}");
    let listed = json_output(&aigrid(&[
        "apikey",
        "ls",
        "--circle",
        "lab",
        "--json",
        "--server",
        &url,
        "--identity",
        alice_s,
    ]));
    assert!(!listed.to_string().contains(&key_text[30..]));
    // But not another circle's, nor the admins' commands.
    let denied = aigrid(&[
        "apikey",
        "create",
        "--circle",
        "other",
        "--server",
        &url,
        "--identity",
        alice_s,
    ]);
    assert_one_line_failure(&denied, "forbidden");
    let denied = aigrid(&["identity", "ls", "--server", &url, "--identity", alice_s]);
    assert_one_line_failure(&denied, "forbidden");
    // Without any identity the CLI says how to get one.
    let nobody = aigrid_cmd()
        .args(["job", "ls", "--server", &url])
        .env_remove("AIGRID_IDENTITY")
        .env("XDG_CONFIG_HOME", dir.path())
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert_one_line_failure(&nobody, "aigrid key new");
    let stranger_file = dir.path().join("stranger.json");
    write_key_file(&stranger_file, "mallory", &stranger_key());
    let out = aigrid(&[
        "job",
        "submit",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello.json"),
        "--server",
        &url,
        "--identity",
        stranger_file.to_str().unwrap(),
    ]);
    assert_one_line_failure(&out, "not known");
}
