//! The control API client used by the subcommands. Every request is signed with the
//! caller's identity ([`crate::keys`]) when it has one.
//!
//! `https://` servers are trusted under the cluster CA this process was told of once,
//! at start ([`trust`]): `--ca-cert FILE` for the client commands, or the server's
//! own CA for the roles that call their own API. Without one, the system's roots.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aigrid_api::{ErrorBody, IdentityKey, ProposalCreated};
use aigrid_tls::ApiTrust;
use anyhow::{anyhow, bail, Context};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A client of one or more servers; any server answers any request (followers forward
/// to the leader), so a server that cannot be reached is simply skipped.
pub struct Client {
    servers: Vec<String>,
    http: reqwest::Client,
    key: Option<Arc<IdentityKey>>,
}

/// The cluster CA this process trusts, set once at start.
static TRUST: OnceLock<ApiTrust> = OnceLock::new();

/// Makes `trust` the CA every [`Client`] of this process trusts; the first call wins.
pub fn trust(trust: ApiTrust) {
    let _ = TRUST.set(trust);
}

/// The cluster CA this process trusts, if it was told of one.
pub fn trusted() -> Option<ApiTrust> {
    TRUST.get().cloned()
}

/// Trusts the CA certificate in `path` (`--ca-cert`).
pub fn trust_ca_file(path: &std::path::Path) -> anyhow::Result<()> {
    let ca = aigrid_tls::ca::read_ca_cert(path).map_err(|e| anyhow!("--ca-cert: {e}"))?;
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("--ca-cert {}", path.display()))?;
    trust(ApiTrust::CaCert(ca));
    let _ = TRUSTED_PEM.set(pem);
    Ok(())
}

/// The PEM text of the CA certificate this process was told to trust
/// (`--ca-cert`, `AIGRID_CA_CERT_PEM`), to hand on to the model servers an agent
/// starts.
pub fn trusted_pem() -> Option<String> {
    TRUSTED_PEM.get().cloned()
}

static TRUSTED_PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Trusts the CA certificate given as PEM text in `AIGRID_CA_CERT_PEM`, as an
/// agent hands it to the model servers it starts; a no-op when it is not set.
pub fn trust_ca_variable() -> anyhow::Result<()> {
    let variable = aigrid_agent::model_server::CA_PEM_VARIABLE;
    let Ok(pem) = std::env::var(variable) else {
        return Ok(());
    };
    let ca = aigrid_tls::ca::ca_cert_from_pem(&pem, std::path::Path::new(variable))
        .map_err(|e| anyhow!("{e}"))?;
    trust(ApiTrust::CaCert(ca));
    let _ = TRUSTED_PEM.set(pem);
    Ok(())
}

/// An HTTP client builder that trusts the process's cluster CA, if it has one.
pub fn http_builder() -> anyhow::Result<reqwest::ClientBuilder> {
    let builder = reqwest::Client::builder();
    Ok(match TRUST.get() {
        Some(trust) => builder.tls_backend_preconfigured(
            aigrid_tls::api_client_config(trust).context("the cluster CA's TLS settings")?,
        ),
        None => builder,
    })
}

impl Client {
    /// A client for a comma-separated list of base URLs, signing with `key` (requests
    /// go unsigned without one).
    pub fn new(servers: &str, key: Option<Arc<IdentityKey>>) -> anyhow::Result<Self> {
        let servers: Vec<String> = servers
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            bail!("--server needs at least one URL");
        }
        for s in &servers {
            if !(s.starts_with("http://") || s.starts_with("https://")) {
                bail!("--server `{s}` must start with http:// or https://");
            }
        }
        let http = http_builder()?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { servers, http, key })
    }

    /// The identity key requests are signed with, if any.
    pub fn key(&self) -> Option<&IdentityKey> {
        self.key.as_deref()
    }

    /// The server URLs, in order.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Sends a request whose success has no body (204).
    pub async fn call_no_content(&self, method: Method, path: &str) -> anyhow::Result<()> {
        self.call::<(), serde::de::IgnoredAny>(method, path, None)
            .await
            .map(|_| ())
    }

    /// Sends a request and decodes a success body, or turns the API's error body into
    /// a one-line error.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let (_, bytes) = self.send(method, path, body).await?;
        decode(&bytes, path)
    }

    /// As [`Client::call`], for a change a circle's policy may guard: the answer, or
    /// the proposal made in its place (202).
    pub async fn call_guarded<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<Answer<T>> {
        let (status, bytes) = self.send(method, path, body).await?;
        if status == StatusCode::ACCEPTED {
            return decode(&bytes, path).map(Answer::Proposed);
        }
        decode(&bytes, path).map(Answer::Done)
    }

    /// The success body of a GET, byte for byte.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let (_, bytes) = self.send::<()>(Method::GET, path, None).await?;
        Ok(bytes)
    }

    /// Sends a request and answers a success's status and body, or turns the API's
    /// error body into a one-line error.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<(StatusCode, Vec<u8>)> {
        let mut last_error = None;
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).context("encoding the request")?),
            None => None,
        };
        for server in &self.servers {
            let mut req = self.http.request(method.clone(), format!("{server}{path}"));
            if let Some(key) = &self.key {
                let signed =
                    crate::keys::sign(key, method.as_str(), path, body.as_deref().unwrap_or(&[]));
                for (name, value) in signed.pairs() {
                    req = req.header(name, value);
                }
            }
            if let Some(body) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    last_error = Some(anyhow!("cannot reach {server}: {}", root_cause(&e)));
                    continue;
                }
            };
            let status = resp.status();
            let bytes = resp.bytes().await.context("reading the response")?;
            if status == StatusCode::NO_CONTENT {
                return Ok((status, b"null".to_vec()));
            }
            if status.is_success() {
                return Ok((status, bytes.to_vec()));
            }
            let mut message = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => format!("{} ({})", body.error.message, body.error.code),
                Err(_) => format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
            };
            if status == StatusCode::UNAUTHORIZED && self.key.is_none() {
                message.push_str(
                    "; this client has no identity: make one with `aigrid key new` and ask an \
                     admin to add it (`aigrid identity add`), or pass --key FILE",
                );
            }
            // A server without quorum may be the one cut off: try the others.
            if status == StatusCode::SERVICE_UNAVAILABLE {
                last_error = Some(anyhow!("{server}: {message}"));
                continue;
            }
            bail!("{message}");
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no server to ask")))
    }
}

/// What a guarded write came to.
pub enum Answer<T> {
    /// Applied and committed.
    Done(T),
    /// Guarded by its circle: proposed, nothing applied until its quorum approves.
    Proposed(ProposalCreated),
}

fn decode<T: DeserializeOwned>(bytes: &[u8], path: &str) -> anyhow::Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("unexpected response to {path}"))
}

/// Prints what a guarded write came to when it was proposed, as `--json` or a line
/// saying what happens next; answers the value when it was applied.
pub fn proposed_or<T>(answer: Answer<T>, json: bool) -> anyhow::Result<Option<T>> {
    match answer {
        Answer::Done(value) => Ok(Some(value)),
        Answer::Proposed(created) => {
            if json {
                crate::output::print_json(&created)?;
            } else {
                println!(
                    "proposal {} {}: circle `{}` guards {}; nothing changes until its members \
                     approve (aigrid proposal show {})",
                    created.proposal, created.state, created.circle, created.kind, created.proposal
                );
                println!("digest {}", created.digest);
            }
            Ok(None)
        }
    }
}

/// `id` checked to be one path segment, so it cannot reach another route.
pub fn path_segment(id: &str) -> anyhow::Result<&str> {
    if id.is_empty() || id.contains(['/', '?', '#', '%']) || id.chars().any(char::is_whitespace) {
        bail!("`{id}` is not a valid id");
    }
    Ok(id)
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
