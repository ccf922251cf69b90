use super::*;
use crate::ClusterCa;

fn hosts(list: &[&str]) -> Vec<String> {
    list.iter().map(|h| (*h).to_owned()).collect()
}

/// One handshake as node `10.9.9.9`; the server side answers the member the client's
/// certificate names.
async fn handshake(
    server: Arc<ServerConfig>,
    client: ClientConfig,
) -> (Result<Option<Member>, String>, Result<(), String>) {
    crate::test_pipe::handshake(server, client, "10.9.9.9", member_of).await
}

#[test]
fn a_node_is_issued_a_leaf_for_its_own_key_and_hosts() {
    let ca = ClusterCa::create().unwrap();
    let request = NodeKeyRequest::new("gpu-a", &hosts(&["gpu-a.example", "10.0.0.7"])).unwrap();
    let seen: IpAddr = "192.0.2.4".parse().unwrap();
    let chain = ca
        .issue_node("gpu-a", request.csr_pem(), Some(seen))
        .unwrap();
    let identity = request
        .accept(&chain, Some(&ApiTrust::Pinned(ca.fingerprint())))
        .unwrap();
    assert_eq!(identity.node(), "gpu-a");
    assert_eq!(
        member_of(identity.leaf()),
        Some(Member::Node("gpu-a".into()))
    );
    assert_eq!(server_id_of(identity.leaf()), None, "a node is no server");
    let parsed = webpki::EndEntityCert::try_from(identity.leaf()).unwrap();
    let names: Vec<String> = parsed.valid_dns_names().map(str::to_owned).collect();
    assert_eq!(names, vec!["gpu-a.example".to_owned()]);
    assert!(identity.valid_for(Duration::from_secs(300 * 24 * 3600)));
    assert!(!identity.valid_for(Duration::from_secs(400 * 24 * 3600)));
}

#[test]
fn the_ca_takes_only_the_key_and_hosts_of_a_request() {
    let ca = ClusterCa::create().unwrap();
    // A request for another node's name gets a leaf naming the node that asked.
    let request = NodeKeyRequest::new("mallory", &[]).unwrap();
    let chain = ca.issue_node("gpu-a", request.csr_pem(), None).unwrap();
    let leaf = CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(node_id_of(&leaf).as_deref(), Some("gpu-a"));
    // ...which the asker refuses: it names another node.
    let err = request.accept(&chain, None).unwrap_err().to_string();
    assert!(err.contains("names node gpu-a"), "{err}");

    for (csr, why) in [
        ("not pem".to_owned(), "not a PEM"),
        ("x".repeat(MAX_CSR_BYTES + 1), "larger than"),
    ] {
        let err = ca.issue_node("gpu-a", &csr, None).unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
    }
    // A request whose signature does not hold is refused.
    let good = NodeKeyRequest::new("gpu-a", &[]).unwrap();
    let mut lines: Vec<String> = good.csr_pem().lines().map(str::to_owned).collect();
    let body = lines.len() - 2;
    let flip = |c: char| if c == 'A' { 'B' } else { 'A' };
    let mut chars: Vec<char> = lines[body].chars().collect();
    chars[4] = flip(chars[4]);
    lines[body] = chars.into_iter().collect();
    let tampered = lines.join("\n");
    assert!(ca.issue_node("gpu-a", &tampered, None).is_err());
    let too_many: Vec<String> = (0..=MAX_NODE_HOSTS)
        .map(|i| format!("h{i}.example"))
        .collect();
    assert!(NodeKeyRequest::new("gpu-a", &too_many).is_err());
    assert!(NodeKeyRequest::new("a/b", &[]).is_err());
    assert!(ca.issue_node("a b", good.csr_pem(), None).is_err());
}

#[test]
fn a_chain_from_another_ca_or_for_another_key_is_refused() {
    let ca = ClusterCa::create().unwrap();
    let other = ClusterCa::create().unwrap();
    let request = NodeKeyRequest::new("gpu-a", &[]).unwrap();
    let chain = other.issue_node("gpu-a", request.csr_pem(), None).unwrap();
    let err = request
        .accept(&chain, Some(&ApiTrust::Pinned(ca.fingerprint())))
        .unwrap_err()
        .to_string();
    assert!(err.contains("another CA"), "{err}");

    let request = NodeKeyRequest::new("gpu-a", &[]).unwrap();
    let someone_else = NodeKeyRequest::new("gpu-a", &[]).unwrap();
    let chain = ca
        .issue_node("gpu-a", someone_else.csr_pem(), None)
        .unwrap();
    let err = request
        .accept(&chain, Some(&ApiTrust::CaCert(ca.cert().clone())))
        .unwrap_err()
        .to_string();
    assert!(err.contains("key"), "{err}");
}

#[test]
fn an_issued_identity_saves_and_loads_for_its_node_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::create().unwrap();
    let identity = ca.issue_node_identity("gpu-a", &hosts(&["gpu-a"])).unwrap();
    identity.save(dir.path()).unwrap();
    let loaded = NodeIdentity::load(dir.path(), "gpu-a").unwrap();
    assert_eq!(loaded.leaf(), identity.leaf());
    // The CA as PEM, as model servers are handed it: the CA itself, alone.
    let pem = loaded.ca_pem();
    let read = crate::ca::ca_cert_from_pem(&pem, Path::new("ca")).unwrap();
    assert_eq!(&read, ca.cert());
    assert_eq!(crate::ca::last_pem_certificate(ca.cert_pem()), Some(pem));
    let err = NodeIdentity::load(dir.path(), "gpu-b")
        .unwrap_err()
        .to_string();
    assert!(err.contains("names node gpu-a, not node gpu-b"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn the_data_port_knows_members_and_lets_strangers_in_unnamed() {
    let ca = ClusterCa::create().unwrap();
    // The anonymous client below checks the name it dials (10.9.9.9); a peer
    // does not.
    let a = ca
        .issue_node_identity("gpu-a", &hosts(&["10.9.9.9"]))
        .unwrap();
    let b = ca.issue_node_identity("gpu-b", &[]).unwrap();
    let server = a.data_server_config().unwrap();

    // A peer presents its leaf and is named; it accepts the port's leaf wherever
    // it answers.
    let (seen, client) = handshake(server.clone(), b.data_client_config().unwrap()).await;
    client.unwrap();
    assert_eq!(seen.unwrap(), Some(Member::Node("gpu-b".into())));

    // A client that trusts the CA but has no certificate gets in, unnamed.
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca.cert()).unwrap())
        .with_no_client_auth();
    let (seen, _) = handshake(server.clone(), anonymous).await;
    assert_eq!(seen.unwrap(), None);

    // A certificate from another CA is refused at the handshake.
    let other = ClusterCa::create().unwrap();
    let stranger = other.issue_node_identity("gpu-a", &[]).unwrap();
    let (seen, _) = handshake(server.clone(), stranger.data_client_config().unwrap()).await;
    assert!(seen.is_err(), "a stranger's certificate: {seen:?}");

    // A node does not accept a data port whose leaf is from another CA.
    let (_, client) = handshake(
        stranger.data_server_config().unwrap(),
        b.data_client_config().unwrap(),
    )
    .await;
    assert!(client.is_err());
}
