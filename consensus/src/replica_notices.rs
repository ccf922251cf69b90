//! A leader's commit notices: the empty appends that only tell followers a new
//! commit index, held back (`ReplicaConfig::hold_commit_notices`) for the next
//! append to carry the index instead, and sent at once to a follower that waits
//! on a write it forwarded (to that follower alone: the others' applies would
//! only compete for the CPU its answer needs), or, where the follower counts this
//! leader's persisted mark, as soon as this leader has written that write.

use std::collections::BTreeMap;

use raft::prelude::{Message, MessageType};

use super::Replica;
use crate::state_machine::StateMachine;

/// What a leader has told its peers of its commit index, when it holds commit
/// notices back.
#[derive(Debug, Default)]
pub(super) struct CommitNotices {
    /// The term `told` is of: a new leadership starts it afresh.
    term: u64,
    /// The highest commit index each peer was sent (in an append or a heartbeat).
    told: BTreeMap<u64, u64>,
    /// Every peer was told commits up to here, or a notice of it went out.
    noticed: u64,
    /// Followers waiting on proposals they forwarded, each with the last index
    /// its proposals reached: the commit of that index is sent to it at once.
    forwarded: BTreeMap<u64, u64>,
}

impl CommitNotices {
    /// Forgets what peers were told in an earlier term.
    fn start_term(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.told.clear();
        }
    }
}

impl<S: StateMachine> Replica<S> {
    /// A write a follower forwarded: once it is committed, the follower answers
    /// as soon as it hears so, so that notice must not wait.
    pub(super) fn is_forwarded_proposal(&self, msg: &Message) -> bool {
        self.config.hold_commit_notices
            && self.is_leader()
            && msg.get_msg_type() == MessageType::MsgPropose
    }

    /// After stepping a write forwarded by `from`: its commit (the write is now
    /// the last entry) is sent to `from` as soon as it happens.
    pub(super) fn notice_when_committed(&mut self, from: u64) {
        let last = self.raw.raft.raft_log.last_index();
        self.notices.forwarded.insert(from, last);
    }

    /// Sends the commit index at once to every follower whose forwarded writes
    /// are all committed now (the next `Ready` carries the messages); the other
    /// peers' notices stay held.
    pub(super) fn tell_forwarders(&mut self) {
        if self.notices.forwarded.is_empty() {
            return;
        }
        if !self.is_leader() {
            self.notices.forwarded.clear();
            return;
        }
        let log = &self.raw.raft.raft_log;
        let (committed, persisted) = (log.committed, log.persisted);
        // Once this leader has written the follower's last write, its persisted
        // mark lets the follower commit it as soon as it has written it too.
        let due: Vec<u64> = self
            .notices
            .forwarded
            .iter()
            .filter(|(peer, index)| {
                **index <= committed || (**index <= persisted && self.marks_count_for(**peer))
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            self.notices.forwarded.remove(&peer);
            self.raw.raft.send_append(peer);
        }
    }

    /// True when this leader committed entries that some peer has not been told of
    /// and whose notice it holds back: its driver sends it with
    /// [`Replica::send_commit_notice`] once it has waited long enough for an
    /// append to carry it instead.
    pub fn commit_notice_pending(&self) -> bool {
        self.config.hold_commit_notices
            && self.is_leader()
            && self.raw.raft.raft_log.committed > self.notices.noticed
    }

    /// When a notice is held ([`Replica::commit_notice_pending`]), tells every
    /// peer this leader's commit index now (the next `Ready` carries the messages).
    pub fn send_commit_notice(&mut self) {
        if self.commit_notice_pending() {
            self.raw.raft.bcast_append();
            self.notices.noticed = self.raw.raft.raft_log.committed;
        }
    }

    /// Notes the commit index a message tells its peer.
    pub(super) fn note_sent(&mut self, msg: &Message) {
        if matches!(
            msg.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat
        ) {
            self.notices.start_term(self.raw.raft.term);
            let told = self.notices.told.entry(msg.to).or_default();
            *told = (*told).max(msg.commit);
        }
    }

    /// After a pass: how far every peer was told.
    pub(super) fn settle_notices(&mut self) {
        if !self.config.hold_commit_notices || !self.is_leader() {
            return;
        }
        self.notices.start_term(self.raw.raft.term);
        let committed = self.raw.raft.raft_log.committed;
        let (me, notices) = (self.config.id, &mut self.notices);
        // With no peer to tell, everything committed counts as told.
        let least = self
            .raw
            .raft
            .prs()
            .iter()
            // A peer being probed or sent a snapshot gets no notice (raft pauses
            // it); counting it would keep a notice due after every commit.
            .filter(|(id, pr)| **id != me && pr.state == raft::ProgressState::Replicate)
            .map(|(id, _)| notices.told.get(id).copied().unwrap_or(0))
            .min()
            .unwrap_or(committed);
        notices.noticed = notices.noticed.max(least);
    }
}
