//! The cluster CA and the server certificates it issues, with their files.
//!
//! A CA directory holds `ca.pem` (the CA certificate, public) and, where servers may
//! issue their own leaves, `ca.key` (mode 0600). A server's own directory holds
//! `server.pem` (its leaf, then the CA certificate) and `server.key` (0600).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::PublicKeyData;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{server_id_of, server_uri};
use crate::{fingerprint_of, CaFingerprint, TlsError};

/// The CA certificate's file.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// A server's certificate chain: its leaf, then the CA certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// A server's key (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// The CA's subject. Fixed: the issuer name of every leaf must match it, and the CA is
/// told apart from other clusters' by its key (and so its fingerprint), not its name.
const CA_NAME: &str = "aigrid cluster CA";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A server re-issues its leaf at every start while it holds the CA key; a leaf handed
/// to it by an operator lasts this long.
const LEAF_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Tolerance for clocks a little behind the issuer's.
const BACKDATE: Duration = Duration::from_secs(3600);

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn pem_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

pub(crate) fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

pub(crate) fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    name.push(DnType::OrganizationName, "aigrid");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Writes `text` to `path`, readable by the owner alone when `secret`.
pub(crate) fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_err(path))?;
    #[cfg(unix)]
    if secret {
        // An existing file keeps its mode on open: narrow it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    file.write_all(text.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

pub(crate) fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// The PKCS#8 private key in a PEM file.
pub(crate) fn read_pkcs8(path: &Path) -> Result<PrivatePkcs8KeyDer<'static>, TlsError> {
    match PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))? {
        PrivateKeyDer::Pkcs8(k) => Ok(k),
        _ => Err(pem_err(path, "must hold a PKCS#8 private key")),
    }
}

/// The certificates in a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read_text(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "holds no certificate"));
    }
    Ok(certs)
}

/// The one CA certificate in PEM `text`, read from `source` (a file, or the
/// variable an agent hands its model servers), named in errors.
pub fn ca_cert_from_pem(text: &str, source: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let mut certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(source, e))?;
    if certs.len() != 1 {
        return Err(pem_err(
            source,
            "must hold exactly one certificate, the CA's",
        ));
    }
    Ok(certs.remove(0))
}

/// The last certificate of a PEM chain, as PEM: the CA of a chain a server issued
/// (leaf first, CA last).
pub fn last_pem_certificate(chain: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = chain.rfind(BEGIN)?;
    let end = chain[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &chain[start..end]))
}

/// The one CA certificate in a PEM file (`ca.pem`).
pub fn read_ca_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    ca_cert_from_pem(&read_text(path)?, path)
}

/// The cluster's certificate authority: its certificate and signing key.
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterCa({}, key redacted)", self.fingerprint())
    }
}

impl ClusterCa {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn create() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        validity(&mut params, CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key,
        })
    }

    /// True when `dir` holds a CA key (and so may issue).
    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_KEY_FILE).is_file()
    }

    /// Writes `ca.pem` and `ca.key` (0600) into `dir`, creating it; refuses to replace
    /// a CA already there, which would orphan every certificate it issued.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(TlsError::Invalid(format!(
                "{} already holds a CA key; refusing to replace it",
                dir.display()
            )));
        }
        write_file(&key_path, &self.key.serialize_pem(), true)?;
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, false)
    }

    /// Reads `ca.pem` and `ca.key` from `dir` and checks that they belong together.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = read_ca_cert(&cert_path)?;
        let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|e| pem_err(&key_path, e))?;
        let parsed = webpki::EndEntityCert::try_from(&cert).map_err(|e| pem_err(&cert_path, e))?;
        if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info().as_slice() {
            return Err(TlsError::Invalid(format!(
                "{} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            )));
        }
        Ok(ClusterCa {
            cert_pem: read_text(&cert_path)?,
            cert,
            key,
        })
    }

    /// The CA in `dir`, made and saved there first when `dir` holds none.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        if Self::exists(dir) {
            return Self::load(dir);
        }
        let ca = Self::create()?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate's DER bytes.
    pub fn fingerprint(&self) -> CaFingerprint {
        fingerprint_of(&self.cert)
    }

    /// The CA's signing key.
    pub(crate) fn key(&self) -> &KeyPair {
        &self.key
    }

    /// A leaf for server `id`, valid as a TLS server and client, naming the id (URI
    /// SAN) and `hosts` (DNS names or IP addresses) it is reached at.
    pub fn issue_server(&self, id: u64, hosts: &[String]) -> Result<ServerIdentity, TlsError> {
        if id == 0 {
            return Err(TlsError::Invalid("a server id is non-zero".into()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("aigrid server {id}"));
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(server_uri(id).try_into()?)];
        for host in hosts {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.to_owned().try_into()?),
            };
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
        validity(&mut params, LEAF_LIFETIME);
        let issuer = Issuer::new(ca_params(), &self.key);
        let leaf = params.signed_by(&key, &issuer)?;
        Ok(ServerIdentity {
            id,
            creds: Credentials {
                chain: vec![leaf.der().clone(), self.cert.clone()],
                chain_pem: format!("{}{}", leaf.pem(), self.cert_pem),
                key: PrivatePkcs8KeyDer::from(key.serialize_der()),
                key_pem: key.serialize_pem(),
            },
        })
    }
}

/// A leaf certificate's chain (the leaf first, the CA last) and its key, as DER and
/// as the PEM files they were read from or are written to: what servers and nodes
/// alike prove themselves with.
pub(crate) struct Credentials {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) chain_pem: String,
    pub(crate) key: PrivatePkcs8KeyDer<'static>,
    pub(crate) key_pem: String,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            chain_pem: self.chain_pem.clone(),
            key: self.key.clone_key(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl Credentials {
    /// Reads the chain `cert_file` and the key `key_file` from `dir`; answers them
    /// and the chain's path (for messages).
    pub(crate) fn read(
        dir: &Path,
        cert_file: &str,
        key_file: &str,
    ) -> Result<(Self, PathBuf), TlsError> {
        let (cert_path, key_path) = (dir.join(cert_file), dir.join(key_file));
        let creds = Credentials {
            chain: read_certs(&cert_path)?,
            chain_pem: read_text(&cert_path)?,
            key: read_pkcs8(&key_path)?,
            key_pem: read_text(&key_path)?,
        };
        Ok((creds, cert_path))
    }

    /// Writes the key (mode 0600) and the chain into `dir`, creating it.
    pub(crate) fn write(
        &self,
        dir: &Path,
        cert_file: &str,
        key_file: &str,
    ) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_file(&dir.join(key_file), &self.key_pem, true)?;
        write_file(&dir.join(cert_file), &self.chain_pem, false)
    }

    /// The leaf certificate.
    pub(crate) fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The CA certificate that issued the leaf.
    pub(crate) fn ca_cert(&self) -> &CertificateDer<'static> {
        self.chain
            .last()
            .expect("a chain holds the leaf and the CA")
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The CA certificate, as PEM.
    pub(crate) fn ca_pem(&self) -> String {
        last_pem_certificate(&self.chain_pem)
            .expect("a loaded or issued chain ends with the CA's certificate")
    }
}

/// A server's certificate chain (its leaf, then the CA) and key: what it proves
/// itself with on the peer and API listeners.
#[derive(Clone)]
pub struct ServerIdentity {
    id: u64,
    creds: Credentials,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerIdentity(server {}, CA {}, key redacted)",
            self.id,
            self.fingerprint()
        )
    }
}

impl ServerIdentity {
    /// Writes `server.pem` and `server.key` (0600) into `dir`, and the CA certificate
    /// as `ca.pem` beside them, so the directory can be handed to `--ca-dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        self.creds.write(dir, SERVER_CERT_FILE, SERVER_KEY_FILE)?;
        let chain_pem = &self.creds.chain_pem;
        let ca_pem = chain_pem
            .find("-----END CERTIFICATE-----")
            .map(|end| end + "-----END CERTIFICATE-----".len())
            .map(|end| chain_pem[end..].trim_start().to_owned())
            .unwrap_or_default();
        write_file(&dir.join(CA_CERT_FILE), &ca_pem, false)
    }

    /// Reads `server.pem` and `server.key` from `dir` and checks them against the CA
    /// certificate in `ca_dir`'s `ca.pem`: the leaf must be issued by that CA and name
    /// server `id`.
    pub fn load(dir: &Path, ca_dir: &Path, id: u64) -> Result<Self, TlsError> {
        let ca = read_ca_cert(&ca_dir.join(CA_CERT_FILE))?;
        let (mut creds, cert_path) = Credentials::read(dir, SERVER_CERT_FILE, SERVER_KEY_FILE)?;
        let chain = &mut creds.chain;
        // The CA travels in the chain so a client pinning its fingerprint finds it.
        chain.retain(|c| *c != ca);
        chain.push(ca.clone());
        crate::chain::verify_leaf(&ca, &chain[0], &chain[1..])
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", cert_path.display())))?;
        match server_id_of(&chain[0]) {
            Some(named) if named == id => {}
            Some(named) => {
                return Err(TlsError::Invalid(format!(
                    "{} is server {named}'s certificate, not server {id}'s",
                    cert_path.display()
                )))
            }
            None => {
                return Err(TlsError::Invalid(format!(
                    "{} names no server id (URI SAN aigrid://server/<id>)",
                    cert_path.display()
                )))
            }
        }
        Ok(ServerIdentity { id, creds })
    }

    /// The server id the leaf names.
    pub fn id(&self) -> u64 {
        self.id
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

    /// The CA's fingerprint.
    pub fn fingerprint(&self) -> CaFingerprint {
        fingerprint_of(self.ca_cert())
    }

    pub(crate) fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.creds.chain.clone()
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.creds.key()
    }
}

/// Where a server finds its certificates: `dir` with `ca.key` issues a fresh leaf for
/// `id` and `hosts` into `own_dir`; `dir` without it must hold `ca.pem`,
/// `server.pem` and `server.key` made for `id`.
pub fn server_identity(
    dir: &Path,
    own_dir: &Path,
    id: u64,
    hosts: &[String],
) -> Result<ServerIdentity, TlsError> {
    if ClusterCa::exists(dir) {
        let ca = ClusterCa::load(dir)?;
        let identity = ca.issue_server(id, hosts)?;
        identity.save(own_dir)?;
        Ok(identity)
    } else {
        ServerIdentity::load(dir, dir, id)
    }
}

/// The default place of a server's own certificates under its data directory.
pub fn own_tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_ca_saves_loads_and_keeps_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create().unwrap();
        ca.save(dir.path()).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        let loaded = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        assert!(loaded.fingerprint().to_string().starts_with("sha256:"));
        assert!(
            ca.save(dir.path()).is_err(),
            "an existing CA is not replaced"
        );
        // A key from another CA is refused.
        let other = tempfile::tempdir().unwrap();
        ClusterCa::create().unwrap().save(other.path()).unwrap();
        std::fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(ClusterCa::load(dir.path()).is_err());
    }

    #[test]
    fn a_server_identity_round_trips_through_its_files() {
        let ca_dir = tempfile::tempdir().unwrap();
        let own = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(ca_dir.path()).unwrap();
        let issued = server_identity(ca_dir.path(), own.path(), 3, &["10.0.0.3".into()]).unwrap();
        assert_eq!(issued.id(), 3);
        assert_eq!(issued.fingerprint(), ca.fingerprint());
        #[cfg(unix)]
        assert_eq!(mode(&own.path().join(SERVER_KEY_FILE)), 0o600);
        // The saved directory serves as a `--ca-dir` without the CA key.
        let loaded = server_identity(own.path(), own.path(), 3, &[]).unwrap();
        assert_eq!(loaded.leaf(), issued.leaf());
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        // ... but only for the server it was issued to.
        let err = ServerIdentity::load(own.path(), own.path(), 4).unwrap_err();
        assert!(err.to_string().contains("server 3's certificate"), "{err}");
        // ... and only under the CA that issued it.
        let stranger = tempfile::tempdir().unwrap();
        ClusterCa::create().unwrap().save(stranger.path()).unwrap();
        let err = ServerIdentity::load(own.path(), stranger.path(), 3).unwrap_err();
        assert!(err.to_string().contains("server.pem"), "{err}");
    }
}
