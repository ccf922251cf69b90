//! Checking a certificate chain against the cluster CA alone, for the CA's own file
//! checks ([`crate::ca`]) and the TLS settings ([`crate::config`]).

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{Error, RootCertStore};

use crate::provider;

/// A root store holding the cluster CA only.
pub(crate) fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// Checks that `leaf` chains to `ca` (through `intermediates`) and is valid now.
pub(crate) fn verify_leaf(
    ca: &CertificateDer<'static>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), Error> {
    let provider = provider();
    let parsed = ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &*roots(ca)?,
        intermediates,
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
}
