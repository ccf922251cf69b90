//! Tests across the gateway's modules.

use std::collections::HashSet;

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue};

use super::balancer::*;
use super::error::*;
use super::relay::*;
use super::table::*;
use crate::state::models::ModelName;

/// A routing table of `(digest, name, registered at)` models and
/// `(digest, endpoint)` replicas.
fn routes_for(models: &[(&str, &str, u64)], servers: &[(&str, &str)]) -> Routes {
    let models = models
        .iter()
        .map(|(digest, name, at)| ModelName {
            digest: (*digest).to_owned(),
            name: (*name).to_owned(),
            created_at: aigrid_api::Timestamp::from_millis(*at),
        })
        .collect();
    let servers = servers
        .iter()
        .map(|(digest, endpoint)| (*digest, (*endpoint).to_owned()))
        .collect();
    Routes::build(1, models, servers, HashSet::new())
}

const A: &str = "aaaaaa11aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "aaaaaa22bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

fn found<'a>(r: Resolution<'a>) -> &'a str {
    match r {
        Resolution::Found(m) => &m.digest,
        other => panic!("not found: {other:?}"),
    }
}

#[test]
fn names_digests_and_prefixes_resolve() {
    // Two pushes of `llama` (B newer) and one of `qwen`; only A has a replica.
    let routes = routes_for(
        &[(A, "llama", 1_000), (B, "llama", 2_000), (C, "qwen", 500)],
        &[(A, "http://10.0.0.1:9000")],
    );
    assert_eq!(
        found(routes.resolve("llama")),
        A,
        "the newest model of the name that has a replica"
    );
    assert_eq!(found(routes.resolve("qwen")), C, "else the newest");
    assert_eq!(found(routes.resolve(B)), B);
    assert_eq!(found(routes.resolve(&B.to_uppercase())), B);
    assert_eq!(found(routes.resolve("aaaaaa2")), B);
    assert_eq!(found(routes.resolve("cccccc")), C);
    assert_eq!(routes.resolve("aaaaaa"), Resolution::Ambiguous(2));
    assert_eq!(routes.resolve("ccccc"), Resolution::Unknown, "too short");
    assert_eq!(routes.resolve("mistral"), Resolution::Unknown);
    assert_eq!(routes.resolve("dddddddd"), Resolution::Unknown);

    let unserved = routes_for(&[(A, "llama", 1_000), (B, "llama", 2_000)], &[]);
    assert_eq!(found(unserved.resolve("llama")), B);
}

#[test]
fn only_the_model_field_is_read() {
    assert_eq!(
        requested_model(br#"{"messages": [], "model": "llama", "stream": true}"#).unwrap(),
        "llama"
    );
    for body in [
        &br#"{"prompt": "hi"}"#[..],
        br#"{"model": 7}"#,
        br#"{"model": ""}"#,
    ] {
        assert_eq!(requested_model(body), Err(GatewayError::MissingModel));
    }
    assert!(matches!(
        requested_model(b"not json"),
        Err(GatewayError::InvalidJson(_))
    ));
    assert!(matches!(
        requested_model(b"[1, 2]"),
        Err(GatewayError::InvalidJson(_))
    ));
}

#[test]
fn errors_take_openai_shape_with_one_status_each() {
    let cases = [
        (
            GatewayError::MissingModel,
            400,
            "invalid_request_error",
            "missing_model",
        ),
        (
            GatewayError::TooLarge { limit: 1 },
            413,
            "invalid_request_error",
            "request_too_large",
        ),
        (
            GatewayError::ModelNotFound("x".into()),
            404,
            "invalid_request_error",
            "model_not_found",
        ),
        (
            GatewayError::NotReady {
                model: "x".into(),
                replicas: 2,
                unreachable: 0,
                deploying: true,
            },
            503,
            "server_error",
            "model_not_ready",
        ),
        (
            GatewayError::RateLimited { limit: 1 },
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
        ),
    ];
    for (error, status, kind, code) in cases {
        assert_eq!(error.parts().0.as_u16(), status, "{error}");
        let body = serde_json::to_value(error.body()).unwrap();
        assert_eq!(body["error"]["type"], kind);
        assert_eq!(body["error"]["code"], code);
        assert!(
            body["error"].get("param").is_some(),
            "param is always present"
        );
        assert!(body["error"]["message"].as_str().unwrap().len() > 5);
    }
    let loading = GatewayError::NotReady {
        model: "llama".into(),
        replicas: 2,
        unreachable: 0,
        deploying: true,
    };
    assert!(loading.to_string().contains("2 replicas"), "{loading}");
    assert!(loading.to_string().contains("loading"), "{loading}");
    // Deployed, no replica started yet: loading, not "deploy it".
    let placing = GatewayError::NotReady {
        model: "llama".into(),
        replicas: 0,
        unreachable: 0,
        deploying: true,
    };
    assert!(placing.to_string().contains("loading"), "{placing}");
    assert!(!placing.to_string().contains("deploy it"), "{placing}");
    let undeployed = GatewayError::NotReady {
        model: "llama".into(),
        replicas: 0,
        unreachable: 0,
        deploying: false,
    };
    assert!(undeployed.to_string().contains("deploy it"), "{undeployed}");
    // A refused body may be left unread: only a 413 closes its connection.
    use axum::response::IntoResponse;
    let closes = |e: GatewayError| {
        e.into_response()
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v == "close")
    };
    assert!(closes(GatewayError::TooLarge { limit: 1 }));
    assert!(!closes(GatewayError::MissingModel));
}

#[test]
fn defaults_are_valid_and_zero_limits_are_not() {
    assert!(GatewayConfig::default().validate().is_ok());
    let bad = GatewayConfig {
        probe_interval: Duration::ZERO,
        ..GatewayConfig::default()
    };
    assert!(bad.validate().unwrap_err().contains("probe interval"));
    let bad = GatewayConfig {
        max_in_flight: 0,
        ..GatewayConfig::default()
    };
    assert!(bad.validate().is_err());
}

#[test]
fn hop_by_hop_headers_stay_behind() {
    assert!(hop_by_hop(&header::TRANSFER_ENCODING));
    assert!(hop_by_hop(&header::CONNECTION));
    assert!(!hop_by_hop(&header::CONTENT_TYPE));
    let mut from = HeaderMap::new();
    from.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk"));
    from.insert(
        header::ACCEPT,
        HeaderValue::from_static("text/event-stream"),
    );
    let sent = forwarded_request_headers(&from);
    assert!(
        sent.get(header::AUTHORIZATION).is_none(),
        "credentials stay"
    );
    assert_eq!(sent[header::ACCEPT], "text/event-stream");
    assert_eq!(sent[header::CONTENT_TYPE], "application/json");
}
