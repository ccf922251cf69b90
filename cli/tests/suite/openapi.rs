//! The control API answers as its OpenAPI document says. Against a real server, every
//! operation the served `/api/v1/openapi.json` lists is called with a valid request
//! (after fixtures give its GETs something to return) and with invalid ones; each
//! answer's status must be documented for that operation and its body must validate
//! against the schema documented for that status (OpenAPI 3.1 schemas are JSON
//! Schema 2020-12). The test walks the document, so a newly documented route is
//! covered as soon as it is listed; a served route missing from the document fails
//! it too.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aigrid_api::auth::NodeKey;
use aigrid_api::manifest::Registration;
use aigrid_api::signature::sign_request;
use aigrid_api::NodeSigner;
use aigrid_api::{IdentityKey, KeyAlgorithm, NodeId};
use aigrid_scheduler::testkit::model_registration;
use common::schema::Checker;
use common::*;
use serde_json::{json, Value};

/// Every route a server serves, as `METHOD path` (the Raft transport aside: it is
/// between servers, not part of the API). Kept by hand from the routers: the
/// document must list each one, and nothing else.
const SERVED: &[&str] = &[
    "POST /api/v1/jobs",
    "GET /api/v1/jobs",
    "GET /api/v1/jobs/{id}",
    "DELETE /api/v1/jobs/{id}",
    "GET /api/v1/jobs/{id}/versions",
    "POST /api/v1/jobs/{id}/revert",
    "GET /api/v1/jobs/{id}/deployment",
    "POST /api/v1/rollouts",
    "GET /api/v1/rollouts",
    "GET /api/v1/rollouts/{id}",
    "POST /api/v1/jobs/{id}/deployment/{action}",
    "POST /api/v1/nodes",
    "GET /api/v1/nodes",
    "GET /api/v1/nodes/{id}",
    "POST /api/v1/nodes/{id}/heartbeat",
    "GET /api/v1/nodes/{id}/assignments",
    "POST /api/v1/nodes/{id}/revoke",
    "POST /api/v1/nodes/{id}/drain",
    "DELETE /api/v1/nodes/{id}/drain",
    "GET /api/v1/nodes/{id}/allocations",
    "GET /api/v1/allocations/{id}/logs",
    "POST /api/v1/join-tokens",
    "GET /api/v1/join-tokens",
    "DELETE /api/v1/join-tokens/{id}",
    "GET /api/v1/cluster",
    "POST /api/v1/cluster/members",
    "DELETE /api/v1/cluster/members/{id}",
    "POST /api/v1/models",
    "GET /api/v1/models",
    "GET /api/v1/models/{digest}",
    "DELETE /api/v1/models/{digest}",
    "PUT /api/v1/models/{digest}/locations",
    "PUT /api/v1/models/{digest}/health",
    "GET /api/v1/storage",
    "GET /api/v1/whoami",
    "GET /api/v1/usage",
    "GET /api/v1/circles/{circle}/usage",
    "PUT /api/v1/circles/{circle}/quota",
    "DELETE /api/v1/circles/{circle}/quota",
    "GET /api/v1/treasury",
    "GET /api/v1/treasury/{circle}",
    "GET /api/v1/treasury/{circle}/ledger",
    "POST /api/v1/treasury/{circle}/deposits",
    "POST /api/v1/treasury/{circle}/transfers",
    "GET /api/v1/farmers/{identity}/ledger",
    "POST /api/v1/identities",
    "GET /api/v1/identities",
    "DELETE /api/v1/identities/{id}",
    "GET /api/v1/circles",
    "GET /api/v1/circles/{circle}",
    "PUT /api/v1/circles/{circle}/members/{identity}",
    "DELETE /api/v1/circles/{circle}/members/{identity}",
    "POST /api/v1/circles/{circle}/api-keys",
    "GET /api/v1/circles/{circle}/api-keys",
    "DELETE /api/v1/circles/{circle}/api-keys/{id}",
    "POST /api/v1/circles",
    "GET /api/v1/circles/{circle}/governance",
    "PUT /api/v1/circles/{circle}/governance",
    "GET /api/v1/proposals",
    "GET /api/v1/proposals/{id}",
    "POST /api/v1/proposals/{id}/approvals",
    "GET /api/v1/audit",
    "GET /api/v1/audit/checkpoint",
    "GET /api/v1/audit/proof",
    "GET /api/v1/audit/export",
    "GET /api/v1/openapi.json",
    "GET /api/v1",
    "GET /metrics",
    "GET /health",
    "GET /ready",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /v1/embeddings",
];

/// One request to send.
struct Call {
    method: reqwest::Method,
    /// Path and query.
    target: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Call {
    fn new(method: &str, target: impl Into<String>) -> Self {
        Call {
            method: method.parse().unwrap(),
            target: target.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn json(mut self, body: &Value) -> Self {
        self.body = Some(serde_json::to_vec(body).unwrap());
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }

    fn raw(mut self, body: &[u8]) -> Self {
        self.body = Some(body.to_vec());
        self.headers
            .push(("content-type".into(), "application/json".into()));
        self
    }

    /// Signs the request as `node` with `key`, as an agent does.
    fn signed(mut self, node: &str, key: &NodeKey) -> Self {
        let node = NodeId::new(node);
        let signer = NodeSigner { node: &node, key };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let body = self.body.clone().unwrap_or_default();
        let mut nonce = [0u8; 16];
        rand::fill(&mut nonce[..]);
        let headers = sign_request(
            &signer,
            self.method.as_str(),
            &self.target,
            &body,
            created,
            nonce,
        );
        self.headers.extend(
            headers
                .pairs()
                .map(|(name, value)| (name.to_owned(), value.to_owned())),
        );
        self
    }

    fn header(mut self, name: &str, value: String) -> Self {
        self.headers.push((name.to_owned(), value));
        self
    }

    /// The answer's status, content type and body.
    async fn send(&self, client: &reqwest::Client, server: &str) -> (u16, String, Vec<u8>) {
        let mut req = client.request(self.method.clone(), format!("{server}{}", self.target));
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        if let Some(body) = &self.body {
            req = req.body(body.clone());
        }
        // Requests not signed as a node are the tests' admin's.
        if !self.headers.iter().any(|(name, _)| name == "signature") {
            req = req.signed();
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, content_type, resp.bytes().await.unwrap().to_vec())
    }
}

/// What the fixtures made, for filling in paths and bodies.
struct Fixtures {
    node: String,
    node_key: NodeKey,
    /// A second node, revoked at the end.
    other_node: String,
    join_token: String,
    join_token_id: String,
    job: String,
    alloc: String,
    model: Registration,
    digest: String,
    /// A fleet rollout of the model.
    rollout: String,
    /// A server waiting to be added to the cluster.
    joiner: (u64, String),
    /// An identity with a role in the circle `lab`, removed at the end.
    member: String,
    /// An API key of `lab`, revoked at the end.
    api_key: String,
    /// A pending proposal of the governed circle `gov`: its id and digest.
    proposal: (String, String),
}

/// The governance of a circle whose one member is the tests' admin.
fn admin_governance() -> Value {
    json!({
        "members": [{"identity": identity::admin_key().id()}],
        "policy": aigrid_api::CirclePolicy::new(1),
    })
}

/// The node registration for `id`, signed with `key`, presenting `token`.
fn registration_call(id: &str, key: &NodeKey, token: &str) -> Call {
    let body = json!({
        "id": id,
        "name": id,
        "attributes": {"site": "conformance"},
        "resources": {"cpu_millis": 8000, "memory_mib": 16384, "disk_mib": 100000},
        "public_key": key.public().to_string(),
    });
    Call::new("POST", "/api/v1/nodes")
        .json(&body)
        .signed(id, key)
        .header("authorization", format!("Bearer {token}"))
}

/// A small job that fits the fixture node.
fn small_job(name: &str) -> Value {
    json!({
        "name": name,
        "kind": "service",
        "groups": [{
            "name": "web",
            "count": 1,
            "resources": {"cpu_millis": 500, "memory_mib": 256},
            "task": {"driver": "exec", "command": "/bin/sleep", "args": ["600"]}
        }]
    })
}

async fn expect_json(call: Call, client: &reqwest::Client, server: &str, status: u16) -> Value {
    let target = call.target.clone();
    let (got, _, body) = call.send(client, server).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got, status, "fixture {target}: {text}");
    serde_json::from_slice(&body).unwrap()
}

async fn make_fixtures(client: &reqwest::Client, server: &str, joiner: (u64, String)) -> Fixtures {
    let token = expect_json(
        Call::new("POST", "/api/v1/join-tokens").json(&json!({"description": "conformance"})),
        client,
        server,
        201,
    )
    .await;
    let join_token = token["token"].as_str().unwrap().to_owned();
    let node_key = NodeKey::from_secret([1; 32]);
    let other_key = NodeKey::from_secret([2; 32]);
    for (id, key) in [("node-a", &node_key), ("node-b", &other_key)] {
        expect_json(registration_call(id, key, &join_token), client, server, 201).await;
        expect_json(
            Call::new("POST", format!("/api/v1/nodes/{id}/heartbeat"))
                .json(&json!({}))
                .signed(id, key),
            client,
            server,
            200,
        )
        .await;
    }
    let job = expect_json(
        Call::new("POST", "/api/v1/jobs").json(&small_job("conformance")),
        client,
        server,
        201,
    )
    .await;
    let job = job["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let alloc = loop {
        let got = expect_json(
            Call::new("GET", format!("/api/v1/jobs/{job}")),
            client,
            server,
            200,
        )
        .await;
        if let Some(id) = got["allocations"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "the job was never placed: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A second version of the job, so there is one to revert to, rolling out
    // under an update policy.
    let mut second = small_job("conformance");
    second["groups"][0]["task"]["args"] = json!(["601"]);
    second["groups"][0]["update"] = json!({"min_healthy_time": "1s", "healthy_deadline": "1h",
                                           "progress_deadline": "2h"});
    expect_json(
        Call::new("POST", "/api/v1/jobs").json(&second),
        client,
        server,
        200,
    )
    .await;
    let model = model_registration("conformance", 9, 1);
    let summary = expect_json(
        Call::new("POST", "/api/v1/models").json(&serde_json::to_value(&model).unwrap()),
        client,
        server,
        201,
    )
    .await;
    let digest = summary["digest"].as_str().unwrap().to_owned();
    let rollout = expect_json(
        Call::new("POST", "/api/v1/rollouts").json(&json!({"model": digest, "waves": "1"})),
        client,
        server,
        201,
    )
    .await;
    let rollout = rollout["id"].as_str().unwrap().to_owned();
    let member = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [5; 32]);
    expect_json(
        Call::new("POST", "/api/v1/identities")
            .json(&json!({"name": "member", "public_key": member.public()})),
        client,
        server,
        201,
    )
    .await;
    expect_json(
        Call::new(
            "PUT",
            format!("/api/v1/circles/lab/members/{}", member.id()),
        )
        .json(&json!({"role": "viewer"})),
        client,
        server,
        200,
    )
    .await;
    let api_key = expect_json(
        Call::new("POST", "/api/v1/circles/lab/api-keys").json(&json!({})),
        client,
        server,
        201,
    )
    .await;
    let mut circle = admin_governance();
    circle["name"] = "gov".into();
    expect_json(
        Call::new("POST", "/api/v1/circles").json(&circle),
        client,
        server,
        201,
    )
    .await;
    expect_json(
        Call::new("POST", "/api/v1/treasury/gov/deposits").json(&json!({"amount": 10})),
        client,
        server,
        200,
    )
    .await;
    let proposed = expect_json(
        Call::new("PUT", "/api/v1/circles/gov/governance").json(&admin_governance()),
        client,
        server,
        202,
    )
    .await;
    Fixtures {
        proposal: (
            proposed["proposal"].as_str().unwrap().to_owned(),
            proposed["digest"].as_str().unwrap().to_owned(),
        ),
        member: member.id().to_string(),
        api_key: api_key["id"].as_str().unwrap().to_owned(),
        node: "node-a".into(),
        node_key,
        other_node: "node-b".into(),
        join_token_id: token["id"].as_str().unwrap().to_owned(),
        join_token,
        job,
        alloc,
        digest,
        rollout,
        model,
        joiner,
    }
}

/// A valid request for the documented operation `METHOD path`, or `None` when the
/// test does not know how to make one (the test then fails, naming it).
fn valid_call(fx: &Fixtures, method: &str, path: &str) -> Option<Call> {
    let node = &fx.node;
    let call = match (method, path) {
        ("POST", "/api/v1/jobs") => Call::new(method, path).json(&small_job("conformance-2")),
        ("GET" | "DELETE", "/api/v1/jobs/{id}") => {
            Call::new(method, format!("/api/v1/jobs/{}", fx.job))
        }
        ("POST", "/api/v1/nodes") => registration_call(node, &fx.node_key, &fx.join_token),
        ("GET", "/api/v1/nodes/{id}") | ("GET", "/api/v1/nodes/{id}/allocations") => {
            Call::new(method, path.replace("{id}", node))
        }
        ("POST", "/api/v1/nodes/{id}/heartbeat") => {
            Call::new(method, format!("/api/v1/nodes/{node}/heartbeat"))
                .json(&json!({"gpus": []}))
                .signed(node, &fx.node_key)
        }
        ("GET", "/api/v1/nodes/{id}/assignments") => Call::new(
            method,
            format!("/api/v1/nodes/{node}/assignments?wait_ms=0"),
        )
        .signed(node, &fx.node_key),
        ("POST", "/api/v1/nodes/{id}/revoke") => {
            Call::new(method, format!("/api/v1/nodes/{}/revoke", fx.other_node))
        }
        ("POST", "/api/v1/nodes/{id}/drain") => {
            Call::new(method, format!("/api/v1/nodes/{}/drain", fx.other_node))
                .json(&json!({"max_parallel": 1}))
        }
        ("DELETE", "/api/v1/nodes/{id}/drain") => {
            Call::new(method, format!("/api/v1/nodes/{}/drain", fx.other_node))
        }
        ("GET", "/api/v1/allocations/{id}/logs") => {
            Call::new(method, format!("/api/v1/allocations/{}/logs", fx.alloc))
        }
        ("POST", "/api/v1/join-tokens") => {
            Call::new(method, path).json(&json!({"ttl_secs": 60, "max_uses": 1}))
        }
        ("DELETE", "/api/v1/join-tokens/{id}") => {
            Call::new(method, format!("/api/v1/join-tokens/{}", fx.join_token_id))
        }
        ("POST", "/api/v1/cluster/members") => {
            Call::new(method, path).json(&json!({"id": fx.joiner.0, "addr": fx.joiner.1}))
        }
        ("DELETE", "/api/v1/cluster/members/{id}") => {
            Call::new(method, format!("/api/v1/cluster/members/{}", fx.joiner.0))
        }
        ("POST", "/api/v1/models") => Call::new(method, path)
            .json(&serde_json::to_value(model_registration("other", 9, 1)).unwrap()),
        ("GET" | "DELETE", "/api/v1/models/{digest}") => {
            Call::new(method, format!("/api/v1/models/{}", fx.digest))
        }
        ("PUT", "/api/v1/models/{digest}/locations") => {
            Call::new(method, format!("/api/v1/models/{}/locations", fx.digest))
                .json(&json!({"locations": fx.model.locations, "expected_version": 1}))
        }
        ("PUT", "/api/v1/models/{digest}/health") => {
            Call::new(method, format!("/api/v1/models/{}/health", fx.digest)).json(&json!({
                "checked_at": 1_700_000_000_000u64, "shards": 6, "healthy": 5, "missing": 1,
                "corrupt": 0, "unreachable": 0, "lost_stripes": 0, "rebuilt": 1,
                "unrepairable": 0,
            }))
        }
        ("POST", "/api/v1/identities") => Call::new(method, path).json(&json!({
            "name": "another",
            "public_key": IdentityKey::from_seed(KeyAlgorithm::Ed25519MlDsa65, [6; 32]).public(),
        })),
        ("DELETE", "/api/v1/identities/{id}") => {
            Call::new(method, format!("/api/v1/identities/{}", fx.member))
        }
        ("GET", "/api/v1/circles/{circle}") => Call::new(method, "/api/v1/circles/lab"),
        ("PUT", "/api/v1/circles/{circle}/members/{identity}") => {
            Call::new(method, format!("/api/v1/circles/lab/members/{}", fx.member))
                .json(&json!({"role": "operator"}))
        }
        ("DELETE", "/api/v1/circles/{circle}/members/{identity}") => {
            Call::new(method, format!("/api/v1/circles/lab/members/{}", fx.member))
        }
        ("POST", "/api/v1/circles/{circle}/api-keys") => {
            Call::new(method, "/api/v1/circles/lab/api-keys").json(&json!({"name": "conformance"}))
        }
        ("GET", "/api/v1/circles/{circle}/api-keys") => {
            Call::new(method, "/api/v1/circles/lab/api-keys")
        }
        ("DELETE", "/api/v1/circles/{circle}/api-keys/{id}") => Call::new(
            method,
            format!("/api/v1/circles/lab/api-keys/{}", fx.api_key),
        ),
        ("GET", "/api/v1/jobs/{id}/versions") => {
            Call::new(method, format!("/api/v1/jobs/{}/versions", fx.job))
        }
        ("POST", "/api/v1/rollouts") => Call::new(method, path)
            .json(&json!({"model": fx.digest, "waves": "1,all", "abort_after": "10%"})),
        ("GET", "/api/v1/rollouts/{id}") => {
            Call::new(method, format!("/api/v1/rollouts/{}", fx.rollout))
        }
        ("GET", "/api/v1/jobs/{id}/deployment") => {
            Call::new(method, format!("/api/v1/jobs/{}/deployment", fx.job))
        }
        ("POST", "/api/v1/jobs/{id}/deployment/{action}") => {
            Call::new(method, format!("/api/v1/jobs/{}/deployment/pause", fx.job)).json(&json!({}))
        }
        ("POST", "/api/v1/jobs/{id}/revert") => {
            Call::new(method, format!("/api/v1/jobs/{}/revert", fx.job))
                .json(&json!({"version": 1}))
        }
        ("POST", "/api/v1/circles") => {
            let mut circle = admin_governance();
            circle["name"] = "gov2".into();
            Call::new(method, path).json(&circle)
        }
        ("GET", "/api/v1/circles/{circle}/governance") => {
            Call::new(method, "/api/v1/circles/gov/governance")
        }
        ("PUT", "/api/v1/circles/{circle}/governance") => {
            Call::new(method, "/api/v1/circles/gov/governance").json(&admin_governance())
        }
        ("GET", "/api/v1/proposals/{id}") => {
            Call::new(method, format!("/api/v1/proposals/{}", fx.proposal.0))
        }
        ("POST", "/api/v1/proposals/{id}/approvals") => {
            let digest: [u8; 32] = hex::decode(&fx.proposal.1).unwrap().try_into().unwrap();
            let signed = aigrid_consensus::human::sign_decision(
                &identity::admin_key(),
                &digest,
                aigrid_api::Decision::Approve,
            );
            Call::new(
                method,
                format!("/api/v1/proposals/{}/approvals", fx.proposal.0),
            )
            .json(&serde_json::to_value(signed).unwrap())
        }
        ("GET", "/api/v1/audit/proof") => Call::new(method, "/api/v1/audit/proof?index=0"),
        ("GET", "/api/v1/treasury/{circle}") => Call::new(method, "/api/v1/treasury/lab"),
        ("GET", "/api/v1/circles/{circle}/usage") => Call::new(method, "/api/v1/circles/lab/usage"),
        ("PUT", "/api/v1/circles/{circle}/quota") => Call::new(method, "/api/v1/circles/lab/quota")
            .json(&json!({"gpus": {"H100": 8}, "cpu_millis": 64000})),
        ("DELETE", "/api/v1/circles/{circle}/quota") => {
            Call::new(method, "/api/v1/circles/lab/quota")
        }
        ("GET", "/api/v1/treasury/{circle}/ledger") => {
            Call::new(method, "/api/v1/treasury/gov/ledger?limit=10")
        }
        ("POST", "/api/v1/treasury/{circle}/deposits") => {
            Call::new(method, "/api/v1/treasury/lab/deposits")
                .json(&json!({"amount": "12.5", "memo": "conformance"}))
        }
        ("POST", "/api/v1/treasury/{circle}/transfers") => {
            Call::new(method, "/api/v1/treasury/gov/transfers")
                .json(&json!({"to": "circle:lab", "amount": "1"}))
        }
        ("GET", "/api/v1/farmers/{identity}/ledger") => Call::new(
            method,
            format!("/api/v1/farmers/{}/ledger", identity::admin_key().id()),
        ),
        ("GET", "/v1/models/{model}") => Call::new(method, "/v1/models/conformance"),
        ("POST", "/v1/completions") => {
            Call::new(method, path).json(&json!({"model": "conformance", "prompt": "hi"}))
        }
        ("POST", "/v1/chat/completions") => Call::new(method, path).json(
            &json!({"model": "conformance", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        ("POST", "/v1/embeddings") => {
            Call::new(method, path).json(&json!({"model": "conformance", "input": "hi"}))
        }
        // Anything else without inputs: a plain GET.
        ("GET", _) if !path.contains('{') => Call::new(method, path),
        _ => return None,
    };
    Some(call)
}

/// Requests the operation must refuse: an unknown or malformed id in each path
/// parameter, a malformed value for each typed query parameter, a body of the wrong
/// shape and one that is not JSON. Signed operations are also sent unsigned.
fn invalid_calls(fx: &Fixtures, method: &str, path: &str, op: &Value) -> Vec<Call> {
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let in_path: Vec<&str> = params
        .iter()
        .filter(|p| p["in"] == "path")
        .filter_map(|p| p["name"].as_str())
        .collect();
    // The path with its parameters filled in validly, to vary one part at a time.
    let filled = valid_call(fx, method, path)
        .map(|c| c.target.split('?').next().unwrap().to_owned())
        .unwrap_or_else(|| path.to_owned());
    let mut calls = Vec::new();
    for name in &in_path {
        calls.push(Call::new(
            method,
            path.replace(&format!("{{{name}}}"), "no-such-id"),
        ));
    }
    for p in params.iter().filter(|p| p["in"] == "query") {
        let typed = matches!(
            p["schema"]["type"].as_str(),
            Some("boolean" | "integer" | "number")
        ) || p["schema"]["type"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "boolean" || t == "integer"));
        if typed {
            let name = p["name"].as_str().unwrap();
            calls.push(Call::new(method, format!("{filled}?{name}=not-a-value")));
        }
    }
    if op.get("requestBody").is_some() {
        calls.push(Call::new(method, &filled).json(&json!({"not_a_field": [1, 2]})));
        calls.push(Call::new(method, &filled).raw(b"{\"unterminated"));
    }
    if let Some(valid) = valid_call(fx, method, path) {
        if valid.headers.iter().any(|(h, _)| h == "signature") {
            let mut unsigned = Call::new(method, valid.target.clone());
            unsigned.body = valid.body.clone();
            unsigned.headers = valid
                .headers
                .iter()
                .filter(|(h, _)| h == "content-type")
                .cloned()
                .collect();
            calls.push(unsigned);
        }
    }
    calls
}

/// Order of the calls: reads and creations first, removals after, revocation last,
/// so every operation finds what the fixtures made.
fn phase(method: &str, path: &str) -> u8 {
    match (method, path) {
        (_, p) if p.ends_with("/revoke") => 2,
        ("DELETE", p) if p.ends_with("/drain") => 1,
        ("DELETE", _) => 2,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let cluster = Cluster::start(1, &[]);
    let client = http();
    let server = cluster.urls()[0].clone();
    wait_leader(
        &client,
        std::slice::from_ref(&server),
        Duration::from_secs(20),
    )
    .await;
    // A server for the membership operations: started as the test asks the cluster
    // to add it, so the test's request is the one that adds it (the server's own
    // request to join then finds it a member).
    let joiner_port = free_ports(1)[0];
    let mut joiner = ServerProc::new(
        2,
        joiner_port,
        cluster.root.path(),
        vec!["--join".into(), server.clone()],
    );
    let joiner_addr = peer_addr(joiner_port);

    let doc = get_json(&client, &format!("{server}/api/v1/openapi.json"))
        .await
        .expect("the OpenAPI document is served");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "not an OpenAPI 3.1 document: {}",
        doc["openapi"]
    );

    let mut operations: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            if ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method.as_str()) {
                operations.push((method, path.clone(), op.clone()));
            }
        }
    }
    operations.sort_by_key(|(m, p, _)| (phase(m, p), p.clone(), m.clone()));

    let documented: BTreeSet<String> = operations
        .iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    let missing: Vec<&str> = SERVED
        .iter()
        .copied()
        .filter(|r| !documented.contains(*r))
        .collect();
    assert!(
        missing.is_empty(),
        "served routes missing from the document: {missing:?}"
    );
    for route in &documented {
        assert!(
            SERVED.contains(&route.as_str()),
            "{route} is documented but not in this test's list of served routes"
        );
    }

    let fx = make_fixtures(&client, &server, (2, joiner_addr)).await;
    let mut checker = Checker::new(doc.clone());
    let mut failures = Vec::new();
    let mut no_valid = Vec::new();
    let mut no_invalid = Vec::new();
    for (method, path, op) in &operations {
        let name = format!("{method} {path}");
        let invalid = invalid_calls(&fx, method, path, op);
        if invalid.is_empty() {
            no_invalid.push(name.clone());
        }
        for call in invalid {
            let (status, content_type, body) = call.send(&client, &server).await;
            if !(400..500).contains(&status) {
                failures.push(format!(
                    "{name} (invalid: {} {}): answered {status}, not a 4xx: {}",
                    call.method,
                    call.target,
                    String::from_utf8_lossy(&body)
                ));
            }
            if let Err(e) = checker.check(method, path, status, &content_type, &body) {
                failures.push(format!("{name} (invalid: {}): {e}", call.target));
            }
        }
        let Some(call) = valid_call(&fx, method, path) else {
            no_valid.push(name);
            continue;
        };
        let joining = name == "POST /api/v1/cluster/members";
        let (status, content_type, body) = if joining {
            let start = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                joiner.start();
            };
            tokio::join!(call.send(&client, &server), start).0
        } else {
            call.send(&client, &server).await
        };
        // Adding a server answers 503 `timeout` when it has not become a voter within
        // the request timeout, as documented: it stays a learner until it catches up.
        let still_joining = joining
            && status == 503
            && serde_json::from_slice::<Value>(&body)
                .is_ok_and(|b| b["error"]["code"] == "timeout");
        // No model server runs in this cluster: the gateway answers a request for the
        // registered model with the documented 503 `model_not_ready`. A replica's own
        // answers are checked against the document in tests/serving.rs.
        let no_replica = path.starts_with("/v1/")
            && status == 503
            && serde_json::from_slice::<Value>(&body)
                .is_ok_and(|b| b["error"]["code"] == "model_not_ready");
        if still_joining {
            eprintln!("{name}: server {} is still a learner", fx.joiner.0);
        } else if no_replica {
            eprintln!("{name}: no replica of the model runs here");
        } else if !(200..300).contains(&status) {
            failures.push(format!(
                "{name} (valid: {}): answered {status}: {}",
                call.target,
                String::from_utf8_lossy(&body)
            ));
        }
        if let Err(e) = checker.check(method, path, status, &content_type, &body) {
            failures.push(format!("{name} (valid: {}): {e}", call.target));
        }
    }
    let joiner_log = joiner.log_tail();
    drop(joiner);
    assert!(
        no_valid.is_empty(),
        "documented operations this test cannot make a valid request for: {no_valid:?}"
    );
    eprintln!("operations with no input to make invalid: {no_invalid:?}");
    assert!(
        failures.is_empty(),
        "{} answers disagree with the document:\n{}\n{}\n--- joining server ---\n{joiner_log}",
        failures.len(),
        failures.join("\n"),
        cluster.logs()
    );
}
