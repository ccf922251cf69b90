//! Tests of one replica's `Ready` cycle and its snapshot points.

use super::*;
use crate::testkit::ListMachine;
use crate::testkit::SimDisk;

fn single_leader(disk: &SimDisk) -> Replica<ListMachine> {
    let store = LogStore::open(Box::new(disk.clone())).unwrap();
    let members = BTreeMap::from([(1, "a:1".to_string())]);
    let mut replica = Replica::open(
        ReplicaConfig::default(),
        store,
        ListMachine::default(),
        &members,
        None,
    )
    .unwrap();
    replica.campaign().unwrap();
    while replica.has_ready() || !replica.is_leader() {
        replica.handle_ready(&mut |_| {}).unwrap();
    }
    replica
}

#[test]
fn many_proposals_share_one_durable_write() {
    let disk = SimDisk::default();
    let mut replica = single_leader(&disk);
    let before = disk.writes();
    for i in 0..100u64 {
        let data = serde_json::to_vec(&i).unwrap();
        replica.propose(RequestId(u128::from(i)), data).unwrap();
    }
    let mut applied = Vec::new();
    while replica.has_ready() {
        applied.extend(replica.handle_ready(&mut |_| {}).unwrap().applied);
    }
    assert_eq!(
        applied.len(),
        100,
        "every proposal was applied and answered"
    );
    assert_eq!(disk.writes() - before, 1, "100 proposals, one fsync");
    assert_eq!(replica.state().read().values, (0..100).collect::<Vec<_>>());
}

#[test]
fn replicas_take_their_snapshots_at_staggered_points() {
    let points: Vec<u64> = (1..=5).map(|id| stagger_snapshot(1000, id)).collect();
    assert_eq!(points, vec![1000, 1125, 1250, 1375, 1500]);
    assert_eq!(stagger_snapshot(u64::MAX, 3), u64::MAX);
}

#[test]
fn restart_replays_the_log_to_the_same_state() {
    let disk = SimDisk::default();
    let mut replica = single_leader(&disk);
    for i in 0..10u64 {
        replica
            .propose(RequestId(u128::from(i)), serde_json::to_vec(&i).unwrap())
            .unwrap();
        while replica.has_ready() {
            replica.handle_ready(&mut |_| {}).unwrap();
        }
    }
    let before = replica.state().read().clone();
    drop(replica);
    let mut again = single_leader(&disk);
    while again.has_ready() {
        again.handle_ready(&mut |_| {}).unwrap();
    }
    assert_eq!(*again.state().read(), before);
}
