//! A server's certificates, and whether its control API is served over HTTPS.
//!
//! Every server has a leaf certificate from the cluster CA naming its id: the peer
//! listener requires it. It comes from `--ca-dir` (which issues a fresh leaf when it
//! holds the CA key, or holds `server.pem`/`server.key` made for this server), or, for
//! a one-server cluster given none, from a CA the server makes in its data directory
//! at its first start (the cluster's CA, made at bootstrap; later servers are issued
//! leaves from it).
//!
//! The API listener ([`crate::listener`]) serves HTTPS with that leaf whenever it
//! listens beyond loopback (or when asked to on loopback); plain HTTP only on
//! loopback, or anywhere under `insecure`, which is warned about at every start.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aigrid_tls::{ClusterCa, ServerIdentity};

use crate::server_config::{ServerConfig, ServerError};

/// Where a one-server cluster keeps the CA it made, under its data directory.
pub const BOOTSTRAP_CA_DIR: &str = "ca";

/// Host names and addresses a server's leaf names: loopback, the addresses it
/// listens on (when specific), and the host it is advertised at.
pub fn leaf_hosts(config: &ServerConfig, api: SocketAddr, peer: SocketAddr) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for ip in [api.ip(), peer.ip()] {
        if !ip.is_unspecified() {
            hosts.push(ip.to_string());
        }
    }
    if let Some(advertised) = &config.advertise {
        let host = advertised
            .rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .map_or(advertised.as_str(), |(host, _)| host);
        hosts.push(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        );
    }
    hosts.retain(|h| !h.is_empty());
    let mut seen = std::collections::BTreeSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts
}

/// This server's certificate: from `config.ca_dir`, or from the one-server cluster's
/// own CA under its data directory.
pub fn server_identity(
    config: &ServerConfig,
    hosts: &[String],
) -> Result<ServerIdentity, ServerError> {
    let own = aigrid_tls::ca::own_tls_dir(&config.data_dir);
    let tls = |e: aigrid_tls::TlsError| ServerError::Tls(e.to_string());
    match &config.ca_dir {
        Some(dir) => aigrid_tls::ca::server_identity(dir, &own, config.id, hosts).map_err(tls),
        None if config.peers.len() > 1 || config.joining => Err(ServerError::Config(
            "a server of a cluster of several needs the cluster's CA: pass --ca-dir \
             (`aigrid ca init --dir DIR` makes one)"
                .into(),
        )),
        None => {
            let dir = bootstrap_ca_dir(&config.data_dir);
            let ca = ClusterCa::load_or_create(&dir).map_err(tls)?;
            let identity = ca.issue_server(config.id, hosts).map_err(tls)?;
            identity.save(&own).map_err(tls)?;
            Ok(identity)
        }
    }
}

/// The CA this server issues node certificates with: the one in `--ca-dir` when
/// that holds the CA key, or the one a one-server cluster made; `None` when the CA
/// key is kept off this server (nodes then bring certificates issued ahead).
pub fn node_issuer(config: &ServerConfig) -> Result<Option<ClusterCa>, ServerError> {
    let tls = |e: aigrid_tls::TlsError| ServerError::Tls(e.to_string());
    let dir = match &config.ca_dir {
        Some(dir) => dir.clone(),
        None => bootstrap_ca_dir(&config.data_dir),
    };
    if !ClusterCa::exists(&dir) {
        return Ok(None);
    }
    ClusterCa::load(&dir).map(Some).map_err(tls)
}

/// The CA a one-server cluster made in `data_dir`.
pub fn bootstrap_ca_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(BOOTSTRAP_CA_DIR)
}

/// True when the API on `listen` must be served over HTTPS.
pub fn api_wants_tls(config: &ServerConfig, listen: IpAddr) -> bool {
    !config.insecure && (config.api_https || !listen.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leaf_names_loopback_and_the_advertised_hosts() {
        let mut config = ServerConfig::new(1, "0.0.0.0:7700".parse().unwrap(), "/tmp/x".into());
        config.advertise = Some("server-1:7701".into());
        let hosts = leaf_hosts(
            &config,
            "0.0.0.0:7700".parse().unwrap(),
            "10.0.0.1:7701".parse().unwrap(),
        );
        for h in ["localhost", "127.0.0.1", "10.0.0.1", "server-1"] {
            assert!(hosts.contains(&h.to_owned()), "{h} in {hosts:?}");
        }
        assert!(!hosts.contains(&"0.0.0.0".to_owned()));
    }

    #[test]
    fn https_beyond_loopback_unless_insecure() {
        let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), "/tmp/x".into());
        assert!(!api_wants_tls(&config, "127.0.0.1".parse().unwrap()));
        assert!(api_wants_tls(&config, "0.0.0.0".parse().unwrap()));
        config.api_https = true;
        assert!(api_wants_tls(&config, "127.0.0.1".parse().unwrap()));
        config.insecure = true;
        assert!(!api_wants_tls(&config, "0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn several_servers_need_the_cluster_ca() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(2, "127.0.0.1:0".parse().unwrap(), dir.path().into());
        config.peers = [(1, "a:1".to_owned()), (2, "b:1".to_owned())].into();
        assert!(server_identity(&config, &[]).is_err());
        // One server alone makes its CA once and keeps it.
        let mut alone = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
        alone.peers.clear();
        let first = server_identity(&alone, &[]).unwrap();
        let again = server_identity(&alone, &[]).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert!(bootstrap_ca_dir(dir.path()).join("ca.key").is_file());
    }
}
