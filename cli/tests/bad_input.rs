//! Bad requests get their status and error code, and change nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    message_has: &'static str,
    /// Sign as this node with the key made from this byte.
    sign: Option<(&'static str, u8)>,
    /// Present the join token.
    bearer: bool,
}

fn with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = job("bad");
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

fn case(
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
fn key(seed: u8) -> aigrid_api::NodeKey {
    aigrid_api::NodeKey::from_secret([seed; 32])
}

/// Adds the signature headers of `node` with `key` to a request.
fn signed(
    req: reqwest::RequestBuilder,
    method: &str,
    path: &str,
    body: &[u8],
    node: &str,
    key: &aigrid_api::NodeKey,
) -> reqwest::RequestBuilder {
    let node_id = aigrid_api::NodeId::new(node);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let timestamp = aigrid_api::Timestamp::from_millis(ms);
    let signature = key.sign(&aigrid_api::RequestToSign {
        method,
        path_and_query: path,
        node: &node_id,
        timestamp,
        body,
    });
    req.header("x-aigrid-node", node)
        .header("x-aigrid-timestamp", ms.to_string())
        .header("x-aigrid-signature", signature)
}

/// Sends each case and checks its status, error code and message.
async fn check(client: &reqwest::Client, url: &str, cases: Vec<Case>) {
    check_with_token(client, url, cases, "").await;
}

/// [`check`], presenting `token` in cases that ask for it.
async fn check_with_token(client: &reqwest::Client, url: &str, cases: Vec<Case>, token: &str) {
    for c in cases {
        let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
        let mut req = client
            .request(method, format!("{url}{}", c.path))
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        if let Some((node, seed)) = c.sign {
            req = signed(req, c.method, c.path, &c.body, node, &key(seed));
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
async fn snapshot(client: &reqwest::Client, url: &str) -> (Value, Value, Value) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_and_change_nothing() {
    let cluster = Cluster::start(1, &[]);
    let url = cluster.urls()[0].clone();
    let client = http();
    wait_leader(&client, std::slice::from_ref(&url), Duration::from_secs(20)).await;
    let resp = post_job(&client, &url, "good").await.unwrap();
    assert_eq!(resp.status(), 201);
    // Let the scheduler finish with it (no node can take it), so nothing else commits.
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let job = get_json(&client, &format!("{url}/api/v1/jobs/{id}"))
            .await
            .unwrap();
        if !job["unplaced"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never planned: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let before = snapshot(&client, &url).await;

    let cases = vec![
        case(
            "malformed JSON",
            b"{\"name\": \"x\", ".to_vec(),
            400,
            "invalid_json",
            "EOF",
        ),
        case(
            "not an object",
            b"[1,2]".to_vec(),
            400,
            "invalid_json",
            "invalid type",
        ),
        case(
            "unknown top-level field",
            with(|v| v["colour"] = json!("red")),
            400,
            "invalid_json",
            "colour",
        ),
        case(
            "unknown nested field",
            with(|v| v["groups"][0]["resources"]["tpus"] = json!(1)),
            400,
            "invalid_json",
            "groups[0].resources",
        ),
        case(
            "empty name",
            with(|v| v["name"] = json!("")),
            400,
            "invalid_field",
            "name",
        ),
        case(
            "zero cpu",
            with(|v| v["groups"][0]["resources"]["cpu_millis"] = json!(0)),
            400,
            "invalid_field",
            "groups[0].resources.cpu_millis",
        ),
        case(
            "zero memory",
            with(|v| v["groups"][0]["resources"]["memory_mib"] = json!(0)),
            400,
            "invalid_field",
            "groups[0].resources.memory_mib",
        ),
        case(
            "negative memory",
            with(|v| v["groups"][0]["resources"]["memory_mib"] = json!(-512)),
            400,
            "invalid_json",
            "groups[0].resources.memory_mib",
        ),
        case(
            "zero gpus",
            with(|v| v["groups"][0]["resources"]["gpus"]["count"] = json!(0)),
            400,
            "invalid_field",
            "gpus.count",
        ),
        case(
            "zero instances",
            with(|v| v["groups"][0]["count"] = json!(0)),
            400,
            "invalid_field",
            "groups[0].count",
        ),
        case(
            "priority above 100",
            with(|v| v["priority"] = json!(101)),
            400,
            "invalid_field",
            "priority",
        ),
        case(
            "unknown constraint op",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "country", "op": "~=", "value": "BE"}])
            }),
            400,
            "invalid_json",
            "groups[0].constraints[0].op",
        ),
        case(
            "constraint regex that does not compile",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "site", "op": "regex", "value": "(ghent"}])
            }),
            400,
            "invalid_field",
            "groups[0].constraints[0].value",
        ),
        case(
            "`in` with a single value",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "country", "op": "in", "value": "BE"}])
            }),
            400,
            "invalid_field",
            "takes a list",
        ),
        case(
            "`in` with an empty list",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "country", "op": "in", "value": []}])
            }),
            400,
            "invalid_field",
            "at least one value",
        ),
        case(
            "`=` with a list",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "country", "op": "=", "value": ["BE"]}])
            }),
            400,
            "invalid_field",
            "single value",
        ),
        case(
            "`>=` with a non-number",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "gpu.count", "op": ">=", "value": "many"}])
            }),
            400,
            "invalid_field",
            "not a number",
        ),
        case(
            "constraint value of the wrong type",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": "country", "op": "=", "value": 5}])
            }),
            400,
            "invalid_json",
            "a string or a list of strings",
        ),
        case(
            "constraint without an attribute",
            with(|v| {
                v["groups"][0]["constraints"] =
                    json!([{"attribute": " ", "op": "=", "value": "BE"}])
            }),
            400,
            "invalid_field",
            "groups[0].constraints[0].attribute",
        ),
        case(
            "oversized body",
            with(|v| v["groups"][0]["task"]["args"] = json!(vec!["x".repeat(1024); 1100])),
            413,
            "payload_too_large",
            "size limit",
        ),
        Case {
            what: "wrong content type",
            content_type: Some("application/xml"),
            ..case(
                "",
                with(|_| ()),
                415,
                "unsupported_media_type",
                "application/json",
            )
        },
        Case {
            what: "unknown job id",
            method: "GET",
            path: "/api/v1/jobs/no-such-job",
            ..case("", vec![], 404, "not_found", "no-such-job")
        },
        Case {
            what: "delete unknown job id",
            method: "DELETE",
            path: "/api/v1/jobs/no-such-job",
            ..case("", vec![], 404, "not_found", "no-such-job")
        },
        Case {
            what: "unknown node id",
            method: "GET",
            path: "/api/v1/nodes/no-such-node",
            ..case("", vec![], 404, "not_found", "no-such-node")
        },
        Case {
            what: "unknown route",
            method: "GET",
            path: "/api/v1/nope",
            ..case("", vec![], 404, "not_found", "/api/v1/nope")
        },
        Case {
            what: "wrong method",
            method: "PUT",
            path: "/api/v1/jobs",
            ..case("", vec![], 405, "method_not_allowed", "PUT")
        },
        Case {
            what: "leave of a non-member",
            method: "DELETE",
            path: "/api/v1/cluster/members/9",
            ..case("", vec![], 404, "not_found", "9")
        },
        Case {
            what: "unknown query parameter",
            method: "GET",
            path: "/api/v1/jobs?colour=red",
            ..case("", vec![], 400, "invalid_field", "colour")
        },
        Case {
            what: "leave with a non-numeric id",
            method: "DELETE",
            path: "/api/v1/cluster/members/two",
            ..case("", vec![], 400, "invalid_field", "")
        },
        Case {
            what: "join with a bad address",
            path: "/api/v1/cluster/members",
            ..case(
                "",
                br#"{"id": 5, "addr": "nowhere"}"#.to_vec(),
                400,
                "invalid_field",
                "addr",
            )
        },
        Case {
            what: "join of an existing member",
            path: "/api/v1/cluster/members",
            ..case(
                "",
                br#"{"id": 1, "addr": "127.0.0.1:1"}"#.to_vec(),
                409,
                "conflict",
                "already",
            )
        },
    ];

    check(&client, &url, cases).await;

    // The OpenAPI document describes the routes and the types they take.
    let doc = get_json(&client, &format!("{url}/api/v1/openapi.json"))
        .await
        .unwrap();
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/nodes",
        "/api/v1/cluster",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    for schema in ["JobSpec", "TaskGroup", "Job", "ErrorBody", "ClusterStatus"] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "openapi lacks {schema}"
        );
    }

    let after = snapshot(&client, &url).await;
    assert_eq!(before, after, "a rejected request changed the state");
}

/// A valid registration of node `id` with two simulated H100s, registering the key
/// made from `seed`.
fn registration(id: &str, seed: u8) -> Value {
    json!({
        "id": id,
        "name": id,
        "public_key": key(seed).public().to_string(),
        "attributes": {"country": "BE"},
        "resources": {
            "cpu_millis": 8000, "memory_mib": 65536, "disk_mib": 100000,
            "gpus": [
                {"index": 0, "uuid": format!("GPU-{id}-0"), "vendor": "nvidia",
                 "model": "NVIDIA H100", "memory_mib": 81920, "healthy": true},
                {"index": 1, "uuid": format!("GPU-{id}-1"), "vendor": "nvidia",
                 "model": "NVIDIA H100", "memory_mib": 81920, "healthy": true}
            ]
        }
    })
}

fn reg_with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = registration("fresh", FRESH);
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// Key seeds of the test's nodes.
const N1: u8 = 1;
const FRESH: u8 = 2;

/// A request about nodes, signed as `n1` (or, for registrations, as the node the
/// body registers) and presenting the join token.
fn node_case(
    what: &'static str,
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    has: &'static str,
) -> Case {
    let sign = if path == "/api/v1/nodes" {
        ("fresh", FRESH)
    } else {
        ("n1", N1)
    };
    Case {
        what,
        method,
        path,
        sign: Some(sign),
        bearer: true,
        ..case(what, body, status, code, has)
    }
}

/// A node request without a signature or token.
fn unsigned(c: Case) -> Case {
    Case {
        sign: None,
        bearer: false,
        ..c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_requests_are_rejected_and_change_nothing() {
    // A long TTL so the node registered below is not marked down mid-test.
    let cluster = Cluster::start(1, &["--node-ttl-ms", "600000"]);
    let url = cluster.urls()[0].clone();
    let client = http();
    wait_leader(&client, std::slice::from_ref(&url), Duration::from_secs(20)).await;
    let created: Value = client
        .post(format!("{url}/api/v1/join-tokens"))
        .json(&json!({"max_uses": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let register = |body: Value, token: &str| {
        let bytes = serde_json::to_vec(&body).unwrap();
        let mut req = client
            .post(format!("{url}/api/v1/nodes"))
            .header("content-type", "application/json")
            .body(bytes.clone());
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        signed(req, "POST", "/api/v1/nodes", &bytes, "n1", &key(N1)).send()
    };
    let resp = register(registration("n1", N1), &token).await.unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["id"], "n1");
    assert_eq!(body["created"], true);
    // Registering again refreshes the node: 200, not created; no token needed.
    let resp = register(registration("n1", N1), "").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["created"], false);
    let before = snapshot(&client, &url).await;

    let hb = |v: Value| serde_json::to_vec(&v).unwrap();
    let cases = vec![
        node_case(
            "malformed registration",
            "POST",
            "/api/v1/nodes",
            b"{\"id\": \"n2\", ".to_vec(),
            400,
            "invalid_json",
            "EOF",
        ),
        node_case(
            "registration without resources",
            "POST",
            "/api/v1/nodes",
            hb(json!({"id": "n2", "name": "n2"})),
            400,
            "invalid_json",
            "resources",
        ),
        node_case(
            "registration with an unknown field",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["colour"] = json!("red")),
            400,
            "invalid_json",
            "colour",
        ),
        node_case(
            "registration with a bad id",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["id"] = json!("a/b")),
            400,
            "invalid_field",
            "id",
        ),
        node_case(
            "registration with no CPU",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["resources"]["cpu_millis"] = json!(0)),
            400,
            "invalid_field",
            "resources.cpu_millis",
        ),
        node_case(
            "registration with a duplicate GPU uuid",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["resources"]["gpus"][1]["uuid"] = json!("GPU-fresh-0")),
            400,
            "invalid_field",
            "resources.gpus[1].uuid",
        ),
        node_case(
            "registration with a negative memory size",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["resources"]["gpus"][0]["memory_mib"] = json!(-1)),
            400,
            "invalid_json",
            "resources.gpus[0].memory_mib",
        ),
        Case {
            content_type: Some("text/xml"),
            ..node_case(
                "registration that is not JSON",
                "POST",
                "/api/v1/nodes",
                reg_with(|_| ()),
                415,
                "unsupported_media_type",
                "application/json",
            )
        },
        node_case(
            "oversized registration",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["attributes"]["x"] = json!("x".repeat(1_100_000))),
            413,
            "payload_too_large",
            "size limit",
        ),
        node_case(
            "heartbeat of an unknown node",
            "POST",
            "/api/v1/nodes/no-such-node/heartbeat",
            hb(json!({})),
            401,
            "unknown_node",
            "no-such-node",
        ),
        Case {
            sign: Some(("n1", FRESH)),
            ..node_case(
                "heartbeat signed by a key the node does not have",
                "POST",
                "/api/v1/nodes/n1/heartbeat",
                hb(json!({"gpus": [{"uuid": "GPU-n1-0", "healthy": false}]})),
                401,
                "unauthorized",
                "bad request signature",
            )
        },
        Case {
            sign: Some(("fresh", FRESH)),
            ..node_case(
                "heartbeat signed as another node",
                "POST",
                "/api/v1/nodes/n1/heartbeat",
                hb(json!({})),
                401,
                "unauthorized",
                "signed by node `fresh`",
            )
        },
        unsigned(node_case(
            "unsigned heartbeat",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            hb(json!({"gpus": [{"uuid": "GPU-n1-0", "healthy": false}]})),
            401,
            "unauthorized",
            "x-aigrid-node",
        )),
        unsigned(node_case(
            "unsigned poll for assignments",
            "GET",
            "/api/v1/nodes/n1/assignments",
            vec![],
            401,
            "unauthorized",
            "x-aigrid-node",
        )),
        Case {
            bearer: false,
            ..node_case(
                "registration of a new node without a join token",
                "POST",
                "/api/v1/nodes",
                reg_with(|_| ()),
                401,
                "unauthorized",
                "join token",
            )
        },
        Case {
            sign: Some(("n1", FRESH)),
            ..node_case(
                "registration of a known node with another key",
                "POST",
                "/api/v1/nodes",
                serde_json::to_vec(&registration("n1", FRESH)).unwrap(),
                401,
                "unauthorized",
                "another key",
            )
        },
        Case {
            sign: Some(("fresh", N1)),
            ..node_case(
                "registration signed with a key other than the one it registers",
                "POST",
                "/api/v1/nodes",
                reg_with(|_| ()),
                401,
                "unauthorized",
                "bad request signature",
            )
        },
        node_case(
            "registration without a public key",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| {
                v.as_object_mut().unwrap().remove("public_key");
            }),
            400,
            "invalid_field",
            "public_key",
        ),
        node_case(
            "heartbeat naming an unknown GPU",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            hb(json!({"gpus": [{"uuid": "GPU-nope", "healthy": false}]})),
            400,
            "invalid_field",
            "GPU-nope",
        ),
        node_case(
            "heartbeat naming another node's GPU",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            hb(json!({"gpus": [{"uuid": "GPU-fresh-0", "healthy": false}]})),
            400,
            "invalid_field",
            "gpus[0].uuid",
        ),
        node_case(
            "heartbeat with an empty GPU uuid",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            hb(json!({"gpus": [{"uuid": "", "healthy": false}]})),
            400,
            "invalid_field",
            "gpus[0].uuid",
        ),
        node_case(
            "heartbeat with an unknown field",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            hb(json!({"load": 0.5})),
            400,
            "invalid_json",
            "load",
        ),
        node_case(
            "heartbeat with an unknown allocation state",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            hb(json!({"allocations": [{"id": "a1", "state": "sleeping"}]})),
            400,
            "invalid_json",
            "allocations[0].state",
        ),
        node_case(
            "heartbeat that is not JSON",
            "POST",
            "/api/v1/nodes/n1/heartbeat",
            b"alive".to_vec(),
            400,
            "invalid_json",
            "",
        ),
        node_case(
            "drain with max_parallel 0",
            "POST",
            "/api/v1/nodes/n1/drain",
            hb(json!({"max_parallel": 0})),
            400,
            "invalid_field",
            "max_parallel",
        ),
        node_case(
            "drain with a negative max_parallel",
            "POST",
            "/api/v1/nodes/n1/drain",
            hb(json!({"max_parallel": -1})),
            400,
            "invalid_json",
            "max_parallel",
        ),
        node_case(
            "drain with an unknown field",
            "POST",
            "/api/v1/nodes/n1/drain",
            hb(json!({"deadline": "1h"})),
            400,
            "invalid_json",
            "deadline",
        ),
        node_case(
            "drain of an unknown node",
            "POST",
            "/api/v1/nodes/no-such-node/drain",
            vec![],
            404,
            "not_found",
            "no-such-node",
        ),
        node_case(
            "undrain of an unknown node",
            "DELETE",
            "/api/v1/nodes/no-such-node/drain",
            vec![],
            404,
            "not_found",
            "no-such-node",
        ),
        node_case(
            "allocations of an unknown node",
            "GET",
            "/api/v1/nodes/no-such-node/allocations",
            vec![],
            404,
            "not_found",
            "no-such-node",
        ),
        node_case(
            "allocations with an unknown query parameter",
            "GET",
            "/api/v1/nodes/n1/allocations?colour=red",
            vec![],
            400,
            "invalid_field",
            "colour",
        ),
        node_case(
            "wrong method on drain",
            "PUT",
            "/api/v1/nodes/n1/drain",
            vec![],
            405,
            "method_not_allowed",
            "PUT",
        ),
    ];
    check_with_token(&client, &url, cases, &token).await;

    // A token that is not one the servers made.
    let forged = format!("aigrid-join.{}.{}", "0".repeat(16), "1".repeat(64));
    let bytes = serde_json::to_vec(&registration("fresh", FRESH)).unwrap();
    let req = client
        .post(format!("{url}/api/v1/nodes"))
        .header("content-type", "application/json")
        .bearer_auth(&forged)
        .body(bytes.clone());
    let resp = signed(req, "POST", "/api/v1/nodes", &bytes, "fresh", &key(FRESH))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");

    let doc = get_json(&client, &format!("{url}/api/v1/openapi.json"))
        .await
        .unwrap();
    for path in [
        "/api/v1/nodes",
        "/api/v1/nodes/{id}",
        "/api/v1/nodes/{id}/heartbeat",
        "/api/v1/nodes/{id}/drain",
        "/api/v1/nodes/{id}/allocations",
        "/api/v1/nodes/{id}/assignments",
        "/api/v1/nodes/{id}/revoke",
        "/api/v1/join-tokens",
        "/api/v1/allocations/{id}/logs",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }

    let after = snapshot(&client, &url).await;
    assert_eq!(before, after, "a rejected request changed the state");
}
