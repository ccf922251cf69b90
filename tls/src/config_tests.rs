use super::*;
use crate::ClusterCa;

/// One handshake dialling `name`; the server side answers the server id the
/// client's certificate names.
async fn handshake(
    server: Arc<ServerConfig>,
    client: ClientConfig,
    name: &str,
) -> (Result<Option<u64>, String>, Result<(), String>) {
    crate::test_pipe::handshake(server, client, name, server_id_of).await
}

/// A client that accepts `server`'s leaf but presents `presenting`'s chain.
fn trusting_presenting(server: &ServerIdentity, presenting: &ServerIdentity) -> ClientConfig {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        roots: roots(server.ca_cert()).unwrap(),
        expected: Expected::Server(server.id()),
        provider: provider.clone(),
    });
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(presenting.chain(), presenting.key())
        .unwrap()
}

fn leaf(ca: &ClusterCa, id: u64) -> ServerIdentity {
    ca.issue_server(id, &["127.0.0.1".into(), "localhost".into()])
        .unwrap()
}

#[tokio::test]
async fn peers_of_one_ca_know_each_other_by_id() {
    let ca = ClusterCa::create().unwrap();
    let (one, two) = (leaf(&ca, 1), leaf(&ca, 2));
    let (server, client) = handshake(
        one.peer_server_config().unwrap(),
        two.peer_client_config(1).unwrap(),
        "127.0.0.1",
    )
    .await;
    assert_eq!(server, Ok(Some(2)), "the listener reads the dialler's id");
    // The dialler's read ends with the server closing the pipe, not an alert.
    assert!(
        client.is_ok() || client.as_ref().unwrap_err().contains("eof"),
        "{client:?}"
    );
}

#[tokio::test]
async fn a_peer_listener_refuses_strangers() {
    let ca = ClusterCa::create().unwrap();
    let one = leaf(&ca, 1);
    // A certificate from another CA, even naming a member's id.
    let other = ClusterCa::create().unwrap();
    let forged = leaf(&other, 2);
    let (server, _) = handshake(
        one.peer_server_config().unwrap(),
        trusting_presenting(&one, &forged),
        "127.0.0.1",
    )
    .await;
    assert!(server.is_err(), "another CA's certificate: {server:?}");
    // No client certificate at all.
    let anonymous = api_client_config(&ApiTrust::CaCert(ca.cert().clone())).unwrap();
    let (server, _) = handshake(one.peer_server_config().unwrap(), anonymous, "127.0.0.1").await;
    assert!(server.is_err(), "no client certificate: {server:?}");
}

#[tokio::test]
async fn a_peer_client_refuses_the_wrong_id_and_another_ca() {
    let ca = ClusterCa::create().unwrap();
    let (one, two) = (leaf(&ca, 1), leaf(&ca, 2));
    let (_, client) = handshake(
        one.peer_server_config().unwrap(),
        two.peer_client_config(3).unwrap(),
        "127.0.0.1",
    )
    .await;
    let err = client.unwrap_err();
    assert!(err.contains("names server 1, not server 3"), "{err}");

    let other = ClusterCa::create().unwrap();
    let impostor = leaf(&other, 1);
    let (_, client) = handshake(
        impostor.peer_server_config().unwrap(),
        two.peer_client_config(1).unwrap(),
        "127.0.0.1",
    )
    .await;
    assert!(client.is_err(), "another CA's server: {client:?}");
}

#[tokio::test]
async fn api_clients_trust_the_ca_file_or_its_pinned_fingerprint() {
    let ca = ClusterCa::create().unwrap();
    let one = leaf(&ca, 1);
    let api = one.api_server_config().unwrap();
    for trust in [
        ApiTrust::CaCert(ca.cert().clone()),
        ApiTrust::Pinned(ca.fingerprint()),
    ] {
        let (server, client) =
            handshake(api.clone(), api_client_config(&trust).unwrap(), "localhost").await;
        assert_eq!(server, Ok(None), "{trust:?}");
        assert!(
            client.is_ok() || client.as_ref().unwrap_err().contains("eof"),
            "{client:?}"
        );
        // The name dialled must be one of the leaf's.
        let (_, client) = handshake(
            api.clone(),
            api_client_config(&trust).unwrap(),
            "elsewhere.example",
        )
        .await;
        assert!(client.is_err(), "{trust:?}: a name the leaf lacks");
    }
    let other = ClusterCa::create().unwrap();
    for trust in [
        ApiTrust::CaCert(other.cert().clone()),
        ApiTrust::Pinned(other.fingerprint()),
    ] {
        let (_, client) =
            handshake(api.clone(), api_client_config(&trust).unwrap(), "localhost").await;
        assert!(client.is_err(), "{trust:?} trusted another CA's server");
    }
}
