//! A replica's thread polls for more input for a moment after each message before it
//! parks (`NodeConfig::spin`); when the writes stop it parks, so an idle cluster
//! costs its ticks and heartbeats, not a CPU per replica. Its own test binary: the
//! replica threads of other tests' clusters would count too.
#![cfg(target_os = "linux")]

mod common;

use std::time::{Duration, Instant};

use aigrid_consensus::ReplicaConfig;
use aigrid_tls::ClusterCa;
use common::{cluster, leader_node};

/// CPU time (user and system) of this process's threads whose name starts
/// `raft-`, the replicas' own threads.
fn replica_threads_cpu() -> Duration {
    let ticks_per_second = 100; // USER_HZ, what /proc counts in on Linux
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        if !comm.starts_with("raft-") {
            continue;
        }
        // After the parenthesised name: state is field 3, utime and stime 14 and 15.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    Duration::from_millis(ticks * 1000 / ticks_per_second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_park_when_writes_stop() {
    let ca = ClusterCa::create().unwrap();
    // Short ticks and heartbeats: a follower hears from the leader every 40 ms.
    let replica = ReplicaConfig {
        election_tick: 10,
        heartbeat_tick: 2,
        ..ReplicaConfig::default()
    };
    let nodes = cluster(&ca, 3, replica, Duration::from_millis(20)).await;
    let leader = leader_node(&nodes).await;
    // Writes one after another, each through every replica, then none.
    for value in 0..200u64 {
        leader.raft.propose(&value).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let window = Duration::from_secs(2);
    let before = replica_threads_cpu();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = replica_threads_cpu().saturating_sub(before);
    let elapsed = started.elapsed();
    // Three replicas that polled without end would hold about 3 CPUs (or all
    // there are); parked, they take their ticks and heartbeats, well under 1%
    // each. A tenth of one CPU for all three leaves room for a slow machine.
    assert!(
        used < elapsed / 10,
        "the replicas' threads used {used:?} of CPU in {elapsed:?} without a write"
    );
    for node in &nodes {
        assert_eq!(node.raft.read_local(|s| s.values.len()), 200);
    }
}
