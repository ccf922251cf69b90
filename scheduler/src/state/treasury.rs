//! Treasuries: circles' balances in credits, what their allocations cost at their
//! nodes' prices, hourly settlement to the farmers, and the ledger.
//!
//! - A circle's treasury opens with its first deposit (an admin records credits
//!   coming in from outside: `external` is debited). From then on every meter
//!   ([`super::metering`]) accrues what each running allocation of the circle
//!   held times its node's prices, exactly (integer micro-credits and a remainder).
//!   Use of a circle without a treasury, and of nodes without prices, is free.
//! - The leader commits a [`Command::Settle`](super::Command::Settle) every
//!   settlement period (an hour by default): what each circle accrued on each node
//!   moves from `circle:NAME` to the node's farmer (`farmer:ID`, or `node:ID` for a
//!   node that names none), one ledger entry per circle and node. Every entry
//!   debits what it credits, so the balances always sum to zero.
//! - A circle whose available balance (balance less what it accrued) is spent is
//!   *held*: the planner places none of its new work, and the state refuses plans
//!   that would. Its running allocations keep running for the grace period the
//!   settling leader names, then are stopped. A deposit that leaves it something
//!   to spend lifts the hold and its jobs are planned again.
//! - Moving credits out of a circle is always a guarded change of the circle
//!   (`treasury.transfer`): only its quorum can, and an ungoverned circle cannot.

use std::collections::{BTreeMap, VecDeque};

use aigrid_api::treasury::{EntryKind, LedgerEntry};
use aigrid_api::{
    AllocState, Allocation, Credits, DesiredState, EvalTrigger, JobId, NodeId, Timestamp,
    TreasuryView,
};
use serde::{Deserialize, Serialize};

use super::{Applied, ClusterState, CommandOutput, StateError};

/// The settlement period the leader keeps by default: an hour.
pub const SETTLE_EVERY_MS: u64 = 3_600_000;
/// How long a spent circle's running allocations keep running by default.
pub const GRACE_MS: u64 = 3_600_000;
/// Ledger entries kept; older ones are dropped (balances keep their effect).
pub const LEDGER_KEPT: usize = 100_000;
/// The account of the world outside the grid.
pub const EXTERNAL: &str = "external";

/// Per-millisecond costs are counted in units of a micro-credit divided by this:
/// a price per hour of a thousandth of a GPU or core (×1000), per MiB of a GiB
/// price (×1024), per millisecond of an hour (×3 600 000).
const DENOM: u64 = 1_000 * 1_024 * 3_600_000;

/// What a circle owes for use not yet settled: whole micro-credits and a
/// remainder in `1 / DENOM` of one, so nothing is rounded away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Owed {
    micro: u64,
    rest: u64,
}

impl Owed {
    fn add(&mut self, units: u128) {
        let total = u128::from(self.rest) + units;
        let denom = u128::from(DENOM);
        self.micro = self
            .micro
            .saturating_add(u64::try_from(total / denom).unwrap_or(u64::MAX));
        self.rest = (total % denom) as u64;
    }
}

/// A circle whose available balance is spent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hold {
    since: Timestamp,
    /// When its running allocations were stopped, once they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stopped_at: Option<Timestamp>,
}

/// The treasury tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Treasury {
    /// Balances by account; the circles with an open treasury have one.
    #[serde(default)]
    balances: BTreeMap<String, Credits>,
    /// Unsettled use, per circle and node.
    #[serde(default, with = "super::metering::pairs")]
    owed: BTreeMap<(String, NodeId), Owed>,
    /// The newest entries, oldest first, at most [`LEDGER_KEPT`].
    #[serde(default)]
    ledger: VecDeque<LedgerEntry>,
    /// Entries recorded since the cluster began.
    #[serde(default)]
    entries: u64,
    /// Spent circles.
    #[serde(default)]
    holds: BTreeMap<String, Hold>,
    /// When use was last settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settled_until: Option<Timestamp>,
    /// The grace period the last settlement named.
    #[serde(default = "default_grace")]
    grace_ms: u64,
}

fn default_grace() -> u64 {
    GRACE_MS
}

/// The highest prices nodes ask per hour, in micro-credits.
#[derive(Debug, Default)]
struct TopPrices {
    /// Per GPU, by GPU model.
    gpu: BTreeMap<String, u128>,
    /// Per core.
    cpu: u128,
    /// Per GiB.
    memory: u128,
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Ledger entries written.
    pub entries: usize,
    /// Credits moved to farmers.
    pub amount: Credits,
    /// Allocations stopped because their circle's grace period ended.
    pub stopped: usize,
}

fn circle_account(circle: &str) -> String {
    format!("circle:{circle}")
}

impl Treasury {
    fn balance(&self, account: &str) -> Credits {
        self.balances.get(account).copied().unwrap_or_default()
    }

    fn is_open(&self, circle: &str) -> bool {
        self.balances.contains_key(&circle_account(circle))
    }

    /// What `circle` accrued and has not settled, in whole micro-credits
    /// (rounded up: a fraction owed counts).
    fn accrued(&self, circle: &str) -> Credits {
        let micro: u64 = self
            .owed
            .range((circle.to_owned(), NodeId::new(""))..)
            .take_while(|((c, _), _)| c == circle)
            .map(|(_, o)| o.micro + u64::from(o.rest > 0))
            .sum();
        Credits::from_micro(i64::try_from(micro).unwrap_or(i64::MAX))
    }

    fn available(&self, circle: &str) -> Credits {
        self.balance(&circle_account(circle))
            .minus(self.accrued(circle))
    }

    /// Writes an entry moving `amount` from one account to another.
    fn record(
        &mut self,
        at: Timestamp,
        kind: EntryKind,
        from: String,
        to: String,
        amount: Credits,
        memo: String,
    ) {
        let debit = self.balance(&from).minus(amount);
        let credit = self.balance(&to).plus(amount);
        self.balances.insert(from.clone(), debit);
        self.balances.insert(to.clone(), credit);
        self.entries += 1;
        self.ledger.push_back(LedgerEntry {
            seq: self.entries,
            at,
            kind,
            from,
            to,
            amount,
            memo,
        });
        while self.ledger.len() > LEDGER_KEPT {
            self.ledger.pop_front();
        }
    }
}

/// What an allocation costs per millisecond, in `1 / DENOM` micro-credits, at its
/// node's prices: `gpu_milli` thousandths of GPUs of `model`, its CPU and memory.
fn cost_per_ms(
    prices: &aigrid_api::Prices,
    model: &str,
    gpu_milli: u64,
    alloc: &Allocation,
) -> u128 {
    let micro = |c: Credits| u128::try_from(c.micro()).unwrap_or(0);
    let r = &alloc.resources;
    let gpu = u128::from(gpu_milli) * micro(prices.gpu(model)) * 1_024;
    let cpu = u128::from(r.cpu_millis.get()) * micro(prices.cpu_core_hour) * 1_024;
    let memory = u128::from(r.memory_mib.get()) * micro(prices.memory_gib_hour) * 1_000;
    gpu.saturating_add(cpu).saturating_add(memory)
}

impl ClusterState {
    /// The live jobs of `circle`, in no set order: what uses them sums, tests or
    /// sorts what it takes.
    pub(super) fn circle_jobs<'a>(
        &'a self,
        circle: &'a str,
    ) -> impl Iterator<Item = &'a super::JobRecord> + 'a {
        self.tables
            .jobs
            .values()
            .map(std::sync::Arc::as_ref)
            .filter(move |j| j.spec.circle.as_deref() == Some(circle))
    }

    /// The circle of a job (empty for the admins' jobs).
    pub(super) fn job_circle(&self, job: &JobId) -> String {
        self.tables
            .jobs
            .get(job)
            .and_then(|j| j.spec.circle.clone())
            .unwrap_or_default()
    }

    /// What `alloc` of `circle` (holding `gpu_milli` thousandths of GPUs of
    /// `model`) costs per millisecond, and whom it is owed to: `None` when its
    /// circle has no treasury or its node no prices.
    pub(super) fn cost_of(
        &self,
        alloc: &Allocation,
        circle: &str,
        model: &str,
        gpu_milli: u64,
    ) -> Option<((String, NodeId), u128)> {
        if circle.is_empty() || !self.tables.treasury.is_open(circle) {
            return None;
        }
        let offer = self.tables.nodes.get(&alloc.node_id)?.offer.as_ref()?;
        let per_ms = cost_per_ms(&offer.prices, model, gpu_milli, alloc);
        (per_ms > 0).then(|| ((circle.to_owned(), alloc.node_id.clone()), per_ms))
    }

    /// Accrues what the meter counted: per circle and node, a cost per
    /// millisecond held for `ms`.
    pub(super) fn accrue(&mut self, costs: Vec<((String, NodeId), u128)>, ms: u64) {
        for (key, per_ms) in costs {
            self.tables
                .treasury
                .owed
                .entry(key)
                .or_default()
                .add(per_ms.saturating_mul(u128::from(ms)));
        }
    }

    /// Holds circles whose available balance is spent and lifts the hold of those
    /// with something to spend again. Answers the jobs of the circles lifted, to
    /// be planned anew.
    pub(super) fn review_holds(&mut self, at: Timestamp) -> Vec<JobId> {
        let treasury = &self.tables.treasury;
        let mut lifted = Vec::new();
        let mut held = Vec::new();
        for account in treasury.balances.keys() {
            let Some(circle) = account.strip_prefix("circle:") else {
                continue;
            };
            let spent = !treasury.available(circle).is_positive();
            match (spent, treasury.holds.contains_key(circle)) {
                (true, false) => held.push(circle.to_owned()),
                (false, true) => lifted.push(circle.to_owned()),
                _ => {}
            }
        }
        let treasury = &mut self.tables.treasury;
        for circle in held {
            treasury.holds.insert(
                circle,
                Hold {
                    since: at,
                    stopped_at: None,
                },
            );
        }
        for circle in &lifted {
            treasury.holds.remove(circle);
        }
        let jobs: Vec<JobId> = self
            .tables
            .jobs
            .values()
            .filter(|j| j.spec.circle.as_ref().is_some_and(|c| lifted.contains(c)))
            .map(|j| j.id.clone())
            .collect();
        jobs
    }

    /// [`Self::review_holds`], planning the jobs of circles lifted.
    pub(super) fn review_holds_and_plan(&mut self, index: u64, at: Timestamp) {
        let jobs = self.review_holds(at);
        self.treasury_evals(index, jobs, at);
    }

    /// An evaluation per job, so the planner acts on a hold's change.
    fn treasury_evals(&mut self, index: u64, jobs: Vec<JobId>, at: Timestamp) {
        let jobs = jobs.into_iter().map(|j| (j, 0)).collect();
        self.node_update_evals(index, jobs, EvalTrigger::Treasury, at);
    }

    /// Settles what every circle accrued (see the module documentation), then
    /// stops the running allocations of circles held for longer than `grace_ms`.
    pub(super) fn settle(&mut self, index: u64, at: Timestamp, grace_ms: u64) -> CommandOutput {
        let treasury = &mut self.tables.treasury;
        if treasury.settled_until.is_some_and(|s| s >= at) {
            // A replay, or a leader behind another: nothing to settle.
            return Ok(Applied::Settled(Settled {
                entries: 0,
                amount: Credits::ZERO,
                stopped: 0,
            }));
        }
        let period = match treasury.settled_until {
            Some(from) => format!("{} to {}", from.as_millis(), at.as_millis()),
            None => format!("to {}", at.as_millis()),
        };
        treasury.grace_ms = grace_ms;
        treasury.settled_until = Some(at);
        let mut entries = 0;
        let mut amount = Credits::ZERO;
        for ((circle, node), owed) in std::mem::take(&mut treasury.owed) {
            let carry = Owed {
                micro: 0,
                rest: owed.rest,
            };
            if owed.rest > 0 {
                treasury.owed.insert((circle.clone(), node.clone()), carry);
            }
            if owed.micro == 0 {
                continue;
            }
            let farmer = self
                .tables
                .nodes
                .get(&node)
                .and_then(|n| n.offer.as_ref())
                .and_then(|o| o.farmer.as_ref())
                .map_or_else(|| format!("node:{node}"), |f| format!("farmer:{f}"));
            let paid = Credits::from_micro(i64::try_from(owed.micro).unwrap_or(i64::MAX));
            treasury.record(
                at,
                EntryKind::Settlement,
                circle_account(&circle),
                farmer,
                paid,
                format!("use on node {node}, {period}"),
            );
            entries += 1;
            amount = amount.plus(paid);
        }
        let mut replan = self.review_holds(at);
        let due: Vec<String> = self
            .tables
            .treasury
            .holds
            .iter()
            .filter(|(_, h)| {
                h.stopped_at.is_none()
                    && h.since.as_millis().saturating_add(grace_ms) <= at.as_millis()
            })
            .map(|(c, _)| c.clone())
            .collect();
        let mut stopped = 0;
        for circle in due {
            let jobs: Vec<JobId> = self.circle_jobs(&circle).map(|j| j.id.clone()).collect();
            for job in &jobs {
                for id in self.job_alloc_ids(job) {
                    let Some(alloc) = self.tables.allocations.get(&id) else {
                        continue;
                    };
                    if alloc.desired != DesiredState::Run || alloc.state.is_terminal() {
                        continue;
                    }
                    let mut alloc = alloc.clone();
                    alloc.desired = DesiredState::Stop;
                    alloc.updated_at = at;
                    self.put_alloc(alloc);
                    stopped += 1;
                }
            }
            if let Some(hold) = self.tables.treasury.holds.get_mut(&circle) {
                hold.stopped_at = Some(at);
            }
            replan.extend(jobs);
        }
        self.treasury_evals(index, replan, at);
        Ok(Applied::Settled(Settled {
            entries,
            amount,
            stopped,
        }))
    }

    /// Records credits coming in for `circle` (opening its treasury).
    pub(super) fn deposit(
        &mut self,
        index: u64,
        circle: &str,
        amount: Credits,
        memo: String,
        at: Timestamp,
    ) -> CommandOutput {
        aigrid_api::treasury::check_movement(circle, amount, &memo)?;
        let entry = (
            EntryKind::Deposit,
            EXTERNAL.to_owned(),
            circle_account(circle),
        );
        Ok(self.move_credits(index, circle, entry, amount, memo, at))
    }

    /// Records one entry of `circle`'s (kind, from, to) and reviews the circle's
    /// hold.
    fn move_credits(
        &mut self,
        index: u64,
        circle: &str,
        (kind, from, to): (EntryKind, String, String),
        amount: Credits,
        memo: String,
        at: Timestamp,
    ) -> Applied {
        self.tables
            .treasury
            .record(at, kind, from, to, amount, memo);
        self.review_holds_and_plan(index, at);
        Applied::TreasuryChanged {
            circle: circle.to_owned(),
        }
    }

    /// Moves credits out of `circle`: an approved proposal's change (the direct
    /// path refuses it as guarded), and never more than the circle has available.
    pub(super) fn transfer(
        &mut self,
        index: u64,
        circle: &str,
        to: String,
        amount: Credits,
        memo: String,
        at: Timestamp,
    ) -> CommandOutput {
        self.check_transfer(circle, &to, amount, &memo)?;
        let entry = (EntryKind::Transfer, circle_account(circle), to);
        Ok(self.move_credits(index, circle, entry, amount, memo, at))
    }

    /// Whether `amount` may move out of `circle` to `to`: a well-formed request, a
    /// governed circle (only a quorum moves credits out), another account, and no
    /// more than the circle has available. The API asks before proposing; the
    /// transfer asks again as it applies.
    pub fn check_transfer(
        &self,
        circle: &str,
        to: &str,
        amount: Credits,
        memo: &str,
    ) -> Result<(), StateError> {
        aigrid_api::treasury::check_movement(circle, amount, memo)?;
        aigrid_api::treasury::check_account(to)?;
        if self.governing(circle).is_none() {
            return Err(StateError::conflict(format!(
                "circle `{circle}` is not governed: credits leave a circle only with its \
                 quorum's approval, so govern it first (aigrid circle create)"
            )));
        }
        if to == circle_account(circle) {
            return Err(aigrid_api::ValidationError::new("to", "the circle's own account").into());
        }
        let available = self.tables.treasury.available(circle);
        if amount > available {
            return Err(StateError::conflict(format!(
                "circle `{circle}` has {available} credits available, less than {amount}"
            )));
        }
        Ok(())
    }

    /// Why `circle`'s new work is not placed, if it is not.
    pub fn placement_hold(&self, circle: &str) -> Option<String> {
        let treasury = &self.tables.treasury;
        let hold = treasury.holds.get(circle)?;
        let available = treasury.available(circle);
        let then = match hold.stopped_at {
            Some(at) => format!("its running work was stopped at {}", at.utc_text()),
            None => format!(
                "its running work stops at {} unless a deposit comes first",
                Timestamp::from_millis(hold.since.as_millis().saturating_add(treasury.grace_ms))
                    .utc_text()
            ),
        };
        Some(format!(
            "circle `{circle}`'s treasury is spent ({available} credits available, since {}): \
             no new work is placed until a deposit, and {then}",
            hold.since.utc_text()
        ))
    }

    /// Every circle held, with the reason: what the planner leaves unplaced.
    pub fn placement_holds(&self) -> BTreeMap<String, String> {
        self.tables
            .treasury
            .holds
            .keys()
            .filter_map(|c| Some((c.clone(), self.placement_hold(c)?)))
            .collect()
    }

    /// Circles held whose grace period ended at `now` with their work still
    /// running: the leader settles at once for them.
    pub fn grace_over(&self, now: Timestamp, grace_ms: u64) -> bool {
        self.tables.treasury.holds.values().any(|h| {
            h.stopped_at.is_none()
                && h.since.as_millis().saturating_add(grace_ms) <= now.as_millis()
        })
    }

    /// When use was last settled.
    pub fn settled_until(&self) -> Option<Timestamp> {
        self.tables.treasury.settled_until
    }

    /// `circle`'s treasury as the API shows it.
    pub fn treasury_view(&self, circle: &str) -> TreasuryView {
        let treasury = &self.tables.treasury;
        let account = circle_account(circle);
        let now = self.metered_until().unwrap_or_default();
        let day_ago = now.as_millis().saturating_sub(24 * 3_600_000);
        let spent_24h = treasury
            .ledger
            .iter()
            .rev()
            .take_while(|e| e.at.as_millis() >= day_ago)
            .filter(|e| e.from == account)
            .fold(Credits::ZERO, |sum, e| sum.plus(e.amount));
        let hold = treasury.holds.get(circle);
        TreasuryView {
            circle: circle.to_owned(),
            open: treasury.is_open(circle),
            balance: treasury.balance(&account),
            accrued: treasury.accrued(circle),
            available: treasury.available(circle),
            rate_per_hour: self.rate_per_hour(circle),
            spent_24h,
            exhausted_since: hold.map(|h| h.since),
            stops_at: hold.map(|h| {
                h.stopped_at.unwrap_or(Timestamp::from_millis(
                    h.since.as_millis().saturating_add(treasury.grace_ms),
                ))
            }),
            hold: self.placement_hold(circle),
            settled_until: treasury.settled_until,
        }
    }

    /// What `circle`'s running allocations cost per hour at their nodes' prices.
    fn rate_per_hour(&self, circle: &str) -> Credits {
        let mut units: u128 = 0;
        for id in self
            .circle_jobs(circle)
            .flat_map(|j| self.job_alloc_ids(&j.id))
        {
            let Some(alloc) = self.tables.allocations.get(&id) else {
                continue;
            };
            let offer = self
                .tables
                .nodes
                .get(&alloc.node_id)
                .and_then(|n| n.offer.as_ref());
            let Some(offer) = offer.filter(|_| alloc.state == AllocState::Running) else {
                continue;
            };
            let (model, milli) = self.gpus_held(alloc);
            units = units.saturating_add(cost_per_ms(&offer.prices, &model, milli, alloc));
        }
        let micro = units * 3_600_000 / u128::from(DENOM);
        Credits::from_micro(i64::try_from(micro).unwrap_or(i64::MAX))
    }

    /// The entries debiting or crediting `account`, newest first, at most `limit`.
    pub fn ledger(&self, account: &str, limit: usize) -> aigrid_api::LedgerPage {
        let treasury = &self.tables.treasury;
        aigrid_api::LedgerPage {
            account: account.to_owned(),
            balance: treasury.balance(account),
            entries: treasury
                .ledger
                .iter()
                .rev()
                .filter(|e| e.from == account || e.to == account)
                .take(limit)
                .cloned()
                .collect(),
        }
    }

    /// Every account's balance, and their sum.
    pub fn accounts(&self) -> aigrid_api::Accounts {
        let treasury = &self.tables.treasury;
        aigrid_api::Accounts {
            balances: treasury.balances.clone(),
            sum: treasury
                .balances
                .values()
                .fold(Credits::ZERO, |sum, b| sum.plus(*b)),
            entries: treasury.entries,
        }
    }

    /// The highest price any node asks per hour, in micro-credits: per GPU by
    /// model, per core, per GiB.
    fn top_prices(&self) -> TopPrices {
        let micro = |c: Credits| u128::try_from(c.micro()).unwrap_or(0);
        let mut top = TopPrices::default();
        for node in self.tables.nodes.values() {
            let Some(offer) = &node.offer else {
                continue;
            };
            for gpu in &node.resources.gpus {
                let price = micro(offer.prices.gpu(&gpu.model));
                let entry = top.gpu.entry(gpu.model.clone()).or_default();
                *entry = (*entry).max(price);
            }
            top.cpu = top.cpu.max(micro(offer.prices.cpu_core_hour));
            top.memory = top.memory.max(micro(offer.prices.memory_gib_hour));
        }
        top
    }

    /// The most `spec` can cost per hour, in micro-credits: every instance of every
    /// group (a scaled group at its `max`) at the highest prices (`top`) for what
    /// the group requests (a GPU of a model it may take, a core, a GiB).
    fn spend_ceiling(spec: &aigrid_api::JobSpec, top: &TopPrices) -> u128 {
        let mut total: u128 = 0;
        for group in &spec.groups {
            let r = &group.resources;
            let gpu = r.gpus.as_ref().map_or(0, |g| {
                let each = top
                    .gpu
                    .iter()
                    .filter(|(model, _)| g.model.as_deref().is_none_or(|m| model.contains(m)))
                    .map(|(_, price)| *price)
                    .max()
                    .unwrap_or(0);
                each * u128::from(g.count.max(1))
            });
            let per_instance = gpu
                + top.cpu * u128::from(r.cpu_millis.get()) / 1_000
                + top.memory * u128::from(r.memory_mib.get()) / 1_024;
            let most = group.scaling.as_ref().map_or(group.count, |s| s.max);
            total = total.saturating_add(per_instance * u128::from(most));
        }
        total
    }

    /// Whether `spec` replacing `old` (absent for a new job) takes what `circle`'s
    /// jobs may cost per hour above `limit`, and raises it.
    pub(super) fn raises_spend_above(
        &self,
        circle: &str,
        spec: &aigrid_api::JobSpec,
        old: Option<&aigrid_api::JobSpec>,
        limit: Credits,
    ) -> bool {
        let top = self.top_prices();
        let before: u128 = self
            .circle_jobs(circle)
            .map(|j| Self::spend_ceiling(&j.spec, &top))
            .sum();
        let after = before - old.map_or(0, |o| Self::spend_ceiling(o, &top)).min(before)
            + Self::spend_ceiling(spec, &top);
        after > before && after > u128::try_from(limit.micro()).unwrap_or(0)
    }

    /// Refuses a plan placing new work for a held circle.
    pub(super) fn check_not_held(&self, job: &JobId, placing: bool) -> Result<(), StateError> {
        if !placing {
            return Ok(());
        }
        let circle = self.job_circle(job);
        match self.placement_hold(&circle) {
            Some(reason) if !circle.is_empty() => Err(StateError::conflict(reason)),
            _ => Ok(()),
        }
    }
}
