//! rustls configurations for the two listeners and their clients.
//!
//! - Peer listener ([`ServerIdentity::peer_server_config`]): mutual TLS; a client must
//!   present a certificate from the cluster CA. The caller reads the server id from
//!   that certificate ([`crate::server_id_of`]) and believes Raft messages only from it.
//! - Peer client ([`ServerIdentity::peer_client_config`]): presents this server's leaf
//!   and accepts only a leaf from the CA naming the peer id it dialled. The address is
//!   not checked against the certificate's names: a peer is who its certificate says,
//!   wherever it answers.
//! - API listener ([`ServerIdentity::api_server_config`]): the server's leaf, no
//!   client certificates.
//! - API client ([`api_client_config`]): trusts the CA's certificate, given as a file
//!   or pinned by fingerprint ([`ApiTrust`]), and checks the host name as usual.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::ca::ServerIdentity;
use crate::chain::roots;
use crate::{fingerprint_of, provider, server_id_of, CaFingerprint, TlsError};

/// HTTP/1.1 only: what the servers speak on both listeners.
pub(crate) const ALPN: &[&[u8]] = &[b"http/1.1"];

impl ServerIdentity {
    /// The peer listener's configuration: this server's leaf, and a client
    /// certificate from the CA required of every connection.
    pub fn peer_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(self.ca_cert())?, provider.clone())
                .build()
                .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), self.key())?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A peer client's configuration for dialling server `peer`: presents this
    /// server's leaf and accepts only a leaf from the CA that names `peer`.
    pub fn peer_client_config(&self, peer: u64) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(PeerVerifier {
            roots: roots(self.ca_cert())?,
            expected: Expected::Server(peer),
            provider: provider.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain(), self.key())?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The API listener's configuration: this server's leaf (and the CA certificate
    /// after it, for clients that pin the CA), no client certificates.
    pub fn api_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain(), self.key())?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// Accepts a peer's leaf only when it chains to the cluster CA and names the member
/// expected.
#[derive(Debug)]
pub(crate) struct PeerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) expected: Expected,
    pub(crate) provider: Arc<CryptoProvider>,
}

/// Whom a [`PeerVerifier`] accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expected {
    /// The server with this id, dialled by its id.
    Server(u64),
    /// Any server or node of the cluster (a node's peers on its data port).
    AnyMember,
}

fn verify_tls12(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn verify_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let expected = match self.expected {
            Expected::AnyMember if crate::member_of(end_entity).is_some() => {
                return Ok(ServerCertVerified::assertion())
            }
            Expected::AnyMember => {
                return Err(Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            Expected::Server(id) => id,
        };
        match server_id_of(end_entity) {
            Some(id) if id == expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(TlsError::Invalid(format!(
                    "the peer's certificate names server {id}, not server {expected}"
                )))),
            ))),
            None => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What an API client trusts.
#[derive(Debug, Clone)]
pub enum ApiTrust {
    /// The cluster CA's certificate (`--ca-cert FILE`).
    CaCert(CertificateDer<'static>),
    /// The cluster CA named by its fingerprint (from a join token): the server must
    /// send that CA's certificate in its chain.
    Pinned(CaFingerprint),
}

/// A client configuration for the control API that trusts the cluster CA alone.
pub fn api_client_config(trust: &ApiTrust) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        ApiTrust::CaCert(ca) => builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
        ApiTrust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Accepts a chain only if it carries a CA certificate with the pinned SHA-256 and
/// the leaf verifies under that CA for the name dialled.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint_of(c) == self.pin)
            .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(&ca.clone().into_owned())?,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| Error::General(format!("pinned CA verifier: {e}")))?;
        let others: Vec<CertificateDer<'_>> =
            intermediates.iter().filter(|c| *c != ca).cloned().collect();
        verifier.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
