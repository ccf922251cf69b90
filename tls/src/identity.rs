//! The server id a certificate names: one URI SAN `aigrid://server/<id>`.
//!
//! The id is read only from certificates whose chain was verified against the
//! cluster's CA first; the CA issues a leaf to a server only for its own id.

use rustls_pki_types::CertificateDer;

/// The URI scheme and path before a server's id.
pub const SERVER_URI_PREFIX: &str = "aigrid://server/";

/// The URI SAN naming server `id`.
pub fn server_uri(id: u64) -> String {
    format!("{SERVER_URI_PREFIX}{id}")
}

/// The server id `cert` names, if it names exactly one (a certificate naming two ids,
/// or none, names no server).
pub fn server_id_of(cert: &CertificateDer<'_>) -> Option<u64> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut ids = parsed
        .valid_uri_names()
        .filter_map(|uri| uri.strip_prefix(SERVER_URI_PREFIX))
        .map(|id| {
            // Digits only: `+1`, ` 1` or `01` are not ids the CA writes.
            if id.is_empty() || id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                id.parse::<u64>().ok()
            }
        });
    let first = ids.next()??;
    if ids.next().is_some() {
        return None;
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterCa;

    #[test]
    fn a_server_certificate_names_its_id() {
        let ca = ClusterCa::create().unwrap();
        let leaf = ca.issue_server(42, &["127.0.0.1".into()]).unwrap();
        assert_eq!(server_id_of(leaf.leaf()), Some(42));
        assert_eq!(server_id_of(ca.cert()), None, "the CA names no server");
        assert_eq!(server_id_of(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
