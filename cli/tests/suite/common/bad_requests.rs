//! Bad requests as cases: what is sent (method, path, body, signature, token) and
//! the status, error code and message that must come back; and a snapshot of the
//! state they must leave alone.

use serde_json::Value;

use super::{get_json, job};

/// One bad request: what is sent and what must come back.
pub struct Case {
    pub what: &'static str,
    pub method: &'static str,
    pub path: &'static str,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
    pub status: u16,
    pub code: &'static str,
    pub message_has: &'static str,
    /// Sign as this node with the key made from this byte.
    pub sign: Option<(&'static str, u8)>,
    /// Present the join token.
    pub bearer: bool,
}

pub fn with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = job("bad");
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

pub fn case(
    what: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    has: &'static str,
) -> Case {
    Case {
        what,
        method: "POST",
        path: "/api/v1/jobs",
        content_type: Some("application/json"),
        body,
        status,
        code,
        message_has: has,
        sign: None,
        bearer: false,
    }
}

/// The key a test node signs with, made from one byte.
pub fn key(seed: u8) -> aigrid_api::NodeKey {
    aigrid_api::NodeKey::from_secret([seed; 32])
}

/// Adds the signature headers of `node` with `key` to a request.
pub fn signed(
    req: reqwest::RequestBuilder,
    method: &str,
    path: &str,
    body: &[u8],
    node: &str,
    key: &aigrid_api::NodeKey,
) -> reqwest::RequestBuilder {
    let node_id = aigrid_api::NodeId::new(node);
    let signer = aigrid_api::NodeSigner {
        node: &node_id,
        key,
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut nonce = [0u8; 16];
    rand::fill(&mut nonce[..]);
    let headers = aigrid_api::signature::sign_request(&signer, method, path, body, created, nonce);
    let mut req = req;
    for (name, value) in headers.pairs() {
        req = req.header(name, value);
    }
    req
}

/// Whether `METHOD path` is one of the agents' routes (registration, heartbeat,
/// assignments), which people's identities do not sign.
fn is_agent_route(method: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    match method {
        "POST" => path == "/api/v1/nodes" || path.ends_with("/heartbeat"),
        "GET" => path.ends_with("/assignments"),
        _ => false,
    }
}

/// Sends each case and checks its status, error code and message.
pub async fn check(client: &reqwest::Client, url: &str, cases: Vec<Case>) {
    check_with_token(client, url, cases, "").await;
}

/// [`check`], presenting `token` in cases that ask for it.
pub async fn check_with_token(client: &reqwest::Client, url: &str, cases: Vec<Case>, token: &str) {
    for c in cases {
        let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
        let mut req = client
            .request(method, format!("{url}{}", c.path))
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        // Requests to the control API not signed as a node are signed by the
        // tests' admin: a bad request must be refused for what it says, not for who
        // sent it. The agents' routes take node signatures only.
        match c.sign {
            Some((node, seed)) => req = signed(req, c.method, c.path, &c.body, node, &key(seed)),
            None if !is_agent_route(c.method, c.path) => req = super::Sign::signed(req),
            None => {}
        }
        if c.bearer {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: body is not JSON: {e}", c.what));
        assert_eq!(status, c.status, "{}: {body}", c.what);
        assert_eq!(body["error"]["code"], c.code, "{}: {body}", c.what);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(c.message_has),
            "{}: message `{message}` lacks `{}`",
            c.what,
            c.message_has
        );
    }
}

/// What a rejected request must leave alone: jobs, nodes and the commit index.
pub async fn snapshot(client: &reqwest::Client, url: &str) -> (Value, Value, Value) {
    let jobs = get_json(client, &format!("{url}/api/v1/jobs"))
        .await
        .unwrap();
    let nodes = get_json(client, &format!("{url}/api/v1/nodes"))
        .await
        .unwrap();
    let cluster = get_json(client, &format!("{url}/api/v1/cluster"))
        .await
        .unwrap();
    (jobs, nodes, cluster["commit_index"].clone())
}
