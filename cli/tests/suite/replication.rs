//! Real `aigrid server` processes: a 3-server cluster (Raft over mutual TLS) keeps
//! every acknowledged job through a SIGKILL of its leader, a restart, and a restart
//! of the whole cluster.

use crate::common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acks::Acks;
use common::*;

/// Acknowledged submissions, with when each request was sent and answered.
mod acks {
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Default)]
    pub struct Acks {
        pub inner: Mutex<Vec<(String, Instant, Instant)>>,
    }

    impl Acks {
        pub fn push(&self, id: String, sent: Instant, done: Instant) {
            self.inner.lock().unwrap().push((id, sent, done));
        }
        pub fn len(&self) -> usize {
            self.inner.lock().unwrap().len()
        }
        pub fn all(&self) -> Vec<(String, Instant, Instant)> {
            self.inner.lock().unwrap().clone()
        }
    }
}

/// Submits `name` until some server acknowledges it, failing over between servers.
async fn submit_until_acked(
    client: &reqwest::Client,
    urls: &[String],
    start: usize,
    name: &str,
) -> (String, Instant, Instant) {
    let body = job(name);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = start;
    loop {
        assert!(Instant::now() < deadline, "job {name} never acknowledged");
        let url = &urls[attempt % urls.len()];
        let sent = Instant::now();
        let resp = client
            .post(format!("{url}/api/v1/jobs"))
            .json(&body)
            .signed()
            .send()
            .await;
        if let Ok(resp) = resp {
            let status = resp.status().as_u16();
            if let Ok(v) = resp.json::<serde_json::Value>().await {
                // 201 created; 200 when an earlier, unanswered attempt already committed.
                if status == 201 || status == 200 {
                    return (v["id"].as_str().unwrap().to_owned(), sent, Instant::now());
                }
                assert!(
                    status == 503 || status == 429,
                    "unexpected answer {status}: {v}"
                );
            }
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_loses_no_acknowledged_job() {
    // Raft over mutual TLS between the servers, and the API over HTTPS under the
    // same CA.
    let mut cluster = Cluster::start(3, &["--api-tls"]);
    let urls = cluster.urls();
    assert!(urls.iter().all(|u| u.starts_with("https://")));
    let client = https_client(&cluster.ca_dir());
    // Plain HTTP finds no API there.
    assert!(get_json(&http(), &urls[0].replacen("https", "http", 1))
        .await
        .is_none());
    let leader = wait_leader(&client, &urls, Duration::from_secs(20)).await;

    const TOTAL: usize = 300;
    const CLIENTS: usize = 8;
    let acks = Arc::new(Acks::default());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (acks, next, urls, client) = (acks.clone(), next.clone(), urls.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= TOTAL {
                    return;
                }
                let (id, sent, done) =
                    submit_until_acked(&client, &urls, c + n, &format!("job-{n}")).await;
                acks.push(id, sent, done);
            }
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.len() < 80 {
        assert!(Instant::now() < deadline, "writes never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    cluster.server(leader).kill();
    let survivors: Vec<String> = cluster
        .servers
        .iter()
        .filter(|s| s.id != leader)
        .map(ServerProc::url)
        .collect();
    let new_leader =
        wait_leader_other_than(&client, &survivors, Duration::from_secs(10), Some(leader)).await;
    assert_ne!(new_leader, leader);
    // The survivors take writes alone (some sent after the kill are acknowledged, and
    // 200 in all), then the old leader comes back.
    let after_kill = |acks: &Acks| acks.all().iter().any(|(_, sent, _)| *sent > killed_at);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.len() < 200 || !after_kill(&acks) {
        assert!(
            Instant::now() < deadline,
            "the survivors took no writes without the old leader\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restarted_at = Instant::now();
    cluster.server(leader).start();
    for t in tasks {
        t.await.unwrap();
    }

    let all = acks.all();
    assert_eq!(all.len(), TOTAL);
    // Writes sent after the kill were committed by the two survivors alone, before the
    // old leader was back. (How fast the cluster fails over is not a test's business.)
    assert!(
        all.iter()
            .any(|(_, sent, done)| *sent > killed_at && *done < restarted_at),
        "no write sent after the kill was acknowledged before the restart"
    );

    let expected: BTreeSet<String> = all.into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(expected.len(), TOTAL, "every submission is a distinct job");
    wait_converged(&client, &urls, Duration::from_secs(30)).await;
    for url in &urls {
        let held: BTreeSet<String> = local_job_ids(&client, url)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let missing: Vec<_> = expected.difference(&held).collect();
        assert!(
            missing.is_empty(),
            "{url} lacks acknowledged jobs {missing:?}"
        );
        assert_eq!(held.len(), TOTAL, "{url} holds jobs nobody submitted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_cluster_restart_keeps_every_job() {
    let mut cluster = Cluster::start(3, &["--snapshot-entries", "25", "--compact-keep", "5"]);
    let urls = cluster.urls();
    let client = http();
    wait_leader(&client, &urls, Duration::from_secs(20)).await;
    let mut expected = BTreeSet::new();
    for n in 0..60 {
        let (id, _, _) = submit_until_acked(&client, &urls, n, &format!("keep-{n}")).await;
        expected.insert(id);
    }
    // Every server compacted its log behind a snapshot, so the restart below rebuilds
    // state from a snapshot plus the log after it. A follower applies the last entries
    // after the leader answered, and serialises its snapshot apart, so each gets time.
    wait_converged(&client, &urls, Duration::from_secs(30)).await;
    for url in &urls {
        let what = format!("{url} to take a snapshot");
        eventually_async(Duration::from_secs(20), &what, || async {
            let taken = metric(&client, url, "aigrid_raft_snapshots_created_total").await;
            (taken.unwrap_or(0.0) >= 1.0).then_some(())
        })
        .await;
    }
    // Writes sent to followers were committed there from the leader's persisted
    // mark, without waiting for the leader to tell them.
    let mut marked = 0.0;
    for url in &urls {
        marked += metric(&client, url, "aigrid_raft_mark_commits_total")
            .await
            .unwrap_or(0.0);
    }
    assert!(marked > 0.0, "no follower committed from its leader's mark");
    // One crash (SIGKILL) and two clean stops: both must keep everything.
    cluster.servers[0].kill();
    cluster.servers[1].terminate();
    cluster.servers[2].terminate();
    for s in &mut cluster.servers {
        s.start();
    }
    wait_leader(&client, &urls, Duration::from_secs(20)).await;
    for url in &urls {
        // A linearizable read through each server.
        let jobs = get_json(&client, &format!("{url}/api/v1/jobs"))
            .await
            .unwrap();
        let held: BTreeSet<String> = jobs
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(held, expected, "{url} after restart\n{}", cluster.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_quorum_writes_answer_503_and_excess_requests_429() {
    let mut cluster = Cluster::start(3, &["--request-timeout-ms", "3000", "--max-in-flight", "1"]);
    let urls = cluster.urls();
    let client = http();
    wait_leader(&client, &urls, Duration::from_secs(20)).await;
    let resp = post_job(&client, &urls[0], "before").await.unwrap();
    assert_eq!(resp.status(), 201);

    cluster.server(2).kill();
    cluster.server(3).kill();
    let url = urls[0].clone();
    // The write cannot commit; the client's own timeout (20 s, past the server's 3 s
    // request timeout) would fail the test if the server never answered.
    let pending = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            // A 429 means a probe below held the slot as the write arrived: again.
            for _ in 0..100 {
                let resp = post_job(&client, &url, "lost").await.unwrap();
                let status = resp.status().as_u16();
                if status != 429 {
                    let body: serde_json::Value = resp.json().await.unwrap();
                    return (status, body);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the write never got the in-flight slot");
        })
    };
    // While the stuck write holds the one in-flight slot, the door answers 429.
    let body = loop {
        assert!(
            !pending.is_finished(),
            "the stuck write was answered before a second request was refused"
        );
        let resp = client
            .get(format!("{url}/api/v1/cluster"))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            break resp.json::<serde_json::Value>().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body["error"]["code"], "rate_limited");

    let (status, body) = pending.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_quorum");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("leader"),
        "the reason names the missing leader or commit: {body}"
    );

    // Bring the quorum back: the unacknowledged write may or may not have landed, the
    // acknowledged one is there.
    cluster.server(2).start();
    wait_leader(&client, &urls[..2], Duration::from_secs(20)).await;
    let jobs = get_json(&client, &format!("{url}/api/v1/jobs"))
        .await
        .unwrap();
    let names: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"before"), "{names:?}");
}
