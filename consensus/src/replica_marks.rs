//! A leader's persisted marks: how far the leader's own log is on its disk,
//! carried in every append it sends a follower (in the message's context, which
//! raft leaves unused on appends).
//!
//! With a majority of two, a follower that has written an entry of its leader's
//! term that the leader's mark covers knows the two of them hold it: the entry is
//! committed, so the follower applies it and answers the writes it forwarded at
//! once, instead of acknowledging it and waiting for the leader to hear that and
//! tell it the commit, two hops later. Right after its own write the leader sends
//! its mark at once to a follower waiting on a write it forwarded; that append
//! takes the place of the commit notice it would have sent once committed.
//!
//! It is the leader's own commit rule, learnt where the write waits:
//! - the entry is of the leader's current term, so raft's rule against counting
//!   replicas of an older term's entry holds;
//! - the follower's log matches the leader's up to it: it holds the leader's entry
//!   at that index, and only one leader makes entries in a term;
//! - the two are a majority of the configuration every entry up to it commits
//!   under: the leader marks only while its configuration is simple (not joint),
//!   has at most three voters and counts both, and no change of it sits in its log
//!   unapplied (raft's `pending_conf_index`), so none can take effect below the
//!   mark;
//! - the follower counts a mark only from its leader of the term it is in.

use raft::prelude::{Message, MessageType};
use raft::StateRole;

use super::Replica;
use crate::state_machine::StateMachine;

/// The highest persisted mark a follower has from its leader in this term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LeaderMark {
    term: u64,
    leader: u64,
    /// How far the leader's log is durable.
    pub(super) index: u64,
}

impl LeaderMark {
    /// The mark an append carries, if it carries one.
    pub(super) fn of(msg: &Message) -> Option<LeaderMark> {
        if msg.get_msg_type() != MessageType::MsgAppend {
            return None;
        }
        let bytes: [u8; 8] = msg.context.as_ref().try_into().ok()?;
        Some(LeaderMark {
            term: msg.term,
            leader: msg.from,
            index: u64::from_be_bytes(bytes),
        })
    }
}

impl<S: StateMachine> Replica<S> {
    /// Whether this leader's persisted entries and `peer`'s are a majority of every
    /// configuration they commit under.
    pub(super) fn marks_count_for(&self, peer: u64) -> bool {
        let raft = &self.raw.raft;
        let voters = &self.conf_state.voters;
        self.config.persisted_marks
            && raft.state == StateRole::Leader
            && raft.pending_conf_index <= self.applied
            && self.conf_state.voters_outgoing.is_empty()
            && voters.len() <= 3
            && voters.contains(&self.config.id)
            && voters.contains(&peer)
    }

    /// Puts this leader's persisted index into an append for a follower it counts
    /// with.
    pub(super) fn stamp_mark(&self, msg: &mut Message) {
        if msg.get_msg_type() == MessageType::MsgAppend && self.marks_count_for(msg.to) {
            let persisted = self.raw.raft.raft_log.persisted;
            msg.context = persisted.to_be_bytes().to_vec().into();
        }
    }

    /// After stepping an append that carried `mark`: keeps it when it came from this
    /// follower's leader in its current term, and commits what it covers.
    pub(super) fn note_mark(&mut self, mark: LeaderMark) {
        if !self.follows(&mark) {
            return;
        }
        let index = match self.mark {
            Some(kept) if kept.term == mark.term && kept.leader == mark.leader => {
                kept.index.max(mark.index)
            }
            _ => mark.index,
        };
        self.mark = Some(LeaderMark { index, ..mark });
        let persisted = self.raw.raft.raft_log.persisted;
        self.commit_from_mark(persisted);
    }

    fn follows(&self, mark: &LeaderMark) -> bool {
        let raft = &self.raw.raft;
        raft.state == StateRole::Follower && raft.term == mark.term && raft.leader_id == mark.leader
    }

    /// Commits the entries this follower has on its disk up to `persisted` that its
    /// leader's mark covers, up to the last of them that is of the leader's term.
    pub(super) fn commit_from_mark(&mut self, persisted: u64) {
        let Some(mark) = self.mark.filter(|mark| self.follows(mark)) else {
            return;
        };
        let log = &mut self.raw.raft.raft_log;
        let index = mark.index.min(persisted).min(log.last_index());
        if index <= log.committed || log.term(index).ok() != Some(mark.term) {
            return;
        }
        let before = log.committed;
        log.commit_to(index);
        if let Some(m) = &self.metrics {
            m.mark_commits.inc_by(index - before);
        }
    }
}
