//! A seeded, single-threaded simulation of a cluster of [`Replica`]s over an in-memory
//! network that drops, delays, reorders and partitions messages, with crashes that lose
//! whatever had not reached the (simulated) disk.
//!
//! The same `Replica` code that the servers run is driven here; only the disk
//! ([`SimDisk`]) and the network are simulated. [`Simulation::run`] checks the safety
//! properties a client relies on and reports the seed with any failure.

use std::collections::{BTreeMap, HashMap};

use raft::prelude::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::sync::Arc;

use parking_lot::Mutex;

use crate::log_store::{Durable, LogImage, LogStore, LogStoreError, WriteBatch};
use crate::replica::{Applied, Replica, ReplicaConfig, RequestId};
use crate::state_machine::StateMachine;

/// Knobs of one simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of servers.
    pub servers: u64,
    /// Ticks with faults.
    pub fault_ticks: u64,
    /// Ticks allowed to converge after every fault healed.
    pub heal_ticks: u64,
    /// Probability a message is dropped.
    pub drop_rate: f64,
    /// Messages are delayed by 0..=max_delay steps (so they reorder).
    pub max_delay: u64,
    /// Probability per tick that a partition starts (or heals).
    pub partition_rate: f64,
    /// Probability per tick that a server crashes.
    pub crash_rate: f64,
    /// Client proposals per tick (on average).
    pub proposals_per_tick: f64,
    /// Snapshot threshold, low so snapshots and installs happen.
    pub snapshot_entries: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            servers: 3,
            fault_ticks: 400,
            heal_ticks: 400,
            drop_rate: 0.05,
            max_delay: 3,
            partition_rate: 0.01,
            crash_rate: 0.004,
            proposals_per_tick: 0.7,
            snapshot_entries: 40,
        }
    }
}

/// What a successful run observed, for assertions on coverage.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    /// Commands acknowledged to clients.
    pub acknowledged: usize,
    /// Crashes, of which some lost an unsynced write.
    pub crashes: usize,
    /// Crashes that hit a write before it reached the disk.
    pub lost_writes: usize,
    /// Distinct terms that had a leader.
    pub terms_with_leader: usize,
    /// Final applied index.
    pub applied_index: u64,
}

struct InFlight {
    deliver_at: u64,
    msg: Message,
}

/// A simulated cluster for one seed.
pub struct Simulation<S: StateMachine> {
    seed: u64,
    config: SimConfig,
    rng: StdRng,
    make_state: Box<dyn Fn() -> S>,
    replicas: BTreeMap<u64, Option<Replica<S>>>,
    disks: BTreeMap<u64, SimDisk>,
    network: Vec<InFlight>,
    /// Group of each server; messages cross groups only when not partitioned.
    groups: HashMap<u64, u8>,
    step: u64,
    pending: HashMap<RequestId, (u64, S::Command)>,
    acked: Vec<S::Command>,
    leaders: BTreeMap<u64, u64>,
    next_request: u128,
    report: SimReport,
}

impl<S: StateMachine> Simulation<S>
where
    S::Command: Clone,
{
    /// A cluster of `config.servers` servers whose state machines start from `make_state`.
    pub fn new(seed: u64, config: SimConfig, make_state: impl Fn() -> S + 'static) -> Self {
        let members: BTreeMap<u64, String> = (1..=config.servers)
            .map(|id| (id, format!("sim-{id}")))
            .collect();
        let mut sim = Simulation {
            seed,
            rng: StdRng::seed_from_u64(seed),
            config,
            make_state: Box::new(make_state),
            replicas: BTreeMap::new(),
            disks: BTreeMap::new(),
            network: Vec::new(),
            groups: HashMap::new(),
            step: 0,
            pending: HashMap::new(),
            acked: Vec::new(),
            leaders: BTreeMap::new(),
            next_request: 1,
            report: SimReport::default(),
        };
        for &id in members.keys() {
            sim.disks.insert(id, SimDisk::default());
            let replica = sim.open(id, &members);
            sim.replicas.insert(id, Some(replica));
        }
        sim
    }

    fn replica_config(&self, id: u64) -> ReplicaConfig {
        ReplicaConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_entries: self.config.snapshot_entries,
            compact_keep: 5,
            max_inflight_msgs: 16,
            // Serialised in step, so a seed replays the same run.
            snapshot_in_background: false,
            ..Default::default()
        }
    }

    fn open(&self, id: u64, members: &BTreeMap<u64, String>) -> Replica<S> {
        let store = LogStore::open(Box::new(self.disks[&id].clone()))
            .unwrap_or_else(|e| panic!("seed {}: reopen log of {id}: {e}", self.seed));
        Replica::open(
            self.replica_config(id),
            store,
            (self.make_state)(),
            members,
            None,
        )
        .unwrap_or_else(|e| panic!("seed {}: open replica {id}: {e}", self.seed))
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        format!(
            "simulation seed {} failed at step {}: {what}",
            self.seed, self.step
        )
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        self.groups.get(&a).copied().unwrap_or(0) == self.groups.get(&b).copied().unwrap_or(0)
    }

    fn faults(&mut self) {
        if self.rng.random_bool(self.config.partition_rate) {
            if self.groups.is_empty() {
                for id in 1..=self.config.servers {
                    let g = self.rng.random_range(0..2u8);
                    self.groups.insert(id, g);
                }
            } else {
                self.groups.clear();
            }
        }
        for id in 1..=self.config.servers {
            let alive = self.replicas[&id].is_some();
            if alive && self.rng.random_bool(self.config.crash_rate) {
                if self.rng.random_bool(0.5) {
                    // Crash at the next write: that write never reaches the disk.
                    self.disks[&id].fail_next_write();
                } else {
                    self.crash(id);
                }
            } else if !alive && self.rng.random_bool(0.05) {
                self.restart(id);
            }
        }
    }

    fn crash(&mut self, id: u64) {
        self.replicas.insert(id, None);
        self.disks[&id].clear_failure();
        self.pending.retain(|_, (node, _)| *node != id);
        self.report.crashes += 1;
    }

    fn restart(&mut self, id: u64) {
        let replica = self.open(id, &BTreeMap::new());
        self.replicas.insert(id, Some(replica));
    }

    fn propose(&mut self, make_command: &mut dyn FnMut(&mut StdRng, u64, &S) -> S::Command) {
        let alive: Vec<u64> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.is_some())
            .map(|(id, _)| *id)
            .collect();
        if alive.is_empty() {
            return;
        }
        let id = alive[self.rng.random_range(0..alive.len())];
        let state = self.replicas[&id].as_ref().expect("alive").state();
        let command = make_command(&mut self.rng, self.step, &state.read());
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let data = serde_json::to_vec(&command).expect("commands serialise");
        let replica = self
            .replicas
            .get_mut(&id)
            .and_then(Option::as_mut)
            .expect("alive");
        if replica.propose(request, data).is_ok() {
            self.pending.insert(request, (id, command));
        }
    }

    fn deliver(&mut self) {
        let now = self.step;
        let (due, later): (Vec<_>, Vec<_>) =
            self.network.drain(..).partition(|m| m.deliver_at <= now);
        self.network = later;
        for InFlight { msg, .. } in due {
            let (from, to) = (msg.from, msg.to);
            let is_snapshot = msg.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
            let reachable = self.connected(from, to);
            let delivered = match self.replicas.get_mut(&to) {
                Some(Some(replica)) if reachable => {
                    replica.step(msg);
                    true
                }
                _ => false,
            };
            if is_snapshot {
                // The transport reports snapshot outcomes back to the leader.
                self.report_snapshot(from, to, delivered);
            }
        }
    }

    fn report_snapshot(&mut self, from: u64, to: u64, delivered: bool) {
        if let Some(Some(sender)) = self.replicas.get_mut(&from) {
            sender.report_snapshot(to, delivered);
        }
    }

    fn process(&mut self, faults: bool) -> Result<(), String> {
        let ids: Vec<u64> = self.replicas.keys().copied().collect();
        for id in ids {
            let Some(replica) = self.replicas.get_mut(&id).and_then(Option::as_mut) else {
                continue;
            };
            // A commit notice held back in the last step is due now, as the
            // runtime sends one once its hold expires.
            replica.send_commit_notice();
            let mut outgoing = Vec::new();
            let result = replica.handle_ready(&mut |m| outgoing.push(m));
            for msg in outgoing {
                let dropped = faults && self.rng.random_bool(self.config.drop_rate);
                if dropped {
                    if msg.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                        let (from, to) = (msg.from, msg.to);
                        self.report_snapshot(from, to, false);
                    }
                    continue;
                }
                let delay = if faults {
                    self.rng.random_range(0..=self.config.max_delay)
                } else {
                    0
                };
                self.network.push(InFlight {
                    deliver_at: self.step + 1 + delay,
                    msg,
                });
            }
            match result {
                Ok(out) => {
                    for (request, applied) in out.applied {
                        if let Some((node, command)) = self.pending.remove(&request) {
                            if node == id && matches!(applied, Applied::Command(_)) {
                                self.acked.push(command);
                            }
                        }
                    }
                }
                Err(_) => {
                    // The write failed before its fsync: the server crashed mid-Ready.
                    self.report.lost_writes += 1;
                    self.crash(id);
                    continue;
                }
            }
            let replica = self.replicas[&id].as_ref().expect("alive");
            if replica.is_leader() {
                let term = replica.term();
                if let Some(other) = self.leaders.insert(term, id) {
                    if other != id {
                        return Err(
                            self.fail(format!("two leaders in term {term}: {other} and {id}"))
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn tick_all(&mut self) {
        for replica in self.replicas.values_mut().flatten() {
            replica.tick();
        }
    }

    /// Runs faults, then heals and checks: at most one leader per term, identical state
    /// on every server, and every acknowledged command present (`is_present`).
    pub fn run(
        self,
        mut make_command: impl FnMut(&mut StdRng, u64) -> S::Command,
        is_present: impl Fn(&S, &S::Command) -> bool,
    ) -> Result<SimReport, String> {
        self.run_seeing(move |rng, step, _| make_command(rng, step), is_present)
    }

    /// As [`Simulation::run`], with commands made seeing the applied state of the
    /// server they are proposed to (as a client that read it before writing would):
    /// for commands that must name what the state holds, such as a signed decision
    /// on a proposal's digest.
    pub fn run_seeing(
        mut self,
        mut make_command: impl FnMut(&mut StdRng, u64, &S) -> S::Command,
        is_present: impl Fn(&S, &S::Command) -> bool,
    ) -> Result<SimReport, String> {
        // Several steps per tick, so messages move faster than clocks.
        const STEPS_PER_TICK: u64 = 4;
        for _ in 0..self.config.fault_ticks {
            self.faults();
            for _ in 0..STEPS_PER_TICK {
                self.step += 1;
                if self
                    .rng
                    .random_bool(self.config.proposals_per_tick / STEPS_PER_TICK as f64)
                {
                    self.propose(&mut make_command);
                }
                self.deliver();
                self.process(true)?;
            }
            self.tick_all();
        }
        self.groups.clear();
        for id in 1..=self.config.servers {
            self.disks[&id].clear_failure();
            if self.replicas[&id].is_none() {
                self.restart(id);
            }
        }
        let mut converged = false;
        for tick in 0..self.config.heal_ticks {
            for _ in 0..STEPS_PER_TICK {
                self.step += 1;
                // Keep a little traffic so a new leader commits in its own term.
                if tick % 20 == 0 {
                    self.propose(&mut make_command);
                }
                self.deliver();
                self.process(false)?;
            }
            self.tick_all();
            if tick > 50 && self.network.is_empty() && self.all_equal() {
                converged = true;
                break;
            }
        }
        if !converged {
            let applied: Vec<(u64, u64)> = self
                .replicas
                .iter()
                .map(|(id, r)| (*id, r.as_ref().map_or(0, |r| r.applied())))
                .collect();
            return Err(self.fail(format!(
                "servers did not converge after healing; applied indices {applied:?}"
            )));
        }
        let first = self.replicas[&1].as_ref().expect("all restarted");
        let state = first.state();
        let state = state.read();
        for command in &self.acked {
            if !is_present(&state, command) {
                return Err(self.fail(format!(
                    "an acknowledged command is missing: {}",
                    serde_json::to_string(command).unwrap_or_default()
                )));
            }
        }
        self.report.acknowledged = self.acked.len();
        self.report.terms_with_leader = self.leaders.len();
        self.report.applied_index = first.applied();
        Ok(self.report.clone())
    }

    /// Runs `ticks` fault-free ticks, proposing a command every fifth tick.
    pub fn settle(
        &mut self,
        ticks: u64,
        make_command: &mut dyn FnMut(&mut StdRng, u64) -> S::Command,
    ) -> Result<(), String> {
        const STEPS_PER_TICK: u64 = 4;
        let mut make_command = |rng: &mut StdRng, step: u64, _: &S| make_command(rng, step);
        for _ in 0..ticks {
            for _ in 0..STEPS_PER_TICK {
                self.step += 1;
                if self.step.is_multiple_of(20) {
                    self.propose(&mut make_command);
                }
                self.deliver();
                self.process(false)?;
            }
            self.tick_all();
        }
        Ok(())
    }

    /// Starts server `id` with an empty log, asks the leader to add it, and runs
    /// fault-free until every server, itself included, sees it as a voter; answers the
    /// ticks that took, or an error after `limit` ticks.
    pub fn join_server(
        &mut self,
        id: u64,
        limit: u64,
        make_command: &mut dyn FnMut(&mut StdRng, u64) -> S::Command,
    ) -> Result<u64, String> {
        self.disks.insert(id, SimDisk::default());
        let replica = self.open(id, &BTreeMap::new());
        self.replicas.insert(id, Some(replica));
        let change = crate::replica::MembershipChange::Add {
            id,
            addr: format!("sim-{id}"),
        };
        let mut proposed = false;
        for tick in 0..limit {
            if !proposed {
                let request = RequestId(self.next_request);
                self.next_request += 1;
                if let Some(leader) = self.replicas.values_mut().flatten().find(|r| r.is_leader()) {
                    proposed = leader.propose_membership(request, &change).is_ok();
                }
            }
            self.settle(1, make_command)?;
            let everywhere = self.replicas.values().all(|r| {
                r.as_ref().is_some_and(|r| {
                    let status = r.status();
                    status.members.contains_key(&id) && !status.learners.contains(&id)
                })
            });
            if everywhere {
                return Ok(tick);
            }
        }
        let views: Vec<String> = self
            .replicas
            .iter()
            .map(|(rid, r)| match r {
                Some(r) => {
                    let s = r.status();
                    format!(
                        "{rid}: members {:?} learners {:?} applied {}",
                        s.members.keys().collect::<Vec<_>>(),
                        s.learners,
                        s.applied_index
                    )
                }
                None => format!("{rid}: down"),
            })
            .collect();
        Err(self.fail(format!(
            "server {id} did not become a voter within {limit} ticks: {}",
            views.join("; ")
        )))
    }

    fn all_equal(&self) -> bool {
        let mut snapshots = Vec::new();
        let mut applied = Vec::new();
        let mut commits = Vec::new();
        for replica in self.replicas.values() {
            let Some(r) = replica else { return false };
            let status = r.status();
            applied.push(status.applied_index);
            commits.push(status.commit_index);
            snapshots.push(r.state().read().snapshot().unwrap_or_default());
        }
        let has_leader = self.replicas.values().flatten().any(|r| r.is_leader());
        has_leader
            && applied.windows(2).all(|w| w[0] == w[1])
            && commits.iter().all(|c| *c == applied[0])
            && snapshots.windows(2).all(|w| w[0] == w[1])
    }
}

/// Runs one seed's simulation; a panic anywhere inside (raft-rs asserts included) is
/// reported with the seed and how to rerun just that seed.
pub fn with_seed<T>(seed: u64, run: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(value) => value,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("simulation seed {seed} panicked: {message} (rerun with AIGRID_SIM_SEED={seed})")
        }
    }
}

/// The seeds to run: `0..count`, or only `AIGRID_SIM_SEED` when it is set.
pub fn seeds(count: u64) -> Vec<u64> {
    match std::env::var("AIGRID_SIM_SEED") {
        Ok(seed) => vec![seed.trim().parse().expect("AIGRID_SIM_SEED is a number")],
        Err(_) => (0..count).collect(),
    }
}

/// A small deterministic state machine for driver tests: an ordered list of values.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListMachine {
    /// Every applied value, in log order.
    pub values: Vec<u64>,
}

impl StateMachine for ListMachine {
    type Command = u64;
    type Output = usize;

    fn apply(&mut self, _index: u64, command: u64) -> usize {
        self.values.push(command);
        self.values.len()
    }

    fn snapshot(&self) -> Result<Vec<u8>, crate::state_machine::SnapshotError> {
        serde_json::to_vec(self).map_err(|e| crate::state_machine::SnapshotError(e.to_string()))
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), crate::state_machine::SnapshotError> {
        *self = serde_json::from_slice(data)
            .map_err(|e| crate::state_machine::SnapshotError(e.to_string()))?;
        Ok(())
    }
}

/// A simulated disk for deterministic tests: what it holds survives a simulated crash,
/// and it can be told to fail the next write, losing that batch as a crash before fsync
/// would.
#[derive(Clone, Default)]
pub struct SimDisk {
    inner: Arc<Mutex<SimDiskInner>>,
}

#[derive(Default)]
struct SimDiskInner {
    image: LogImage,
    fail_next_write: bool,
    writes: u64,
}

impl SimDisk {
    /// A disk that already holds `image`.
    pub fn with_image(image: LogImage) -> Self {
        let disk = SimDisk::default();
        disk.inner.lock().image = image;
        disk
    }

    /// Makes the next write fail without persisting anything.
    pub fn fail_next_write(&self) {
        self.inner.lock().fail_next_write = true;
    }

    /// Batches written so far: each one is an fsync on a real disk.
    pub fn writes(&self) -> u64 {
        self.inner.lock().writes
    }

    /// Clears a pending failure (the replica crashed another way first).
    pub fn clear_failure(&self) {
        self.inner.lock().fail_next_write = false;
    }
}

impl Durable for SimDisk {
    fn load(&self) -> Result<LogImage, LogStoreError> {
        Ok(self.inner.lock().image.clone())
    }

    fn write(&mut self, batch: &WriteBatch, _before: &LogImage) -> Result<(), LogStoreError> {
        let mut inner = self.inner.lock();
        if std::mem::take(&mut inner.fail_next_write) {
            return Err(LogStoreError::SimulatedCrash);
        }
        inner.image.apply(batch);
        inner.writes += 1;
        Ok(())
    }
}
