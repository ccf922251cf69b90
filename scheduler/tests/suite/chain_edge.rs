//! The Human Chain's routes against a real server, as strangers and members use
//! them: unsigned requests and unknown keys get 401, a known identity outside a
//! circle neither sees nor decides its proposals, a watch answers when something
//! changes (and not before), and the audit log's proofs check out.

use crate::common;

use std::time::{Duration, Instant};

use aigrid_api::{IdentityKey, KeyAlgorithm};
use aigrid_consensus::human::audit::{verify_consistency, verify_inclusion};
use aigrid_scheduler::server::ServerConfig;
use aigrid_scheduler::testkit::{admin_key, Sign};
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn hash(text: &str) -> [u8; 32] {
    hex::decode(text).unwrap().try_into().unwrap()
}

/// A GET signed by `key`.
async fn get_as(
    client: &reqwest::Client,
    url: String,
    key: &(impl aigrid_api::RequestSigner + Sync),
) -> reqwest::Response {
    client.get(url).signed_by(key).send().await.unwrap()
}

/// A POST of `body` as JSON, signed by `key`.
async fn post_as(
    client: &reqwest::Client,
    url: String,
    body: &impl serde::Serialize,
    key: &(impl aigrid_api::RequestSigner + Sync),
) -> reqwest::Response {
    client
        .post(url)
        .json(body)
        .signed_by(key)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_watches_wait_for_changes_and_proofs_verify() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    let server = start_leader(config).await;
    let url = server.url();
    let client = reqwest::Client::new();
    until("the cluster named", || {
        server.raft.read_local(|s| !s.cluster_id().is_empty())
    })
    .await;

    // Two people: alice in circle `lab` (1 of 1), bob known but outside it.
    let (alice, bob) = (
        IdentityKey::from_seed(KeyAlgorithm::Ed25519, [21; 32]),
        IdentityKey::from_seed(KeyAlgorithm::Ed25519, [22; 32]),
    );
    for (name, k) in [("alice", &alice), ("bob", &bob)] {
        let r = client
            .post(format!("{url}/api/v1/identities"))
            .json(&json!({"name": name, "public_key": k.public()}))
            .signed()
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = client
        .post(format!("{url}/api/v1/circles"))
        .json(
            &json!({"name": "lab", "members": [{"identity": alice.id()}],
                      "policy": aigrid_api::CirclePolicy::new(1)}),
        )
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );

    // A watch from now waits, then answers once a proposal is made.
    let before = get_as(&client, format!("{url}/api/v1/proposals"), &alice).await;
    let after: u64 = before.headers()["x-aigrid-audit-size"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let watch = {
        let (client, url) = (client.clone(), url.clone());
        let alice = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [21; 32]);
        tokio::spawn(async move {
            let started = Instant::now();
            let r = get_as(
                &client,
                format!("{url}/api/v1/proposals?watch=true&after={after}&wait=20"),
                &alice,
            )
            .await;
            (started.elapsed(), r.json::<Vec<Value>>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !watch.is_finished(),
        "the watch answered before anything changed"
    );
    let job = json!({
        "name": "trainer", "kind": "batch", "circle": "lab",
        "groups": [{"name": "main", "resources": {"cpu_millis": 100, "memory_mib": 64},
                    "task": {"driver": "exec", "command": "/bin/true"}}]
    });
    let r = post_as(&client, format!("{url}/api/v1/jobs"), &job, &alice).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let created: Value = r.json().await.unwrap();
    let id = created["proposal"].as_str().unwrap().to_owned();
    let (waited, listed) = watch.await.unwrap();
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert!(listed.iter().any(|p| p["id"] == id.as_str()), "{listed:?}");

    // Strangers: unsigned, and signed by a key the cluster does not know.
    let stranger = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [23; 32]);
    for path in ["/api/v1/proposals", "/api/v1/audit", "/api/v1/audit/export"] {
        let unsigned = client.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED, "{path}");
        let unknown = get_as(&client, format!("{url}{path}"), &stranger).await;
        assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // Bob, known but outside `lab`: the proposal is hidden from him and his
    // decision refused as a non-signer's, even correctly signed.
    let hidden = get_as(&client, format!("{url}/api/v1/proposals"), &bob).await;
    assert_eq!(hidden.json::<Vec<Value>>().await.unwrap().len(), 0);
    let one = get_as(&client, format!("{url}/api/v1/proposals/{id}"), &bob).await;
    assert_eq!(one.status(), StatusCode::FORBIDDEN);
    let signed = aigrid_consensus::human::sign_decision(
        &bob,
        &hash(created["digest"].as_str().unwrap()),
        aigrid_api::Decision::Approve,
    );
    let decide = post_as(
        &client,
        format!("{url}/api/v1/proposals/{id}/approvals"),
        &signed,
        &bob,
    )
    .await;
    assert_eq!(decide.status(), StatusCode::FORBIDDEN);
    let body: Value = decide.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_a_signer");
    // Alice's own signature sent by the admin: the request's signer must be the
    // decision's, and the admin is no signer.
    let alices = aigrid_consensus::human::sign_decision(
        &alice,
        &hash(created["digest"].as_str().unwrap()),
        aigrid_api::Decision::Approve,
    );
    let relayed = post_as(
        &client,
        format!("{url}/api/v1/proposals/{id}/approvals"),
        &alices,
        &admin_key(),
    )
    .await;
    assert_eq!(relayed.status(), StatusCode::FORBIDDEN);

    // Inclusion and consistency proofs of the log verify against its roots.
    let checkpoint: Value = get_json(&client, &format!("{url}/api/v1/audit/checkpoint")).await;
    let size = checkpoint["size"].as_u64().unwrap();
    assert!(size >= 3, "{checkpoint}");
    let root = hash(checkpoint["root"].as_str().unwrap());
    let proof: Value = get_json(
        &client,
        &format!("{url}/api/v1/audit/proof?index=1&size={size}"),
    )
    .await;
    let leaf = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        proof["leaf"].as_str().unwrap(),
    )
    .unwrap();
    let hashes: Vec<[u8; 32]> = proof["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hash(h.as_str().unwrap()))
        .collect();
    let leaf = String::from_utf8(leaf).unwrap();
    verify_inclusion(&root, size, 1, &leaf, &hashes).unwrap();
    let consistency: Value = get_json(
        &client,
        &format!("{url}/api/v1/audit/proof?from=2&size={size}"),
    )
    .await;
    let hashes: Vec<[u8; 32]> = consistency["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hash(h.as_str().unwrap()))
        .collect();
    verify_consistency(
        &hash(consistency["from_root"].as_str().unwrap()),
        2,
        &root,
        size,
        &hashes,
    )
    .unwrap();
    let bad = get_as(
        &client,
        format!("{url}/api/v1/audit/proof?index=0&from=1"),
        &admin_key(),
    )
    .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // Alice, the circle's one member, approves: it applies, and the metrics say so.
    let approved = post_as(
        &client,
        format!("{url}/api/v1/proposals/{id}/approvals"),
        &alices,
        &alice,
    )
    .await;
    let approved: Value = approved.json().await.unwrap();
    assert_eq!(approved["state"], "applied", "{approved}");
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "aigrid_proposals{state=\"applied\"} 1",
        "aigrid_proposals{state=\"pending\"} 0",
        "aigrid_proposal_approval_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    assert!(metrics.contains("aigrid_audit_entries "), "{metrics}");

    // The leader settles what is due: a proposal whose window closes expires.
    let mut brief = aigrid_api::CirclePolicy::new(1);
    brief.max_window_secs = 1;
    let r = client
        .post(format!("{url}/api/v1/circles"))
        .json(&json!({"name": "brief", "members": [{"identity": alice.id()}], "policy": brief}))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut job = job;
    job["name"] = "brief-job".into();
    job["circle"] = "brief".into();
    let r = post_as(&client, format!("{url}/api/v1/jobs"), &job, &alice).await;
    let brief_id = r.json::<Value>().await.unwrap()["proposal"]
        .as_str()
        .unwrap()
        .to_owned();
    until("the brief proposal expiring", || {
        server.raft.read_local(|s| {
            s.proposal(&brief_id)
                .is_some_and(|p| p.state == aigrid_api::ProposalState::Expired)
        })
    })
    .await;
    server.stop().await;
}
