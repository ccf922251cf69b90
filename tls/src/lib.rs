//! The cluster's certificates and the TLS settings built on them.
//!
//! A cluster has one certificate authority, made at bootstrap (`aigrid ca init`, or by
//! a one-server cluster at its first start). Every server holds a leaf certificate from
//! it that names the server's Raft id (URI SAN `aigrid://server/<id>`): on the peer
//! listener that certificate *is* the server's identity, so a Raft message is believed
//! only from the server its connection's certificate names. The API listener serves
//! the same leaf; clients trust the CA's certificate file, or pin its SHA-256
//! fingerprint (what a join token carries).
//!
//! - [`ca`]: the CA and the server leaves it issues, saved as PEM files (keys 0600).
//! - [`identity`]: the server id a certificate names.
//! - [`node`]: node certificates (URI SAN `aigrid://node/<id>`) for the nodes'
//!   private data ports, requested by the node and issued by a server with the CA
//!   key.
//! - [`config`]: rustls configurations: the peer listener (mutual TLS), the peer
//!   client (expects one peer id), the API listener, API clients (CA file or pin).
//!
//! One crypto provider everywhere: aws-lc-rs, the one reqwest's rustls uses.

pub mod ca;
mod chain;
pub mod config;
pub mod identity;
pub mod node;
#[cfg(test)]
mod test_pipe;

pub use ca::{
    ClusterCa, ServerIdentity, CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE,
};
pub use config::{api_client_config, ApiTrust};
pub use identity::{server_id_of, server_uri};
pub use node::{member_of, node_id_of, Member, NodeIdentity, NodeKeyRequest};

pub use aigrid_api::CaFingerprint;
pub use rustls;
pub use rustls_pki_types::CertificateDer;
pub use tokio_rustls;

use std::path::PathBuf;

/// Why a certificate or key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file did not hold what it should.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A certificate or key could not be generated.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate is not what it must be (wrong CA, no server id...).
    #[error("{0}")]
    Invalid(String),
}

/// The leaf certificate a client presented on a TLS connection, verified against
/// the cluster CA by the listener's configuration; listeners put it in each
/// request's extensions for the routes that ask who is calling ([`member_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate(pub CertificateDer<'static>);

/// The crypto provider every configuration uses.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The SHA-256 fingerprint of a certificate's DER bytes.
pub fn fingerprint_of(cert: &CertificateDer<'_>) -> CaFingerprint {
    use sha2::Digest;
    CaFingerprint(sha2::Sha256::digest(cert.as_ref()).into())
}
