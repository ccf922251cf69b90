use super::*;
use aigrid_tls::ClusterCa;

struct Collect(std::sync::mpsc::Sender<Message>);

impl Inbox for Collect {
    fn deliver(&self, messages: Vec<Message>) -> bool {
        messages.into_iter().all(|m| self.0.send(m).is_ok())
    }
}

fn heartbeat(from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

fn metrics() -> Arc<RaftMetrics> {
    Arc::new(RaftMetrics::register(&prometheus::Registry::new()).unwrap())
}

fn identity(ca: &ClusterCa, id: u64) -> Arc<ServerIdentity> {
    Arc::new(ca.issue_server(id, &["127.0.0.1".into()]).unwrap())
}

/// Server `id`'s peer listener on a free port, collecting what it is delivered.
async fn listening(
    ca: &ClusterCa,
    id: u64,
    limits: PeerLimits,
) -> (String, std::sync::mpsc::Receiver<Message>, Arc<RaftMetrics>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let metrics = metrics();
    let identity = identity(ca, id);
    let m = metrics.clone();
    let accepting = listen(listener, &identity, metrics.clone(), &limits).unwrap();
    tokio::spawn(async move {
        serve(
            accepting,
            id,
            Arc::new(Collect(tx)),
            m,
            limits,
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (addr, rx, metrics)
}

/// Limits that refuse a batch (or a stream's frame) over 1 KiB.
fn small_batches() -> PeerLimits {
    PeerLimits {
        max_batch_bytes: 1024,
        ..PeerLimits::default()
    }
}

/// An HTTP client presenting `presenting`'s certificate to server `peer`.
fn client(presenting: &ServerIdentity, peer: u64) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(presenting.peer_client_config(peer).unwrap())
        .build()
        .unwrap()
}

/// An HTTP client that trusts `ca`'s servers and presents `who`'s certificate,
/// whichever CA issued it.
fn trusting_presenting(ca: &ClusterCa, who: &ServerIdentity) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tempfile::tempdir().unwrap();
    who.save(dir.path()).unwrap();
    let chain = CertificateDer::pem_file_iter(dir.path().join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(aigrid_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_does_not_hold_up_a_live_one() {
    let ca = ClusterCa::create().unwrap();
    let (live, rx, _) = listening(&ca, 2, PeerLimits::default()).await;
    // Nothing listens on the dead peer's address (a port taken and released).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);

    let unreachable = Arc::new(Mutex::new(Vec::new()));
    let seen = unreachable.clone();
    let metrics = metrics();
    let transport = Transport::new(
        identity(&ca, 1),
        tokio::runtime::Handle::current(),
        Arc::new(move |f| seen.lock().push(f)),
        metrics.clone(),
    );
    transport.set_members(&BTreeMap::from([(2, live), (3, dead_addr)]));

    let started = std::time::Instant::now();
    for term in 0..2_000 {
        transport.send(heartbeat(1, 3, term));
        transport.send(heartbeat(1, 2, term));
    }
    let received = tokio::task::spawn_blocking(move || {
        (0..2_000)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap().term)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(
        received,
        (0..2_000).collect::<Vec<_>>(),
        "delivered in order"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the live peer waited {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        unreachable
            .lock()
            .iter()
            .any(|f| matches!(f, Feedback::Unreachable(3))),
        "the dead peer is reported unreachable"
    );
    assert!(metrics.messages_dropped.get() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_counts_only_from_the_server_its_certificate_names() {
    let ca = ClusterCa::create().unwrap();
    let (addr, rx, metrics) = listening(&ca, 2, PeerLimits::default()).await;
    let url = format!("https://{addr}{MESSAGES_PATH}");
    let three = identity(&ca, 3);
    // Server 3 speaking for server 1, and to server 4 through server 2: refused.
    for forged in [heartbeat(1, 2, 5), heartbeat(3, 4, 5)] {
        let resp = client(&three, 2)
            .post(&url)
            .body(encode_batch(&[forged]).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(metrics.peer_messages_refused.get(), 2);
    // The old address header moves nothing: it is not read at all.
    let resp = client(&three, 2)
        .post(&url)
        .header("x-aigrid-raft-from-id", "1")
        .header("x-aigrid-raft-from-addr", "203.0.113.9:7701")
        .body(encode_batch(&[heartbeat(3, 2, 6)]).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((got.from, got.term), (3, 6), "only its own message arrived");
    assert!(rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_do_not_reach_the_peer_routes() {
    let ca = ClusterCa::create().unwrap();
    let (addr, rx, metrics) = listening(&ca, 2, PeerLimits::default()).await;
    let url = format!("https://{addr}{MESSAGES_PATH}");
    let body = encode_batch(&[heartbeat(1, 2, 5)]).unwrap();
    // A certificate from another CA, naming a member.
    let other = ClusterCa::create().unwrap();
    let forged = identity(&other, 1);
    let sent = trusting_presenting(&ca, &forged)
        .post(&url)
        .body(body.clone())
        .send()
        .await;
    assert!(sent.is_err(), "another CA's certificate was let in");
    // No certificate at all, trusting the server.
    let anonymous =
        aigrid_tls::api_client_config(&aigrid_tls::ApiTrust::CaCert(ca.cert().clone())).unwrap();
    let sent = reqwest::Client::builder()
        .tls_backend_preconfigured(anonymous)
        .build()
        .unwrap()
        .post(&url)
        .body(body)
        .send()
        .await;
    assert!(sent.is_err(), "a client without a certificate was let in");
    // Plain HTTP.
    let plain = reqwest::get(format!("http://{addr}{MESSAGES_PATH}")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    assert!(rx.try_recv().is_err(), "nothing was delivered");
    assert!(metrics.peer_connections_refused.get() >= 2);
    // The same client shape with a member's certificate gets in.
    let resp = trusting_presenting(&ca, &identity(&ca, 1))
        .post(&url)
        .body(encode_batch(&[heartbeat(1, 2, 5)]).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().from, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_are_refused_before_delivery() {
    let ca = ClusterCa::create().unwrap();
    let (addr, rx, _) = listening(&ca, 2, small_batches()).await;
    let three = identity(&ca, 3);
    let mut big = heartbeat(3, 2, 1);
    big.set_msg_type(MessageType::MsgAppend);
    big.context = vec![0u8; 4096].into();
    let resp = client(&three, 2)
        .post(format!("https://{addr}{MESSAGES_PATH}"))
        .body(encode_batch(&[big]).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(rx.try_recv().is_err());
}

/// A frame of a stream: the batch's length, then the batch.
fn frame(batch: &[Message]) -> Bytes {
    let body = encode_batch(batch).unwrap();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out.into()
}

/// Opens a stream to `addr` as `presenting`, to server `peer`: the frames given to
/// the returned sender go out as they come; the handle answers once the server ends
/// the request.
fn open_stream(
    presenting: &ServerIdentity,
    peer: u64,
    addr: &str,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, std::io::Error>(f), rx))
    });
    let request = client(presenting, peer)
        .post(format!("https://{addr}{STREAM_PATH}"))
        .body(reqwest::Body::wrap_stream(body))
        .send();
    (tx, tokio::spawn(request))
}

/// The status the server ended a stream with, within 5 seconds.
async fn ended(answer: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) -> StatusCode {
    let resp = tokio::time::timeout(Duration::from_secs(5), answer).await;
    resp.unwrap().unwrap().unwrap().status()
}

fn recv(rx: &std::sync::mpsc::Receiver<Message>) -> Message {
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_delivers_each_frame_as_it_arrives_and_ends_at_a_forged_one() {
    let ca = ClusterCa::create().unwrap();
    let (addr, rx, metrics) = listening(&ca, 2, PeerLimits::default()).await;
    let three = identity(&ca, 3);
    let (frames, answer) = open_stream(&three, 2, &addr);
    frames.send(frame(&[heartbeat(3, 2, 1)])).await.unwrap();
    // Delivered while the request is still open.
    assert_eq!(recv(&rx).term, 1);
    // One frame split across writes, then two frames in one write.
    let split = frame(&[heartbeat(3, 2, 2), heartbeat(3, 2, 3)]);
    frames.send(split.slice(..7)).await.unwrap();
    frames.send(split.slice(7..)).await.unwrap();
    let mut two = frame(&[heartbeat(3, 2, 4)]).to_vec();
    two.extend_from_slice(&frame(&[heartbeat(3, 2, 5)]));
    frames.send(two.into()).await.unwrap();
    let terms: Vec<u64> = (0..4).map(|_| recv(&rx).term).collect();
    assert_eq!(terms, [2, 3, 4, 5], "in order");
    assert!(!answer.is_finished());
    // A mixed frame delivers the server's own messages only; a frame of nothing but
    // another server's messages ends the stream.
    frames
        .send(frame(&[heartbeat(1, 2, 6), heartbeat(3, 2, 7)]))
        .await
        .unwrap();
    assert_eq!(recv(&rx).term, 7);
    frames.send(frame(&[heartbeat(1, 2, 8)])).await.unwrap();
    assert_eq!(ended(answer).await, StatusCode::FORBIDDEN);
    assert_eq!(metrics.peer_messages_refused.get(), 2);
    let _ = frames.send(frame(&[heartbeat(3, 2, 9)])).await;
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_frame_over_the_limit_is_refused_before_it_is_read() {
    let ca = ClusterCa::create().unwrap();
    let (addr, rx, _) = listening(&ca, 2, small_batches()).await;
    let (frames, answer) = open_stream(&identity(&ca, 3), 2, &addr);
    frames.send(frame(&[heartbeat(3, 2, 1)])).await.unwrap();
    assert_eq!(recv(&rx).term, 1);
    // Only the length of a 1 GiB frame is sent: the answer comes without its body.
    frames
        .send(Bytes::copy_from_slice(&(1u32 << 30).to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(ended(answer).await, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_opens_a_new_stream_when_its_peer_ends_the_old_one() {
    let ca = ClusterCa::create().unwrap();
    let (addr, rx, _) = listening(&ca, 2, PeerLimits::default()).await;
    let unreachable = Arc::new(Mutex::new(Vec::new()));
    let seen = unreachable.clone();
    let transport = Transport::new(
        identity(&ca, 1),
        tokio::runtime::Handle::current(),
        Arc::new(move |f| seen.lock().push(f)),
        metrics(),
    );
    transport.set_members(&BTreeMap::from([(2, addr)]));
    transport.send(heartbeat(1, 2, 1));
    assert_eq!(recv(&rx).term, 1);
    // The replica behind the first listener stops (its stream ends with 503) and
    // the peer is configured at a new address.
    drop(rx);
    let (moved, rx, _) = listening(&ca, 2, PeerLimits::default()).await;
    transport.set_members(&BTreeMap::from([(2, moved)]));
    let rx = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut term = 2;
        // The old stream still takes frames; keep sending until the new one exists.
        loop {
            assert!(std::time::Instant::now() < deadline, "never reconnected");
            transport.send(heartbeat(1, 2, term));
            if let Ok(m) = rx.recv_timeout(Duration::from_millis(100)) {
                assert!(m.term >= 2);
                break;
            }
            term += 1;
        }
    });
    rx.await.unwrap();
    assert!(unreachable
        .lock()
        .iter()
        .any(|f| matches!(f, Feedback::Unreachable(2))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_listener_ends_the_streams_peers_keep_open_and_returns() {
    let ca = ClusterCa::create().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let limits = PeerLimits::default();
    let accepting = listen(listener, &identity(&ca, 2), metrics(), &limits).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(
        accepting,
        2,
        Arc::new(Collect(tx)),
        metrics(),
        limits,
        async move {
            let _ = stopped.await;
        },
    ));
    let (frames, answer) = open_stream(&identity(&ca, 3), 2, &addr);
    frames.send(frame(&[heartbeat(3, 2, 1)])).await.unwrap();
    assert_eq!(recv(&rx).term, 1);
    // The peer's stream never ends by itself; the listener still stops at once.
    stop.send(()).unwrap();
    assert_eq!(ended(answer).await, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::timeout(Duration::from_secs(2), serving)
        .await
        .expect("the listener waited on an open stream")
        .unwrap()
        .unwrap();
    drop(frames);
}

#[test]
fn limits_cover_the_largest_batch_a_sender_makes() {
    let limits = PeerLimits::for_entries(16 << 20);
    assert!(limits.max_batch_bytes >= BATCH_BYTES + (16 << 20));
    assert!(limits.max_batch_bytes < 2 * (BATCH_BYTES + (16 << 20)));
}

#[test]
fn batch_round_trip() {
    let mut a = Message::default();
    a.set_msg_type(MessageType::MsgHeartbeat);
    a.to = 2;
    a.from = 1;
    a.term = 7;
    let mut b = Message::default();
    b.set_msg_type(MessageType::MsgAppend);
    b.to = 3;
    b.commit = 9;
    let bytes = encode_batch(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(decode_batch(&bytes).unwrap(), vec![a, b]);
    assert!(decode_batch(&bytes[..bytes.len() - 1]).is_err());
    assert!(decode_batch(&[0, 0]).is_err());
}

#[test]
fn connections_accepted_on_one_runtime_are_served_on_another() {
    let ca = ClusterCa::create().unwrap();
    let runtime = |threads| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };
    let (accepting_rt, sending_rt) = (runtime(1), runtime(1));
    let serving_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = identity(&ca, 2);
    let listener = accepting_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepting = {
        let _on = accepting_rt.enter();
        listen(listener, &server, metrics(), &PeerLimits::default()).unwrap()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = std::thread::spawn(move || {
        serving_rt.block_on(serve(
            accepting,
            2,
            Arc::new(Collect(tx)),
            metrics(),
            PeerLimits::default(),
            async move {
                let _ = stopped.await;
            },
        ))
    });
    let transport = Transport::new(
        identity(&ca, 1),
        sending_rt.handle().clone(),
        Arc::new(|_| {}),
        metrics(),
    );
    transport.set_members(&BTreeMap::from([(2, addr)]));
    let exchange = |terms: std::ops::RangeInclusive<u64>| {
        for term in terms.clone() {
            transport.send(heartbeat(1, 2, term));
        }
        let received: Vec<u64> = terms
            .clone()
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap().term)
            .collect();
        assert_eq!(received, terms.collect::<Vec<_>>());
    };
    exchange(1..=100);
    // The connection's handshake was made on the accepting runtime; with that
    // runtime gone, the serving runtime still reads what the same stream carries.
    drop(accepting_rt);
    exchange(101..=200);
    drop(transport);
    drop(sending_rt);
    stop.send(()).unwrap();
    serving.join().unwrap().unwrap();
}
