//! Bad requests about nodes (registrations, heartbeats, drains, join tokens,
//! signatures) get their status and error code, and change nothing.

use crate::common;

use std::time::Duration;

use common::bad_requests::*;
use common::*;
use serde_json::{json, Value};

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
    // The agents' routes are signed by a node; an operator's (drain, revoke) by the
    // tests' admin.
    let sign = if path == "/api/v1/nodes" {
        Some(("fresh", FRESH))
    } else if ["/drain", "/revoke", "/allocations"]
        .iter()
        .any(|end| path.split('?').next().unwrap_or(path).ends_with(end))
    {
        None
    } else {
        Some(("n1", N1))
    };
    Case {
        what,
        method,
        path,
        sign,
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
        .signed()
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
    assert_eq!(
        body["address"], "127.0.0.1",
        "where the registration came from"
    );
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
            "registration naming its own address",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["address"] = json!("203.0.113.7")),
            400,
            "invalid_json",
            "address",
        ),
        node_case(
            "a data port certificate request without a TLS data port",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["data_csr"] = json!("-----BEGIN CERTIFICATE REQUEST-----")),
            400,
            "invalid_field",
            "data_csr",
        ),
        node_case(
            "a data port certificate request that is none",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| {
                v["data_port"] = json!(7800);
                v["data_tls"] = json!(true);
                v["data_csr"] = json!("not a certificate request");
            }),
            400,
            "invalid_field",
            "not a PEM certificate request",
        ),
        node_case(
            "an oversized data port certificate request",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| {
                v["data_port"] = json!(7800);
                v["data_tls"] = json!(true);
                v["data_csr"] = json!("A".repeat(9000));
            }),
            400,
            "invalid_field",
            "at most 8192 bytes",
        ),
        node_case(
            "registration with an empty port range",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["ports"] = json!({"first": 30000, "last": 29999})),
            400,
            "invalid_field",
            "ports",
        ),
        node_case(
            "registration with port 0",
            "POST",
            "/api/v1/nodes",
            reg_with(|v| v["ports"] = json!({"first": 0, "last": 10})),
            400,
            "invalid_field",
            "ports",
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
            "not signed",
        )),
        unsigned(node_case(
            "unsigned poll for assignments",
            "GET",
            "/api/v1/nodes/n1/assignments",
            vec![],
            401,
            "unauthorized",
            "not signed",
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
