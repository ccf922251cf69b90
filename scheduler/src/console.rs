//! The web console at `/ui`: a page and its script, built into the binary, served by
//! every server beside the API it calls.
//!
//! The console holds no authority of its own. Its files are the same for everyone
//! and carry no data; every page reads the control API the way the CLI does, each
//! request signed in the browser with the person's identity key (WebCrypto
//! ed25519, imported into the browser and kept there as a key that cannot be
//! exported). A stranger gets the page and, without a key the cluster knows, the
//! API's 401 on every read. There are no cookies, so another site cannot make a
//! browser act for its user, and the answers forbid framing, inline scripts and
//! requests anywhere but this server.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The console's files: name, media type, content.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../console/console.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/console.js"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/pages.js"),
    ),
    (
        "ui.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/ui.js"),
    ),
    (
        "sign.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/sign.js"),
    ),
];

/// What the browser may do with the console's pages: scripts and styles from this
/// server only, requests to this server only, no frames, no forms posted away.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The console's routes: `/ui` (to `/ui/`), `/ui/` (the page) and its files.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset("index.html") }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
}

/// One of the console's files, or 404 in the API's error shape.
fn asset(name: &str) -> Response {
    let Some((_, media_type, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": {
                "code": "not_found",
                "message": format!("the console has no file `{name}`"),
            }})),
        )
            .into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, *media_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // A new binary brings new files: the browser asks again each time.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    #[tokio::test]
    async fn files_are_served_with_their_type_and_policy_and_nothing_else_is() {
        let page = asset("index.html");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"));
        let body = to_bytes(page.into_body(), 1 << 20).await.unwrap();
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("src=\"console.js\""));

        for missing in ["../Cargo.toml", "console.rs", "", "INDEX.HTML"] {
            assert_eq!(asset(missing).status(), StatusCode::NOT_FOUND, "{missing}");
        }
    }

    /// The page runs under a policy that forbids inline scripts and handlers: none
    /// may hide in it, or the browser would refuse it.
    #[test]
    fn no_file_relies_on_inline_script() {
        let (_, _, page) = ASSETS.iter().find(|(n, _, _)| *n == "index.html").unwrap();
        assert!(!page.contains("<script>"));
        assert!(!page.contains(" onclick="));
        assert!(!page.contains("style=\""));
        for (name, _, body) in ASSETS {
            assert!(!body.contains("innerHTML"), "{name} writes HTML from data");
            assert!(!body.contains("eval("), "{name} evaluates text");
        }
    }
}
