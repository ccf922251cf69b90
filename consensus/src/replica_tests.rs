//! Tests of one replica's `Ready` cycle and its snapshot points.

use super::snapshots::stagger_snapshot;
use super::*;
use crate::state_machine::SnapshotJob;
use crate::testkit::ListMachine;
use crate::testkit::SimDisk;
use raft::prelude::MessageType;

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

/// A list whose snapshots wait at a gate once captured, as a large state's
/// serialisation takes its time.
#[derive(Default)]
struct GatedMachine {
    list: ListMachine,
    gate: Arc<parking_lot::Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
}

impl StateMachine for GatedMachine {
    type Command = u64;
    type Output = usize;

    fn apply(&mut self, index: u64, command: u64) -> usize {
        self.list.apply(index, command)
    }

    fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        self.list.snapshot()
    }

    fn capture(&self) -> SnapshotJob {
        let list = self.list.clone();
        let gate = self.gate.lock().take();
        Box::new(move || {
            if let Some(gate) = gate {
                let _ = gate.recv();
            }
            list.snapshot()
        })
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        self.list.restore(data)
    }
}

fn run_ready(replica: &mut Replica<GatedMachine>) {
    while replica.has_ready() {
        replica.handle_ready(&mut |_| {}).unwrap();
    }
}

#[test]
fn a_slow_snapshot_does_not_stop_the_replica_and_holds_the_state_it_captured() {
    let disk = SimDisk::default();
    let members = BTreeMap::from([(1, "a:1".to_string())]);
    let config = ReplicaConfig {
        snapshot_entries: 5,
        compact_keep: 1,
        ..Default::default()
    };
    let open = || {
        let store = LogStore::open(Box::new(disk.clone())).unwrap();
        let machine = GatedMachine::default();
        let mut replica = Replica::open(config.clone(), store, machine, &members, None).unwrap();
        replica.campaign().unwrap();
        while replica.has_ready() || !replica.is_leader() {
            replica.handle_ready(&mut |_| {}).unwrap();
        }
        replica
    };
    let (release, gate) = std::sync::mpsc::channel();
    let mut replica = open();
    *replica.state().read().gate.lock() = Some(gate);
    let propose = |replica: &mut Replica<GatedMachine>, values: std::ops::Range<u64>| {
        for i in values {
            let data = serde_json::to_vec(&i).unwrap();
            replica.propose(RequestId(u128::from(i)), data).unwrap();
            run_ready(replica);
        }
    };
    // Within five entries a snapshot is due; it is captured and waits at the gate.
    let mut next = 0;
    while replica.snapshotting.is_none() {
        assert!(next < 5, "no snapshot after {next} entries");
        propose(&mut replica, next..next + 1);
        next += 1;
    }
    let captured_at = replica.status().applied_index;
    // Meanwhile the replica goes on committing and applying.
    propose(&mut replica, next..20);
    assert_eq!(
        replica.state().read().list.values,
        (0..20).collect::<Vec<_>>()
    );
    assert!(
        replica.status().snapshot_index < captured_at,
        "the snapshot is still being serialised"
    );
    release.send(()).unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while replica.status().snapshot_index != captured_at {
        assert!(Instant::now() < deadline, "the snapshot was never stored");
        std::thread::sleep(std::time::Duration::from_millis(5));
        run_ready(&mut replica);
    }
    drop(replica);
    // Restarted from the snapshot and the log behind it: the snapshot holds the
    // state as captured (the first five values), the log the rest, once each.
    let again = open();
    assert_eq!(
        again.state().read().list.values,
        (0..20).collect::<Vec<_>>()
    );
}

/// Three replicas on simulated disks, server 1 elected; `hold` is
/// `ReplicaConfig::hold_commit_notices`.
fn three_servers(hold: bool) -> (Vec<Replica<ListMachine>>, Vec<SimDisk>) {
    servers(
        3,
        ReplicaConfig {
            hold_commit_notices: hold,
            ..Default::default()
        },
    )
}

/// `count` replicas on simulated disks with `config` (each its own id), server 1
/// elected.
fn servers(count: u64, config: ReplicaConfig) -> (Vec<Replica<ListMachine>>, Vec<SimDisk>) {
    let members: BTreeMap<u64, String> = (1..=count).map(|id| (id, format!("s{id}:1"))).collect();
    let disks: Vec<SimDisk> = (0..count).map(|_| SimDisk::default()).collect();
    let mut servers: Vec<Replica<ListMachine>> = (1..=count)
        .map(|id| {
            let store = LogStore::open(Box::new(disks[id as usize - 1].clone())).unwrap();
            let config = ReplicaConfig {
                id,
                ..config.clone()
            };
            Replica::open(config, store, ListMachine::default(), &members, None).unwrap()
        })
        .collect();
    let mut wire: Vec<Message> = Vec::new();
    servers[0].campaign().unwrap();
    for _ in 0..20 {
        for server in servers.iter_mut() {
            while server.has_ready() {
                server.handle_ready(&mut |m| wire.push(m)).unwrap();
            }
        }
        deliver(&mut servers, &mut wire);
    }
    assert!(servers[0].is_leader());
    (servers, disks)
}

fn deliver(servers: &mut [Replica<ListMachine>], wire: &mut Vec<Message>) {
    for m in wire.drain(..) {
        servers[m.to as usize - 1].step(m);
    }
}

/// One pass of a server's `Ready` cycle: what it sent and what it applied.
fn pass(server: &mut Replica<ListMachine>, wire: &mut Vec<Message>) -> Vec<RequestId> {
    let mut sent = Vec::new();
    let out = server.handle_ready(&mut |m| sent.push(m)).unwrap();
    wire.extend(sent);
    out.applied.into_iter().map(|(id, _)| id).collect()
}

/// Messages on the wire that tell a follower a commit index with no entries.
fn commit_notices(wire: &[Message]) -> Vec<(u64, u64)> {
    let mut notices: Vec<_> = wire
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgAppend && m.entries.is_empty())
        .map(|m| (m.to, m.commit))
        .collect();
    notices.sort_unstable();
    notices
}

/// A round from the leader (server 1): its pass sends, the followers answer, and
/// its next pass takes their answers in; what that pass applied. Messages to the
/// servers in `cut` are lost.
fn round(
    servers: &mut [Replica<ListMachine>],
    wire: &mut Vec<Message>,
    cut: &[u64],
) -> Vec<RequestId> {
    pass(&mut servers[0], wire);
    wire.retain(|m| !cut.contains(&m.to));
    deliver(servers, wire);
    for follower in &mut servers[1..] {
        pass(follower, wire);
    }
    deliver(servers, wire);
    let applied = pass(&mut servers[0], wire);
    wire.retain(|m| !cut.contains(&m.to));
    applied
}

/// A write on the leader, in one [`round`]: the followers acknowledge its
/// appends and the leader commits it.
fn write_on_leader(
    servers: &mut [Replica<ListMachine>],
    wire: &mut Vec<Message>,
    id: u128,
    cut: &[u64],
) -> Vec<RequestId> {
    servers[0]
        .propose(RequestId(id), id.to_string().into_bytes())
        .unwrap();
    round(servers, wire, cut)
}

/// [`three_servers`] after one write on the leader, committed there: the
/// servers, the messages on the wire and the leader's commit index.
fn after_one_write(hold: bool) -> (Vec<Replica<ListMachine>>, Vec<Message>, u64) {
    let (servers, _disks) = three_servers(hold);
    one_write(servers)
}

/// `servers` (server 1 their leader) after one write on the leader, as
/// [`after_one_write`].
fn one_write(
    mut servers: Vec<Replica<ListMachine>>,
) -> (Vec<Replica<ListMachine>>, Vec<Message>, u64) {
    let mut wire = Vec::new();
    assert_eq!(
        write_on_leader(&mut servers, &mut wire, 1, &[]),
        vec![RequestId(1)]
    );
    let committed = servers[0].status().commit_index;
    (servers, wire, committed)
}

#[test]
fn a_leader_holds_its_commit_notice_for_the_next_append_to_carry() {
    // Without persisted marks: with them, the follower's own write below commits
    // from the leader's mark instead (see the tests after this one).
    let (servers, _disks) = servers(
        3,
        ReplicaConfig {
            persisted_marks: false,
            ..Default::default()
        },
    );
    let (mut servers, mut wire, committed) = one_write(servers);
    assert_eq!(commit_notices(&wire), vec![], "the notice is held");
    assert!(servers[0].commit_notice_pending());
    assert!(servers[1].status().commit_index < committed);

    // Write 2's appends tell the followers that write 1 is committed.
    servers[0].propose(RequestId(2), b"2".to_vec()).unwrap();
    pass(&mut servers[0], &mut wire);
    assert!(wire
        .iter()
        .all(|m| m.entries.len() == 1 && m.commit == committed));
    assert!(!servers[0].commit_notice_pending(), "the appends told them");
    deliver(&mut servers, &mut wire);
    for follower in &mut servers[1..] {
        pass(follower, &mut wire);
        assert_eq!(follower.status().commit_index, committed);
        assert_eq!(follower.state().read().values, vec![1]);
    }
    deliver(&mut servers, &mut wire);
    assert_eq!(pass(&mut servers[0], &mut wire), vec![RequestId(2)]);

    // No write follows: the driver sends the held notice when it is due.
    assert!(servers[0].commit_notice_pending());
    servers[0].send_commit_notice();
    pass(&mut servers[0], &mut wire);
    let committed = servers[0].status().commit_index;
    assert_eq!(commit_notices(&wire), vec![(2, committed), (3, committed)]);
    assert!(!servers[0].commit_notice_pending());
    deliver(&mut servers, &mut wire);
    for follower in &mut servers[1..] {
        pass(follower, &mut wire);
        assert_eq!(follower.state().read().values, vec![1, 2]);
    }
    deliver(&mut servers, &mut wire);
    pass(&mut servers[0], &mut wire);

    // A follower's own write: it hears of the commit at once, and answers; the
    // other follower's notice stays held.
    servers[1].propose(RequestId(3), b"3".to_vec()).unwrap();
    pass(&mut servers[1], &mut wire);
    deliver(&mut servers, &mut wire);
    pass(&mut servers[0], &mut wire);
    deliver(&mut servers, &mut wire);
    for follower in &mut servers[1..] {
        pass(follower, &mut wire);
    }
    deliver(&mut servers, &mut wire);
    pass(&mut servers[0], &mut wire);
    let committed = servers[0].status().commit_index;
    assert_eq!(
        commit_notices(&wire),
        vec![(2, committed)],
        "only the follower waiting on the write hears at once"
    );
    assert!(servers[0].commit_notice_pending(), "server 3's is held");
    deliver(&mut servers, &mut wire);
    assert_eq!(pass(&mut servers[1], &mut wire), vec![RequestId(3)]);
    // ... and later commits are held again.
    pass(&mut servers[2], &mut wire);
    deliver(&mut servers, &mut wire);
    pass(&mut servers[0], &mut wire);
    assert_eq!(
        write_on_leader(&mut servers, &mut wire, 4, &[]),
        vec![RequestId(4)]
    );
    assert_eq!(commit_notices(&wire), vec![]);
}

/// The persisted marks on the appends in `wire`: (to, mark).
fn marks(wire: &[Message]) -> Vec<(u64, u64)> {
    let mut marks: Vec<_> = wire
        .iter()
        .filter_map(|m| LeaderMark::of(m).map(|mark| (m.to, mark.index)))
        .collect();
    marks.sort_unstable();
    marks
}

/// [`after_one_write`], every follower told of the commit: the servers and the
/// commit index.
fn settled_after_one_write() -> (Vec<Replica<ListMachine>>, u64) {
    let (mut servers, mut wire, committed) = after_one_write(true);
    servers[0].send_commit_notice();
    round(&mut servers, &mut wire, &[]);
    (servers, committed)
}

#[test]
fn a_follower_answers_its_forwarded_write_from_the_leaders_mark_before_the_leader_commits() {
    let (mut servers, _) = settled_after_one_write();
    let mut wire = Vec::new();

    servers[1].propose(RequestId(3), b"3".to_vec()).unwrap();
    pass(&mut servers[1], &mut wire);
    deliver(&mut servers, &mut wire);
    // The leader appends the write, sends it, writes it, and marks it to the
    // follower waiting on it at once: to that follower alone.
    pass(&mut servers[0], &mut wire);
    let last = servers[0].status().last_index;
    let commit_before = servers[0].status().commit_index;
    assert!(
        commit_before < last,
        "the leader has no acknowledgement yet"
    );
    assert!(marks(&wire).contains(&(2, last)), "{:?}", marks(&wire));
    assert!(
        !marks(&wire).contains(&(3, last)),
        "the other follower waits on no write: its mark rides on the next append"
    );
    // The follower writes the entry and, the leader's mark covering it, applies
    // and answers it in the same pass: before the leader hears its acknowledgement.
    deliver(&mut servers, &mut wire);
    assert_eq!(pass(&mut servers[1], &mut wire), vec![RequestId(3)]);
    assert_eq!(servers[1].status().commit_index, last);
    assert_eq!(servers[1].state().read().values, vec![1, 3]);
    assert_eq!(servers[0].status().commit_index, commit_before);
    // The other follower wrote it too, but has no mark covering it: it does not
    // apply it yet.
    pass(&mut servers[2], &mut wire);
    assert_eq!(servers[2].state().read().values, vec![1]);
    // The leader commits on the acknowledgements, and sends no notice the mark
    // made needless.
    deliver(&mut servers, &mut wire);
    pass(&mut servers[0], &mut wire);
    assert_eq!(servers[0].status().commit_index, last);
    assert_eq!(commit_notices(&wire), vec![]);
}

/// The append carrying server 1's next write (`data`) to server `to`, its persisted
/// mark raised past everything.
fn append_marked_past_all(
    servers: &mut [Replica<ListMachine>],
    id: u128,
    data: &[u8],
    to: u64,
) -> Message {
    let mut wire = Vec::new();
    servers[0].propose(RequestId(id), data.to_vec()).unwrap();
    pass(&mut servers[0], &mut wire);
    let mut append = wire
        .into_iter()
        .find(|m| m.to == to && m.entries.len() == 1)
        .unwrap();
    append.context = u64::MAX.to_be_bytes().to_vec().into();
    append
}

#[test]
fn a_mark_commits_nothing_past_what_the_follower_wrote() {
    let (mut servers, committed) = settled_after_one_write();
    let append = append_marked_past_all(&mut servers, 2, b"2", 2);
    let index = append.entries[0].index;
    servers[1].step(append);
    assert_eq!(
        servers[1].status().commit_index,
        committed,
        "the entry is not on its disk yet"
    );
    let mut wire = Vec::new();
    assert_eq!(pass(&mut servers[1], &mut wire), vec![RequestId(2)]);
    assert_eq!(servers[1].status().commit_index, index);
    assert_eq!(servers[1].state().read().values, vec![1, 2]);
}

#[test]
fn a_mark_commits_no_entry_of_an_earlier_term() {
    // An entry of term T reaches a follower in an append of term T + 1, as a new
    // leader resends its predecessor's entries: the follower holds it, but the
    // mark is of another term than the entry, so it commits nothing.
    let (mut servers, _disks) = three_servers(true);
    let term = servers[0].term();
    let before = servers[2].status().commit_index;
    let mut append = append_marked_past_all(&mut servers, 5, b"5", 3);
    append.term = term + 1;
    servers[2].step(append);
    let mut wire = Vec::new();
    pass(&mut servers[2], &mut wire);
    assert_eq!(servers[2].term(), term + 1);
    assert_eq!(
        servers[2].status().last_index,
        before + 1,
        "it holds the entry"
    );
    assert_eq!(servers[2].status().commit_index, before);
    assert_eq!(servers[2].state().read().values, Vec::<u64>::new());
}

#[test]
fn a_leader_marks_nothing_where_two_are_not_a_majority_or_marks_are_off() {
    // The appends of a second write, after a first one committed.
    let second_appends = |servers: Vec<Replica<ListMachine>>| {
        let (mut servers, mut wire, committed) = one_write(servers);
        wire.clear();
        servers[0].propose(RequestId(2), b"2".to_vec()).unwrap();
        pass(&mut servers[0], &mut wire);
        assert!(wire.iter().any(|m| m.entries.len() == 1));
        (wire, committed)
    };
    let (five, _disks) = servers(5, ReplicaConfig::default());
    let (wire, _) = second_appends(five);
    assert_eq!(marks(&wire), vec![], "two of five are no majority");

    let off = ReplicaConfig {
        persisted_marks: false,
        ..Default::default()
    };
    let (wire, _) = second_appends(servers(3, off).0);
    assert_eq!(marks(&wire), vec![]);

    let (wire, committed) = second_appends(three_servers(true).0);
    assert_eq!(marks(&wire), vec![(2, committed), (3, committed)]);
}

#[test]
fn an_unreachable_follower_keeps_no_notice_due() {
    let (mut servers, _disks) = three_servers(true);
    let mut wire = Vec::new();
    // Server 3 stops answering; the leader probes it from now on.
    servers[0].report_unreachable(3);
    for id in 1..=2u128 {
        assert_eq!(
            write_on_leader(&mut servers, &mut wire, id, &[3]),
            vec![RequestId(id)]
        );
    }
    // Write 2's append told server 2 that write 1 is committed; write 2 itself
    // waits for the next append or the notice.
    assert!(servers[0].commit_notice_pending());
    servers[0].send_commit_notice();
    round(&mut servers, &mut wire, &[3]);
    assert_eq!(servers[1].state().read().values, vec![1, 2]);
    // Server 2 knows every commit: nothing is due, though server 3 knows none.
    assert!(!servers[0].commit_notice_pending());
    // The next write's append tells server 2, and then nothing is due again.
    assert_eq!(
        write_on_leader(&mut servers, &mut wire, 3, &[3]),
        vec![RequestId(3)]
    );
    assert!(
        servers[0].commit_notice_pending(),
        "write 3's commit is held"
    );
    servers[0].propose(RequestId(4), b"4".to_vec()).unwrap();
    pass(&mut servers[0], &mut wire);
    assert!(
        !servers[0].commit_notice_pending(),
        "write 4's append told it"
    );
}

#[test]
fn without_the_hold_a_commit_is_told_at_once() {
    let (servers, wire, committed) = after_one_write(false);
    assert_eq!(commit_notices(&wire), vec![(2, committed), (3, committed)]);
    assert!(!servers[0].commit_notice_pending());
}

#[test]
fn a_leader_answers_what_is_committed_before_it_writes_what_came_since() {
    let (mut servers, disks) = three_servers(true);
    let mut wire: Vec<Message> = Vec::new();

    // The first write reaches the followers, and their acknowledgements are on the
    // wire when a second write arrives.
    servers[0].propose(RequestId(1), b"1".to_vec()).unwrap();
    servers[0].handle_ready(&mut |m| wire.push(m)).unwrap();
    deliver(&mut servers, &mut wire);
    /// Records, in order, what a replica handed out and how many writes its disk
    /// had seen at that moment.
    struct Record<'a> {
        disk: &'a SimDisk,
        wire: &'a mut Vec<Message>,
        events: Vec<(&'static str, Vec<RequestId>, u64)>,
        unsent: bool,
    }
    impl ReadySink<usize> for Record<'_> {
        fn send(&mut self, msg: Message) {
            self.wire.push(msg);
            self.unsent = true;
        }
        fn flush(&mut self) {
            if std::mem::take(&mut self.unsent) {
                let writes = self.disk.writes();
                self.events.push(("flush", Vec::new(), writes));
            }
        }
        fn answer(&mut self, out: ReadyOutput<usize>) {
            let ids = out.applied.iter().map(|(id, _)| *id).collect();
            let writes = self.disk.writes();
            self.events.push(("answer", ids, writes));
        }
    }
    let follower_before = disks[1].writes();
    let mut follower = Record {
        disk: &disks[1],
        wire: &mut wire,
        events: Vec::new(),
        unsent: false,
    };
    servers[1].handle_ready_answering(&mut follower).unwrap();
    assert_eq!(
        follower.events,
        vec![("flush", vec![], follower_before + 1)],
        "a follower's acknowledgement leaves once it is written"
    );
    servers[2].handle_ready(&mut |m| wire.push(m)).unwrap();
    servers[0].propose(RequestId(2), b"2".to_vec()).unwrap();
    deliver(&mut servers, &mut wire);

    let leader_disk = &disks[0];
    let before = leader_disk.writes();
    let mut record = Record {
        disk: leader_disk,
        wire: &mut wire,
        events: Vec::new(),
        unsent: false,
    };
    servers[0].handle_ready_answering(&mut record).unwrap();
    assert_eq!(
        record.events,
        vec![
            ("flush", vec![], before),
            ("answer", vec![RequestId(1)], before),
        ],
        "the second write's appends leave and the first write is answered, both before \
         the second is written"
    );
    assert!(
        record
            .wire
            .iter()
            .any(|m| m.entries.len() == 1 && m.entries[0].data == b"2"[..]),
        "the appends carry the second write"
    );
    assert_eq!(
        leader_disk.writes(),
        before + 1,
        "then the second is written"
    );
}
