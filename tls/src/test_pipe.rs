//! One TLS handshake over an in-memory pipe, for the configurations' tests.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Runs one handshake of `client`, dialling `name`, with `server`. The server side
/// answers what `who` reads from the client's certificate (`None`: no certificate
/// or nothing read); either side's error is its text. The server side closes
/// without a word once it is done, so only an alert is the client's refusal.
pub(crate) async fn handshake<T>(
    server: Arc<ServerConfig>,
    client: ClientConfig,
    name: &str,
    who: fn(&CertificateDer<'_>) -> Option<T>,
) -> (Result<Option<T>, String>, Result<(), String>) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let accept = async move {
        let stream = TlsAcceptor::from(server)
            .accept(a)
            .await
            .map_err(|e| e.to_string())?;
        let certs = stream.get_ref().1.peer_certificates();
        Ok(certs.and_then(|c| c.first()).and_then(who))
    };
    let connect = async move {
        let mut stream = TlsConnector::from(Arc::new(client))
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3 refuses a client certificate after the client finished: read to
        // hear the server's alert.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        match stream.read(&mut buf).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::join!(accept, connect)
}
