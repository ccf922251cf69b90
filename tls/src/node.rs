//! Node certificates: what a node's private data port proves itself with, and what
//! the node presents when it fetches from its peers' data ports.
//!
//! A node makes its own key and a certificate request ([`NodeKeyRequest`]) and sends
//! the request with its signed registration; a server holding the CA key issues a
//! leaf naming the node (URI SAN `aigrid://node/<id>`) and the host names and
//! addresses it asked for, plus the address the servers see it at. The key never
//! leaves the node. Where the CA key is kept off the servers, the operator issues a
//! node's certificate ahead (`aigrid ca issue --node ID`) and the agent loads it from
//! a directory ([`NodeIdentity::load`]).
//!
//! On the data port ([`NodeIdentity::data_server_config`]) a client certificate is
//! asked for but not required, so store clients that trust the CA still read and
//! write shards; the routes only cluster members may use check the certificate the
//! connection presented ([`member_of`]). A node fetching from a peer
//! ([`NodeIdentity::data_client_config`]) presents its leaf and accepts any member's
//! leaf from the CA, whatever address it answers at: what it fetches is checked
//! against the signed manifest, so the certificate keeps strangers out rather than
//! vouching for the bytes.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::PublicKeyData;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use rustls_pki_types::{PrivatePkcs8KeyDer, UnixTime};

use crate::ca::{ca_params, pem_err, validity, Credentials};
use crate::chain::{roots, verify_leaf};
use crate::config::{Expected, PeerVerifier, ALPN};
use crate::{fingerprint_of, provider, server_id_of, ApiTrust, ClusterCa, TlsError};

/// The URI scheme and path before a node's id.
pub const NODE_URI_PREFIX: &str = "aigrid://node/";
/// A node's certificate chain: its leaf, then the CA certificate.
pub const NODE_CERT_FILE: &str = "node.pem";
/// A node's key (mode 0600).
pub const NODE_KEY_FILE: &str = "node.key";
/// Host names and addresses one node certificate may name.
pub const MAX_NODE_HOSTS: usize = 16;
/// Largest certificate request a server reads.
pub const MAX_CSR_BYTES: usize = 8 << 10;
/// A node's leaf lasts this long; its agent asks for a fresh one at every start.
const NODE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The URI SAN naming node `id`.
pub fn node_uri(id: &str) -> String {
    format!("{NODE_URI_PREFIX}{id}")
}

/// The node id `cert` names, if it names exactly one.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut ids = parsed
        .valid_uri_names()
        .filter_map(|uri| uri.strip_prefix(NODE_URI_PREFIX))
        .map(str::to_owned);
    let first = ids.next().filter(|id| valid_node_id(id))?;
    if ids.next().is_some() {
        return None;
    }
    Some(first)
}

/// What a node id may be (as a registration checks it).
fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A member of the cluster, as a verified certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// A server, by its Raft id.
    Server(u64),
    /// A node, by its id.
    Node(String),
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Member::Server(id) => write!(f, "server {id}"),
            Member::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// The member `cert` names: a server or a node, never both. Read only from a
/// certificate whose chain was verified against the cluster CA.
pub fn member_of(cert: &CertificateDer<'_>) -> Option<Member> {
    match (server_id_of(cert), node_id_of(cert)) {
        (Some(id), None) => Some(Member::Server(id)),
        (None, Some(id)) => Some(Member::Node(id)),
        _ => None,
    }
}

fn san_of(host: &str) -> Result<SanType, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(host.to_owned().try_into()?),
    })
}

/// A node's fresh key and the certificate request for it, made on the node.
pub struct NodeKeyRequest {
    node: String,
    key: KeyPair,
    csr_pem: String,
}

impl std::fmt::Debug for NodeKeyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKeyRequest(node {}, key redacted)", self.node)
    }
}

impl NodeKeyRequest {
    /// A fresh ECDSA P-256 key for `node` and a request naming `hosts` (DNS names or
    /// IP addresses the node's data port is reached at).
    pub fn new(node: &str, hosts: &[String]) -> Result<Self, TlsError> {
        if !valid_node_id(node) {
            return Err(TlsError::Invalid(format!("`{node}` is not a node id")));
        }
        if hosts.len() > MAX_NODE_HOSTS {
            return Err(TlsError::Invalid(format!(
                "a node certificate names at most {MAX_NODE_HOSTS} hosts"
            )));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("aigrid node {node}"));
        params.distinguished_name = name;
        for host in hosts {
            let san = san_of(host)?;
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        let csr_pem = params.serialize_request(&key)?.pem()?;
        Ok(NodeKeyRequest {
            node: node.to_owned(),
            key,
            csr_pem,
        })
    }

    /// The certificate request, PEM.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// The identity of this key and the chain the CA issued for it (PEM: the leaf,
    /// then the CA). The CA must be the one `trust` names (without one, the CA in
    /// the chain, as the servers that answered sent it), and the leaf must carry this
    /// key and name this node.
    pub fn accept(
        self,
        chain_pem: &str,
        trust: Option<&ApiTrust>,
    ) -> Result<NodeIdentity, TlsError> {
        let invalid = |why: String| TlsError::Invalid(format!("the node certificate: {why}"));
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        let [leaf, ca] = chain.as_slice() else {
            return Err(invalid("must be the leaf, then the CA certificate".into()));
        };
        match trust {
            Some(ApiTrust::CaCert(trusted)) if trusted != ca => {
                return Err(invalid("issued by another CA than the cluster's".into()))
            }
            Some(ApiTrust::Pinned(pin)) if fingerprint_of(ca) != *pin => {
                return Err(invalid("issued by another CA than the one pinned".into()))
            }
            _ => {}
        }
        let parsed = webpki::EndEntityCert::try_from(leaf).map_err(|e| invalid(e.to_string()))?;
        if parsed.subject_public_key_info().as_ref()
            != self.key.subject_public_key_info().as_slice()
        {
            return Err(invalid("does not carry the key this node asked for".into()));
        }
        let identity = NodeIdentity {
            node: self.node,
            creds: Credentials {
                chain: chain.clone(),
                chain_pem: chain_pem.to_owned(),
                key_pem: self.key.serialize_pem(),
                key: PrivatePkcs8KeyDer::from(self.key.serialize_der()),
            },
        };
        identity.check()?;
        Ok(identity)
    }
}

impl ClusterCa {
    /// A leaf for node `node` from its certificate request (PEM): the request's key
    /// and the host names and addresses it asks for (DNS names and IPs only, at most
    /// [`MAX_NODE_HOSTS`]), plus `seen`, where the servers see the node. Only the key
    /// and hosts are taken from the request; what the leaf may do is the CA's to say.
    /// Answers the chain, PEM: the leaf, then the CA.
    pub fn issue_node(
        &self,
        node: &str,
        csr_pem: &str,
        seen: Option<IpAddr>,
    ) -> Result<String, TlsError> {
        let invalid = |why: String| TlsError::Invalid(format!("csr: {why}"));
        if !valid_node_id(node) {
            return Err(TlsError::Invalid(format!("`{node}` is not a node id")));
        }
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(invalid(format!("larger than {MAX_CSR_BYTES} bytes")));
        }
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| invalid(format!("not a PEM certificate request ({e})")))?;
        let request =
            CertificateSigningRequestParams::from_der(&der).map_err(|e| invalid(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("aigrid node {node}"));
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(node_uri(node).try_into()?)];
        let mut hosts = 0;
        for san in &request.params.subject_alt_names {
            match san {
                SanType::DnsName(_) | SanType::IpAddress(_) => hosts += 1,
                _ => return Err(invalid("may name DNS names and IP addresses only".into())),
            }
            if !params.subject_alt_names.contains(san) {
                params.subject_alt_names.push(san.clone());
            }
        }
        if hosts > MAX_NODE_HOSTS {
            return Err(invalid(format!("names more than {MAX_NODE_HOSTS} hosts")));
        }
        if let Some(ip) = seen {
            let san = SanType::IpAddress(ip.to_canonical());
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, NODE_LIFETIME);
        let issuer = Issuer::new(ca_params(), self.key());
        let leaf = params.signed_by(&request.public_key, &issuer)?;
        Ok(format!("{}{}", leaf.pem(), self.cert_pem()))
    }

    /// A key and leaf for node `node` made here, for an operator who keeps the CA
    /// key off the servers and hands each node its certificate.
    pub fn issue_node_identity(
        &self,
        node: &str,
        hosts: &[String],
    ) -> Result<NodeIdentity, TlsError> {
        let request = NodeKeyRequest::new(node, hosts)?;
        let chain = self.issue_node(node, request.csr_pem(), None)?;
        request.accept(&chain, Some(&ApiTrust::CaCert(self.cert().clone())))
    }
}

/// A node's certificate chain (its leaf, then the CA) and key.
pub struct NodeIdentity {
    node: String,
    creds: Credentials,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NodeIdentity(node {}, CA {}, key redacted)",
            self.node,
            fingerprint_of(self.ca_cert())
        )
    }
}

impl NodeIdentity {
    /// Checks that the leaf chains to the CA after it, is valid now and names the
    /// node.
    fn check(&self) -> Result<(), TlsError> {
        let invalid = |why: String| TlsError::Invalid(format!("the node certificate: {why}"));
        verify_leaf(self.ca_cert(), self.leaf(), &[]).map_err(|e| invalid(e.to_string()))?;
        match node_id_of(self.leaf()) {
            Some(named) if named == self.node => Ok(()),
            Some(named) => Err(invalid(format!(
                "names node {named}, not node {}",
                self.node
            ))),
            None => Err(invalid(format!(
                "names no node (URI SAN {NODE_URI_PREFIX}<id>)"
            ))),
        }
    }

    /// Writes `node.pem` and `node.key` (0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        self.creds.write(dir, NODE_CERT_FILE, NODE_KEY_FILE)
    }

    /// Reads `node.pem` (the leaf, then the CA) and `node.key` from `dir`; the leaf
    /// must chain to that CA, be valid now and name `node`.
    pub fn load(dir: &Path, node: &str) -> Result<Self, TlsError> {
        let (creds, cert_path) = Credentials::read(dir, NODE_CERT_FILE, NODE_KEY_FILE)?;
        if creds.chain.len() != 2 {
            return Err(pem_err(
                &cert_path,
                "must hold the leaf, then the CA certificate",
            ));
        }
        let identity = NodeIdentity {
            node: node.to_owned(),
            creds,
        };
        identity
            .check()
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", cert_path.display())))?;
        Ok(identity)
    }

    /// The node the leaf names.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        self.creds.leaf()
    }

    /// The CA certificate that issued the leaf.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        self.creds.ca_cert()
    }

    /// The CA certificate, as PEM.
    pub fn ca_pem(&self) -> String {
        self.creds.ca_pem()
    }

    /// True when the leaf is still valid `ahead` from now (an operator's leaf
    /// about to expire is warned of).
    pub fn valid_for(&self, ahead: Duration) -> bool {
        let Ok(at) = (SystemTime::now() + ahead).duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let Ok(roots) = roots(self.ca_cert()) else {
            return false;
        };
        let Ok(parsed) = rustls::server::ParsedCertificate::try_from(self.leaf()) else {
            return false;
        };
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            UnixTime::since_unix_epoch(at),
            provider().signature_verification_algorithms.all,
        )
        .is_ok()
    }

    /// The data port's configuration: this node's leaf; a client certificate from
    /// the CA is asked for and checked when presented, not required (see the module).
    pub fn data_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(self.ca_cert())?, provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.creds.chain.clone(), self.creds.key())?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A configuration for fetching from peers' data ports: presents this node's
    /// leaf and accepts any member's leaf from the CA, wherever it answers.
    pub fn data_client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(PeerVerifier {
            roots: roots(self.ca_cert())?,
            expected: Expected::AnyMember,
            provider: provider.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.creds.chain.clone(), self.creds.key())?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
