//! Bad requests about jobs, models and the cluster get their status and error
//! code, and change nothing. (Nodes' are in `bad_node_input.rs`.)

use crate::common;

use std::time::Duration;

use common::bad_requests::*;
use common::*;
use serde_json::{json, Value};

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
