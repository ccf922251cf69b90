//! An agent's private data port: its shard service (the dispersed store's disk on
//! this node) and the chunks of its model cache, served to peers staging a model.
//!
//! Beyond loopback the port serves TLS under a node certificate from the cluster
//! CA (or with `--data-tls` on loopback too): the agent makes the key, asks for the
//! certificate with its registration, and serves once it is issued; or it loads
//! one issued ahead (`--data-tls-dir`). On TLS the peer routes (`/.peer/…`) answer
//! only connections that presented a cluster member's certificate (a node's or a
//! server's); anyone else gets 403 and nothing is read. The shard routes keep
//! answering any client that trusts the CA, as the store's other backends do.
//! Plain HTTP stays for loopback (a one-machine grid), or beyond it under
//! `--insecure`, which is warned at every start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aigrid_scheduler::listener::{ListenerLimits, ListenerMetrics};
use aigrid_tls::{ApiTrust, ClientCertificate, NodeIdentity, NodeKeyRequest};
use anyhow::{anyhow, bail, Context};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// How the data port is secured, as the flags chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataTlsChoice {
    /// Plain HTTP: on loopback, or beyond it under `--insecure`.
    Plain,
    /// A certificate asked for with the registration, naming these hosts.
    Request(Vec<String>),
    /// A certificate issued ahead, in this directory (`node.pem`, `node.key`).
    Held(PathBuf),
}

impl DataTlsChoice {
    /// The choice for a data port on `listen`: `held` wins; loopback is plain unless
    /// `tls`; beyond loopback TLS unless `insecure`. `hosts` are the names the
    /// certificate adds to the machine's host name and loopback.
    pub fn resolve(
        listen: SocketAddr,
        tls: bool,
        held: Option<PathBuf>,
        insecure: bool,
        hosts: &[String],
    ) -> Self {
        if let Some(dir) = held {
            return DataTlsChoice::Held(dir);
        }
        if !tls && (listen.ip().is_loopback() || insecure) {
            return DataTlsChoice::Plain;
        }
        let mut names = vec![
            hostname(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
        names.extend(hosts.iter().cloned());
        let mut seen = std::collections::BTreeSet::new();
        names.retain(|h| !h.is_empty() && seen.insert(h.clone()));
        DataTlsChoice::Request(names)
    }
}

/// The machine's host name, as the kernel reports it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// The data port's identity while the agent starts: held already, or asked for.
pub enum DataIdentity {
    /// No TLS.
    Plain,
    /// Loaded from a directory.
    Held(NodeIdentity),
    /// Asked for with the registration; the key waits for its certificate.
    Requested(NodeKeyRequest),
}

impl DataIdentity {
    /// What `choice` makes of node `node`: its key and request, or its certificate
    /// (which must come from the CA the agent trusts, when it knows one).
    pub fn prepare(
        choice: &DataTlsChoice,
        node: &str,
        trust: Option<&ApiTrust>,
    ) -> anyhow::Result<Self> {
        Ok(match choice {
            DataTlsChoice::Plain => DataIdentity::Plain,
            DataTlsChoice::Request(hosts) => DataIdentity::Requested(
                NodeKeyRequest::new(node, hosts)
                    .map_err(|e| anyhow!("the data port's key: {e}"))?,
            ),
            DataTlsChoice::Held(dir) => {
                let identity =
                    NodeIdentity::load(dir, node).map_err(|e| anyhow!("--data-tls-dir: {e}"))?;
                let ca = identity.ca_cert();
                let same = match trust {
                    Some(ApiTrust::CaCert(trusted)) => trusted == ca,
                    Some(ApiTrust::Pinned(pin)) => aigrid_tls::fingerprint_of(ca) == *pin,
                    None => true,
                };
                if !same {
                    bail!(
                        "--data-tls-dir {}: the certificate is from another CA than the \
                         cluster's this agent trusts",
                        dir.display()
                    );
                }
                if !identity.valid_for(std::time::Duration::from_secs(30 * 24 * 3600)) {
                    tracing::warn!(
                        dir = %dir.display(),
                        "the data port's certificate expires within 30 days: issue a new one \
                         (`aigrid ca issue --node`)"
                    );
                }
                DataIdentity::Held(identity)
            }
        })
    }

    /// What the registration carries for it.
    pub fn registration(&self) -> (Option<aigrid_agent::agent::DataTls>, Option<Waiting>) {
        match self {
            DataIdentity::Plain => (None, None),
            DataIdentity::Held(_) => (Some(aigrid_agent::agent::DataTls::held()), None),
            DataIdentity::Requested(request) => {
                let (tls, rx) =
                    aigrid_agent::agent::DataTls::requested(request.csr_pem().to_owned());
                (Some(tls), Some(Waiting(rx)))
            }
        }
    }
}

/// Where the certificate issued with the registration arrives.
pub struct Waiting(tokio::sync::watch::Receiver<Option<String>>);

impl Waiting {
    /// The chain, once a server issued it; `None` when the agent stopped first.
    pub async fn issued(mut self) -> Option<String> {
        self.0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|chain| chain.clone())
    }
}

/// A bound data port, not serving yet.
pub struct DataPort {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    peers: axum::Router,
    port: u16,
}

impl DataPort {
    /// Binds `addr` for the shards under `dir` and the chunks of the model cache
    /// under `data_dir`, `peer_uploads` at once (at `peer_upload_mbit`, when set).
    pub async fn bind(
        addr: SocketAddr,
        dir: &Path,
        data_dir: &Path,
        (peer_uploads, peer_upload_mbit): (usize, Option<f64>),
    ) -> anyhow::Result<Self> {
        use aigrid_store::shard_service::{ShardService, ShardServiceLimits};
        let service = ShardService::new(dir, ShardServiceLimits::default())?;
        let mut peers = aigrid_store::peers::PeerChunks::new(
            data_dir.join(aigrid_agent::model_server::CACHE_DIR),
            peer_uploads,
        );
        if let Some(mbit) = peer_upload_mbit {
            peers = peers.with_upload_mbit(mbit);
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--shard-listen {addr}"))?;
        let port = listener.local_addr().context("--shard-listen")?.port();
        Ok(DataPort {
            listener,
            router: service.router(),
            peers: peers.router(),
            port,
        })
    }

    /// The port bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` turns true: TLS under `identity` when given, with the
    /// peer routes kept to members; plain HTTP otherwise.
    pub fn serve(
        self,
        identity: Option<&NodeIdentity>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let (tls, peers) = match identity {
            Some(identity) => (
                Some(
                    identity
                        .data_server_config()
                        .map_err(|e| anyhow!("the data port's TLS: {e}"))?,
                ),
                self.peers
                    .route_layer(axum::middleware::from_fn(members_only)),
            ),
            None => (None, self.peers),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let bound = self.listener.local_addr().context("--shard-listen")?;
        if tls.is_none() && !bound.ip().is_loopback() {
            tracing::warn!(
                %bound,
                "the data port is served over plain HTTP beyond loopback (--insecure): \
                 shards and model chunks cross the network readable by anyone on it, and \
                 peers are not told apart from strangers"
            );
        }
        tracing::info!("data port (shards and peer chunks) listening on {scheme}://{bound}");
        let app = peers.merge(self.router);
        let listener = self.listener;
        Ok(tokio::spawn(async move {
            let served = aigrid_scheduler::listener::serve(
                listener,
                app,
                ListenerLimits::default(),
                tls,
                ListenerMetrics::unregistered(),
                shutdown,
            )
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "data port stopped");
            }
        }))
    }
}

/// Lets a request through only on a connection that presented a cluster member's
/// certificate (verified against the CA by the TLS configuration).
async fn members_only(req: Request, next: Next) -> Response {
    let member = req
        .extensions()
        .get::<ClientCertificate>()
        .and_then(|ClientCertificate(cert)| aigrid_tls::member_of(cert));
    match member {
        Some(_) => next.run(req).await,
        None => (
            StatusCode::FORBIDDEN,
            axum::Json(aigrid_api::ErrorBody::new(
                aigrid_api::ErrorCode::Forbidden,
                "peer chunks are served to the cluster's nodes and servers only: present \
                 a certificate from the cluster CA",
            )),
        )
            .into_response(),
    }
}

/// Checks the data port flags that need no network: a held directory exists.
pub fn check_held(dir: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(dir) = dir {
        if !dir.join(aigrid_tls::node::NODE_CERT_FILE).is_file() {
            bail!(
                "--data-tls-dir {}: no {} there (`aigrid ca issue --node ID --out DIR` makes it)",
                dir.display(),
                aigrid_tls::node::NODE_CERT_FILE
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_beyond_loopback_unless_insecure_and_on_loopback_when_asked() {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7800".parse().unwrap();
        let at: SocketAddr = "10.0.0.7:7800".parse().unwrap();
        assert_eq!(
            DataTlsChoice::resolve(lo, false, None, false, &[]),
            DataTlsChoice::Plain
        );
        assert_eq!(
            DataTlsChoice::resolve(any, false, None, true, &[]),
            DataTlsChoice::Plain
        );
        let DataTlsChoice::Request(hosts) =
            DataTlsChoice::resolve(at, false, None, false, &["gpu-a.lan".into()])
        else {
            panic!("TLS beyond loopback");
        };
        for h in ["localhost", "127.0.0.1", "10.0.0.7", "gpu-a.lan"] {
            assert!(hosts.contains(&h.to_owned()), "{h} in {hosts:?}");
        }
        let DataTlsChoice::Request(hosts) = DataTlsChoice::resolve(any, false, None, false, &[])
        else {
            panic!("TLS beyond loopback");
        };
        assert!(!hosts.contains(&"0.0.0.0".to_owned()));
        assert!(matches!(
            DataTlsChoice::resolve(lo, true, None, false, &[]),
            DataTlsChoice::Request(_)
        ));
        assert_eq!(
            DataTlsChoice::resolve(at, false, Some("/etc/n".into()), true, &[]),
            DataTlsChoice::Held("/etc/n".into())
        );
    }
}
