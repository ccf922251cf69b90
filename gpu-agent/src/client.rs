//! The agent's client of the control plane. Every request is signed with the node's
//! key. Any server answers any request (followers forward writes to the leader), so
//! the client sticks to one server while it answers and moves to the next on a
//! connection failure or a 5xx: leader changes and lost servers need nothing more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aigrid_api::signature::sign_request;
use aigrid_api::{ErrorBody, ErrorCode, JoinToken, NodeSigner, Timestamp};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::identity::Identity;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server could be reached or every one answered 5xx.
    #[error("no server answered: {0}")]
    Unavailable(String),
    /// A server refused the request.
    #[error("{status}: {message} ({code})")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The API's error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// A server answered something that is not the expected JSON.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The request URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// True when the servers do not accept this node's credentials.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }

    /// True for a 4xx answer: the request itself was refused.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if status.is_client_error())
    }

    /// The API's error code, when a server refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The file in an agent's data dir that keeps the cluster CA's fingerprint its join
/// token pinned, for the restarts that come without the token.
pub const PINNED_CA_FILE: &str = "cluster-ca.sha256";

/// The cluster CA this agent pins: the one its join token carries (remembered in
/// `data_dir` for later starts), else the one remembered there.
pub fn pinned_ca(
    data_dir: &std::path::Path,
    token: Option<&JoinToken>,
) -> std::io::Result<Option<aigrid_api::CaFingerprint>> {
    let path = data_dir.join(PINNED_CA_FILE);
    if let Some(ca) = token.and_then(|t| t.ca) {
        std::fs::write(&path, format!("{ca}\n"))?;
        return Ok(Some(ca));
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => text.parse().map(Some).map_err(|e: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The HTTP client an agent reaches the servers with. Under `https://` it trusts the
/// cluster CA `trust` names (its certificate, or its pinned fingerprint) and nothing
/// else; without one, the system's roots.
pub fn http_client(trust: Option<&aigrid_tls::ApiTrust>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(trust) = trust {
        let tls = aigrid_tls::api_client_config(trust).map_err(|e| e.to_string())?;
        builder = builder.tls_backend_preconfigured(tls);
    }
    builder
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

/// Signed requests to a list of servers.
#[derive(Clone)]
pub struct ControlClient {
    servers: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
    identity: Arc<Identity>,
}

/// Parses a comma-separated list of server URLs.
pub fn parse_servers(text: &str) -> Result<Vec<String>, String> {
    let servers: Vec<String> = text
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if servers.is_empty() {
        return Err("--servers needs at least one URL".to_owned());
    }
    if let Some(bad) = servers
        .iter()
        .find(|s| !(s.starts_with("http://") || s.starts_with("https://")))
    {
        return Err(format!(
            "--servers `{bad}` must start with http:// or https://"
        ));
    }
    Ok(servers)
}

/// The first of `servers` reached over plain HTTP at a host other than loopback:
/// requests to it, and the node's signatures, would cross the network readable.
pub fn plain_beyond_loopback(servers: &[String]) -> Option<&str> {
    servers.iter().map(String::as_str).find(|s| {
        let Ok(url) = reqwest::Url::parse(s) else {
            return false;
        };
        let host = url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => host.eq_ignore_ascii_case("localhost"),
        };
        url.scheme() == "http" && !loopback
    })
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(ms)
}

impl ControlClient {
    /// A client for `servers`, starting at the one `start` picks (spreading a fleet
    /// over the servers).
    pub fn new(
        servers: Vec<String>,
        http: reqwest::Client,
        identity: Arc<Identity>,
        start: usize,
    ) -> Self {
        let start = start % servers.len().max(1);
        ControlClient {
            servers: Arc::new(servers),
            current: Arc::new(AtomicUsize::new(start)),
            http,
            identity,
        }
    }

    /// The node this client signs for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Every server, comma-separated, starting with the one requests go to first
    /// (the one that last answered): what a client that fails over in list order,
    /// such as `aigrid --server`, should be given.
    pub fn servers_from_current(&self) -> String {
        let n = self.servers.len();
        let first = self.current.load(Ordering::Relaxed) % n.max(1);
        (0..n)
            .map(|step| self.servers[(first + step) % n].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sends a signed request, trying each server once starting with the current
    /// one, and decodes the success body. `timeout` bounds each attempt.
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        token: Option<&JoinToken>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let body = body.unwrap_or_default();
        let mut failures = Vec::new();
        let n = self.servers.len();
        let first = self.current.load(Ordering::Relaxed);
        for step in 0..n {
            let i = (first + step) % n;
            let server = &self.servers[i];
            let url = format!("{server}{path_and_query}");
            let signer = NodeSigner {
                node: &self.identity.node_id,
                key: &self.identity.key,
            };
            let mut nonce = [0u8; 16];
            rand::fill(&mut nonce[..]);
            let signed = sign_request(
                &signer,
                method.as_str(),
                path_and_query,
                &body,
                now().as_millis() / 1000,
                nonce,
            );
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            for (name, value) in signed.pairs() {
                req = req.header(name, value);
            }
            if !body.is_empty() {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            if let Some(token) = token {
                req = req.bearer_auth(token.to_string());
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    failures.push(format!("{server}: {}", root_cause(&e)));
                    continue;
                }
            };
            let status = resp.status();
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    failures.push(format!("{server}: {}", root_cause(&e)));
                    continue;
                }
            };
            if status.is_success() {
                self.current.store(i, Ordering::Relaxed);
                return serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
                    url,
                    reason: e.to_string(),
                });
            }
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.error.code, b.error.message),
                Err(_) => (
                    ErrorCode::Internal.as_str().to_owned(),
                    String::from_utf8_lossy(&bytes).trim().to_owned(),
                ),
            };
            // 5xx: this server cannot serve now (no quorum, cut off): try another.
            // 429: it is busy: another may not be.
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                failures.push(format!("{server}: {status} {message}"));
                continue;
            }
            self.current.store(i, Ordering::Relaxed);
            return Err(ClientError::Refused {
                status,
                code,
                message,
            });
        }
        // Start the next attempt from the server after the one we started from.
        self.current
            .store((first + 1) % n.max(1), Ordering::Relaxed);
        Err(ClientError::Unavailable(failures.join("; ")))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_list_starts_with_the_current_server() {
        let identity = Identity::new(aigrid_api::NodeId::new("n"), [1; 32]);
        let servers = vec![
            "http://a:1".to_owned(),
            "http://b:2".to_owned(),
            "http://c:3".to_owned(),
        ];
        let client = ControlClient::new(servers, reqwest::Client::new(), Arc::new(identity), 1);
        assert_eq!(
            client.servers_from_current(),
            "http://b:2,http://c:3,http://a:1"
        );
    }

    #[test]
    fn server_lists_parse() {
        assert_eq!(
            parse_servers("http://a:1/, https://b:2").unwrap(),
            ["http://a:1", "https://b:2"]
        );
        assert!(parse_servers(" , ").is_err());
        assert!(parse_servers("a:1").is_err());
    }

    #[test]
    fn plain_http_is_named_only_beyond_loopback() {
        let list = |s: &str| parse_servers(s).unwrap();
        let loopback = list("http://127.0.0.1:7700,http://[::1]:1,http://localhost:2");
        assert_eq!(plain_beyond_loopback(&loopback), None);
        assert_eq!(
            plain_beyond_loopback(&list("https://10.0.0.1:7700,https://server1:7700")),
            None
        );
        assert_eq!(
            plain_beyond_loopback(&list("https://a:1,http://10.0.0.2:7700")),
            Some("http://10.0.0.2:7700")
        );
        assert_eq!(
            plain_beyond_loopback(&list("http://server2:7700")),
            Some("http://server2:7700")
        );
    }
}
