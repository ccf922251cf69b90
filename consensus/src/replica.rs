//! One Raft replica without sockets: raft-rs's `RawNode`, the log store and the state
//! machine, driven through the `Ready` cycle in the order raft-rs documents. Its one
//! thread of its own serialises a snapshot (unless `snapshot_in_background` is off,
//! as the simulation has it).
//!
//! The runtime (`runtime`) and the simulation (`testkit`) both drive this same type;
//! messages leave through a callback and applied results come back as values, so no
//! I/O decision lives here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};

use crate::log_store::{bootstrap_snapshot, LogStore, LogStoreError, SnapshotWrite, WriteBatch};
use crate::metrics::RaftMetrics;
use crate::state_machine::{SnapshotError, StateMachine};

/// Identifies one client request across retries: the proposing replica keeps a waiter
/// under this id and answers it when an entry carrying the id is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u128);

impl RequestId {
    fn to_bytes(self) -> Vec<u8> {
        self.0.to_be_bytes().to_vec()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 16] = bytes.try_into().ok()?;
        Some(RequestId(u128::from_be_bytes(arr)))
    }
}

/// Tunables of one replica; validated once at start.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This server's Raft id (non-zero).
    pub id: u64,
    /// Ticks without a leader before an election.
    pub election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// Take a snapshot after this many applied entries since the last one.
    pub snapshot_entries: u64,
    /// ... or after this many applied bytes since the last one.
    pub snapshot_bytes: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers catch
    /// up from the log instead of a full snapshot.
    pub compact_keep: u64,
    /// Largest append message in bytes.
    pub max_size_per_msg: u64,
    /// Most append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Serialise snapshots on a thread of their own (the replica keeps applying,
    /// voting and sending heartbeats meanwhile) rather than on the replica's.
    pub snapshot_in_background: bool,
    /// A leader holds back commit notices (the empty appends that only tell the
    /// followers a new commit index) until its driver asks for them
    /// ([`Replica::send_commit_notice`]), so that the next append, which carries
    /// the commit index too, usually tells them instead. Not held while a follower
    /// waits on a proposal it forwarded, nor for a membership change.
    pub hold_commit_notices: bool,
    /// A leader puts how far its own log is durable into every append to a
    /// follower, so that with a majority of two the follower commits what both have
    /// written without waiting for the leader to tell it (see `replica_marks.rs`).
    pub persisted_marks: bool,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_entries: 100_000,
            snapshot_bytes: 64 << 20,
            compact_keep: 5_000,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            snapshot_in_background: true,
            hold_commit_notices: true,
            persisted_marks: true,
        }
    }
}

impl ReplicaConfig {
    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            max_uncommitted_size: 256 << 20,
            skip_bcast_commit: self.hold_commit_notices,
            ..Default::default()
        }
    }
}

/// Why a replica stopped working. Each is fatal for the replica: the process must not
/// go on voting or acknowledging after its log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The log could not be written or read.
    #[error(transparent)]
    Log(#[from] LogStoreError),
    /// raft-rs refused an operation that must succeed.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The configuration is invalid.
    #[error("invalid raft configuration: {0}")]
    Config(String),
}

/// Why a proposal or read was not accepted right now. These are normal outcomes: the
/// caller retries or answers 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (an election is running or there is no quorum).
    #[error("no leader: an election is in progress or a quorum is unreachable")]
    NoLeader,
    /// This replica was removed from the cluster.
    #[error("this server was removed from the cluster")]
    Removed,
}

/// A change to the set of voters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Adds a voter reachable at `addr`.
    Add {
        /// The new server's id.
        id: u64,
        /// Its `host:port`.
        addr: String,
    },
    /// Removes a voter.
    Remove {
        /// The server to remove.
        id: u64,
    },
}

/// What an applied entry answers to the request that proposed it.
#[derive(Debug)]
pub enum Applied<O> {
    /// The state machine's output for a command.
    Command(O),
    /// A membership change took effect (or was refused by raft).
    Membership(Result<(), String>),
    /// The entry could not be decoded; it changed nothing.
    Undecodable(String),
}

/// What one pass through `Ready` produced, besides the messages already handed out.
#[derive(Debug)]
pub struct ReadyOutput<O> {
    /// Entries applied, with the request id they carried.
    pub applied: Vec<(RequestId, Applied<O>)>,
    /// Linearizable reads that may now be served from local state.
    pub reads: Vec<RequestId>,
}

impl<O> Default for ReadyOutput<O> {
    fn default() -> Self {
        ReadyOutput {
            applied: Vec::new(),
            reads: Vec::new(),
        }
    }
}

/// Where one pass of the `Ready` cycle hands what leaves the replica.
pub trait ReadySink<O> {
    /// A message for a peer.
    fn send(&mut self, msg: Message);
    /// The messages given to [`ReadySink::send`] so far must leave now: the replica
    /// is about to block on its log write, or to apply entries.
    fn flush(&mut self) {}
    /// Entries applied and reads made ready, as soon as they are.
    fn answer(&mut self, out: ReadyOutput<O>);
    /// Runs `write`, the log write of a batch of `entries` new entries, and returns
    /// what it returned. A sink may run it on another thread and serve the
    /// replica's peers and clients while it waits: nothing it runs meanwhile may
    /// touch the replica, whose next step waits for the write.
    fn persist(
        &mut self,
        entries: usize,
        write: &mut (dyn FnMut() -> Result<(), LogStoreError> + Send),
    ) -> Result<(), LogStoreError> {
        let _ = entries;
        write()
    }
}

/// A point-in-time view of a replica, for status pages and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// This replica's id.
    pub id: u64,
    /// The leader it knows of, if any.
    pub leader: Option<u64>,
    /// Its current term.
    pub term: u64,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the state machine.
    pub applied_index: u64,
    /// Last index in its log.
    pub last_index: u64,
    /// Index of the latest snapshot.
    pub snapshot_index: u64,
    /// `leader`, `follower`, `candidate` or `pre_candidate`.
    pub role: &'static str,
    /// Members (voters and learners) and their addresses.
    pub members: BTreeMap<u64, String>,
    /// Members still catching up, not yet voting.
    pub learners: Vec<u64>,
    /// True once this replica applied its own removal.
    pub removed: bool,
}

/// A Raft replica: raft-rs node, durable log and state machine.
pub struct Replica<S: StateMachine> {
    raw: RawNode<LogStore>,
    state: Arc<RwLock<S>>,
    config: ReplicaConfig,
    conf_state: ConfState,
    members: BTreeMap<u64, String>,
    applied: u64,
    snapshot_index: u64,
    bytes_since_snapshot: u64,
    /// Size of the last snapshot taken here.
    last_snapshot_len: u64,
    /// The snapshot being serialised, if one is.
    snapshotting: Option<PendingSnapshot>,
    pending_reads: VecDeque<(RequestId, u64)>,
    leader: Option<u64>,
    removed: bool,
    metrics: Option<Arc<RaftMetrics>>,
    notices: CommitNotices,
    /// The persisted mark of this follower's leader.
    mark: Option<LeaderMark>,
}

fn raft_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl<S: StateMachine> Replica<S> {
    /// Opens a replica on `store`. A blank store is initialised with `initial_members`
    /// (a new cluster) or left uninitialised when that map is empty (a server that
    /// joins an existing cluster and waits for the leader's snapshot).
    pub fn open(
        config: ReplicaConfig,
        mut store: LogStore,
        mut state: S,
        initial_members: &BTreeMap<u64, String>,
        metrics: Option<Arc<RaftMetrics>>,
    ) -> Result<Self, ReplicaError> {
        if config.id == 0 {
            return Err(ReplicaError::Config("id must be non-zero".into()));
        }
        if config.snapshot_entries == 0 {
            return Err(ReplicaError::Config(
                "snapshot entry threshold must be at least 1".into(),
            ));
        }
        if store.image().is_blank() && !initial_members.is_empty() {
            let data = encode_state(state.capture(), initial_members)?;
            let snap = bootstrap_snapshot(initial_members.keys().copied().collect(), data);
            store.write(&WriteBatch {
                snapshot: Some(SnapshotWrite::Install(snap)),
                ..Default::default()
            })?;
        }
        let snap = store.image().snapshot().clone();
        let snapshot_index = snap.get_metadata().index;
        let members = if snapshot_index > 0 {
            restore_snapshot(&mut state, &snap)?
        } else {
            BTreeMap::new()
        };
        let conf_state = snap.get_metadata().get_conf_state().clone();
        let raft_config = config.raft_config(snapshot_index);
        raft_config
            .validate()
            .map_err(|e| ReplicaError::Config(e.to_string()))?;
        let raw = RawNode::new(&raft_config, store, &raft_logger())?;
        Ok(Replica {
            raw,
            state: Arc::new(RwLock::new(state)),
            config,
            conf_state,
            members,
            applied: snapshot_index,
            snapshot_index,
            bytes_since_snapshot: 0,
            last_snapshot_len: 0,
            snapshotting: None,
            pending_reads: VecDeque::new(),
            leader: None,
            removed: false,
            metrics,
            notices: CommitNotices::default(),
            mark: None,
        })
    }

    /// The replicated state, shared with readers.
    pub fn state(&self) -> Arc<RwLock<S>> {
        self.state.clone()
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// Members (voters and learners) and their addresses as of the applied index.
    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            raft::INVALID_ID => None,
            id => Some(id),
        }
    }

    /// True when this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The highest applied index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// A snapshot of this replica's view.
    pub fn status(&self) -> ReplicaStatus {
        let role = match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre_candidate",
        };
        ReplicaStatus {
            id: self.config.id,
            leader: self.leader(),
            term: self.term(),
            commit_index: self.raw.raft.raft_log.committed,
            applied_index: self.applied,
            last_index: self.raw.raft.raft_log.last_index(),
            snapshot_index: self.snapshot_index,
            role,
            members: self.members.clone(),
            learners: self.conf_state.learners.clone(),
            removed: self.removed,
        }
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        if !self.removed {
            self.raw.tick();
        }
    }

    /// Starts an election now (a single-server cluster need not wait a timeout).
    pub fn campaign(&mut self) -> Result<(), ReplicaError> {
        Ok(self.raw.campaign()?)
    }

    /// Feeds a message from a peer. Messages for other terms or from strangers are
    /// dropped by raft itself; an error here is never fatal.
    pub fn step(&mut self, msg: Message) {
        if self.removed {
            return;
        }
        let forwarded = self.is_forwarded_proposal(&msg).then_some(msg.from);
        let mark = LeaderMark::of(&msg);
        let _ = self.raw.step(msg);
        if let Some(mark) = mark {
            self.note_mark(mark);
        }
        if let Some(from) = forwarded {
            self.notice_when_committed(from);
        }
        self.tell_forwarders();
    }

    /// Proposes an encoded command. On a follower raft forwards it to the leader.
    pub fn propose(&mut self, id: RequestId, data: Vec<u8>) -> Result<(), ProposeError> {
        self.check_can_propose()?;
        self.raw
            .propose(id.to_bytes(), data)
            .map_err(|_| ProposeError::NoLeader)
    }

    /// Proposes a membership change.
    pub fn propose_membership(
        &mut self,
        id: RequestId,
        change: &MembershipChange,
    ) -> Result<(), ProposeError> {
        self.check_can_propose()?;
        let mut cc = ConfChange::default();
        match change {
            MembershipChange::Add { id, addr } => {
                // A new server joins as a learner; the leader promotes it to voter once
                // it has caught up, so it never counts toward quorum while it lags.
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = *id;
                cc.context = addr.as_bytes().to_vec().into();
            }
            MembershipChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = *id;
            }
        }
        self.raw
            .propose_conf_change(id.to_bytes(), cc)
            .map_err(|_| ProposeError::NoLeader)
    }

    /// Asks for a linearizable read; it shows up in [`ReadyOutput::reads`] once local
    /// state has caught up with the leader's commit index at the time of the request.
    pub fn read_index(&mut self, id: RequestId) -> Result<(), ProposeError> {
        self.check_can_propose()?;
        self.raw.read_index(id.to_bytes());
        Ok(())
    }

    /// Hands leadership to `to` (used before removing the current leader).
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// Tells raft a peer could not be reached.
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Tells raft how sending a snapshot to `id` went.
    pub fn report_snapshot(&mut self, id: u64, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(id, status);
    }

    fn check_can_propose(&self) -> Result<(), ProposeError> {
        if self.removed {
            return Err(ProposeError::Removed);
        }
        if self.leader().is_none() {
            return Err(ProposeError::NoLeader);
        }
        Ok(())
    }

    /// True when raft has work for [`Replica::handle_ready`].
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
            || self.raw.store().snapshot_requested()
            || self
                .snapshotting
                .as_ref()
                .is_some_and(|pending| pending.work.is_done())
    }

    /// One pass of the `Ready` cycle: send the leader's messages, install a snapshot,
    /// apply committed entries (a leader now; a follower once it has answered),
    /// persist entries and hard state with one fsync, send the messages that required
    /// them, advance, and apply what became committed.
    ///
    /// An error is fatal: the replica must be dropped and reopened from its log.
    pub fn handle_ready(
        &mut self,
        send: &mut dyn FnMut(Message),
    ) -> Result<ReadyOutput<S::Output>, ReplicaError> {
        struct Collect<'a, O> {
            send: &'a mut dyn FnMut(Message),
            all: ReadyOutput<O>,
        }
        impl<O> ReadySink<O> for Collect<'_, O> {
            fn send(&mut self, msg: Message) {
                (self.send)(msg)
            }
            fn answer(&mut self, out: ReadyOutput<O>) {
                self.all.applied.extend(out.applied);
                self.all.reads.extend(out.reads);
            }
        }
        let mut sink = Collect {
            send,
            all: ReadyOutput::default(),
        };
        self.handle_ready_answering(&mut sink)?;
        Ok(sink.all)
    }

    /// [`Replica::handle_ready`], handing what was applied to the sink as soon as it
    /// is (a leader's answers leave before it waits on its own fsync of the entries
    /// that arrived since), and telling it when the messages it was given must leave.
    pub fn handle_ready_answering(
        &mut self,
        sink: &mut dyn ReadySink<S::Output>,
    ) -> Result<(), ReplicaError> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return self.maybe_snapshot();
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            let leader = (ss.leader_id != raft::INVALID_ID).then_some(ss.leader_id);
            if leader != self.leader && leader.is_some() {
                if let Some(m) = &self.metrics {
                    m.leader_changes.inc();
                }
            }
            self.leader = leader;
        }
        // A leader's messages leave at once: appends of new entries so that the
        // followers' writes overlap its apply and its own write, a commit index so
        // that a follower answers the writes it forwarded as soon as it can.
        self.send(sink, ready.take_messages());
        sink.flush();

        let mut batch = WriteBatch::default();
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap)?;
            batch.snapshot = Some(SnapshotWrite::Install(snap));
        }
        // A leader answers what is committed before it waits on its own fsync; a
        // follower acknowledges the new entries first (the leader's commit waits on
        // that answer), then applies.
        let mut committed = ready.take_committed_entries();
        if self.is_leader() {
            self.apply_entries(std::mem::take(&mut committed), &mut out)?;
            if !out.applied.is_empty() {
                sink.answer(std::mem::take(&mut out));
            }
        }
        batch.entries = ready.take_entries();
        batch.hard_state = ready.hs().cloned();
        if let Some(hs) = &batch.hard_state {
            // Term and vote must be durable before any message depends on them; a
            // commit index alone need not be (raft learns it again after a crash), so
            // it waits for the next batch instead of costing an fsync of its own.
            let stored = self.raw.store().image().hard_state();
            if batch.entries.is_empty()
                && batch.snapshot.is_none()
                && hs.term == stored.term
                && hs.vote == stored.vote
            {
                self.raw.mut_store().set_commit(hs.commit);
                batch.hard_state = None;
            }
        }
        let wrote = !batch.is_empty();
        let written = batch.entries.last().map(|e| e.index);
        if wrote {
            sink.flush();
            let started = Instant::now();
            let entries = batch.entries.len();
            let store = self.raw.mut_store();
            sink.persist(entries, &mut || store.write(&batch))?;
            if let Some(m) = &self.metrics {
                m.log_write_seconds.observe(started.elapsed().as_secs_f64());
            }
        }
        // A follower's acknowledgements of what it wrote leave before it applies:
        // the leader's commit waits on them. Answers to a commit index alone (or a
        // heartbeat) wait until what became committed is applied and answered.
        self.send(sink, ready.take_persisted_messages());
        if wrote {
            sink.flush();
        }
        self.apply_entries(committed, &mut out)?;
        for rs in ready.take_read_states() {
            if let Some(id) = RequestId::from_bytes(&rs.request_ctx) {
                self.pending_reads.push_back((id, rs.index));
            }
        }

        // Written entries its leader's mark covers are committed: applied in this
        // pass, with what the leader's commit index says.
        if let Some(index) = written.filter(|_| batch.snapshot.is_none()) {
            self.commit_from_mark(index);
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.send(sink, light.take_messages());
        // The leader's own write can be what commits a forwarded write.
        self.tell_forwarders();
        let notices = std::mem::take(&mut self.raw.raft.msgs);
        self.send(sink, notices);
        self.apply_entries(light.take_committed_entries(), &mut out)?;
        self.raw.advance_apply();

        while let Some(&(id, index)) = self.pending_reads.front() {
            if index > self.applied {
                break;
            }
            self.pending_reads.pop_front();
            out.reads.push(id);
        }
        if !out.applied.is_empty() || !out.reads.is_empty() {
            sink.answer(out);
        }
        self.settle_notices();
        self.maybe_snapshot()?;
        self.maybe_promote_learner();
        Ok(())
    }

    /// Hands `messages` to the sink, noting the commit index each tells its peer.
    fn send(&mut self, sink: &mut dyn ReadySink<S::Output>, messages: Vec<Message>) {
        for mut msg in messages {
            self.stamp_mark(&mut msg);
            self.note_sent(&msg);
            sink.send(msg);
        }
    }

    /// On the leader, proposes making a caught-up learner a voter: one configuration
    /// change at a time, and only once its log is within `PROMOTE_LAG` of the commit.
    fn maybe_promote_learner(&mut self) {
        const PROMOTE_LAG: u64 = 64;
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || raft.pending_conf_index > self.applied {
            return;
        }
        let committed = raft.raft_log.committed;
        let caught_up = self.conf_state.learners.iter().copied().find(|id| {
            raft.prs().get(*id).is_some_and(|pr| {
                pr.state == raft::ProgressState::Replicate
                    && pr.matched > 0
                    && pr.matched + PROMOTE_LAG >= committed
            })
        });
        if let Some(id) = caught_up {
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::AddNode);
            cc.node_id = id;
            if let Some(addr) = self.members.get(&id) {
                cc.context = addr.as_bytes().to_vec().into();
            }
            let _ = self.raw.propose_conf_change(Vec::new(), cc);
        }
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), ReplicaError> {
        let mut state = self.state.write();
        self.members = restore_snapshot(&mut *state, snap)?;
        let meta = snap.get_metadata();
        self.conf_state = meta.get_conf_state().clone();
        self.applied = meta.index;
        self.snapshot_index = meta.index;
        self.bytes_since_snapshot = 0;
        self.last_snapshot_len = snap.data.len() as u64;
        if let Some(m) = &self.metrics {
            m.snapshots_installed.inc();
        }
        Ok(())
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        out: &mut ReadyOutput<S::Output>,
    ) -> Result<(), ReplicaError> {
        if entries.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            self.applied = entry.index;
            self.bytes_since_snapshot += entry.data.len() as u64;
            let id = RequestId::from_bytes(&entry.context);
            let applied = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => continue,
                EntryType::EntryNormal => match S::decode(&entry.data) {
                    Ok(cmd) => Applied::Command(self.state.write().apply(entry.index, cmd)),
                    Err(e) => Applied::Undecodable(e),
                },
                EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&entry.data) {
                    Ok(cc) => Applied::Membership(self.apply_conf_change(cc)?),
                    Err(e) => Applied::Undecodable(e.to_string()),
                },
                EntryType::EntryConfChangeV2 => match ConfChangeV2::parse_from_bytes(&entry.data) {
                    Ok(cc) => Applied::Membership(
                        self.raw
                            .apply_conf_change(&cc)
                            .map(|cs| self.conf_state = cs)
                            .map_err(|e| e.to_string()),
                    ),
                    Err(e) => Applied::Undecodable(e.to_string()),
                },
            };
            if let Some(id) = id {
                out.applied.push((id, applied));
            }
        }
        if let Some(m) = &self.metrics {
            m.apply_seconds.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, cc: ConfChange) -> Result<Result<(), String>, ReplicaError> {
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                self.conf_state = cs;
                match cc.get_change_type() {
                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                        let addr = String::from_utf8_lossy(&cc.context).into_owned();
                        self.members.insert(cc.node_id, addr);
                    }
                    ConfChangeType::RemoveNode => {
                        self.members.remove(&cc.node_id);
                        if cc.node_id == self.config.id {
                            self.removed = true;
                        }
                    }
                }
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e.to_string())),
        }
    }
}

#[path = "replica_notices.rs"]
mod notices;
use notices::CommitNotices;

#[path = "replica_marks.rs"]
mod marks;
use marks::LeaderMark;

#[path = "replica_snapshots.rs"]
mod snapshots;
use snapshots::{encode_state, restore_snapshot, PendingSnapshot};

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
