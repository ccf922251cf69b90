//! Quotas and dominant-resource fair share between circles, as one scheduling pass
//! sees them. Pure: built from the state's quotas, nodes and live allocations, and
//! kept current as the pass plans.
//!
//! - **Quota.** What a circle is guaranteed: whole GPUs by model (a key matches
//!   every GPU model containing it), GPU memory, CPU and memory. Beyond its quota a
//!   circle may still use idle capacity: that is *borrowed*.
//! - **Borrowed.** A circle over its quota has allocations that make up the excess:
//!   its lowest-priority ones first (then by id, last first), only those that hold
//!   something it is over on, until what is left is within its quota.
//! - **Reclaim.** A circle within its quota whose instance fits nowhere may evict
//!   other circles' borrowed allocations, whatever their priority, lowest first.
//! - **Priority preemption** under quotas evicts only the same circle's work,
//!   borrowed work, or work of circles without a quota: no priority takes what a
//!   quota guarantees.
//! - **Dominant share.** The largest fraction, over every resource, that a circle
//!   holds of its quota (of the pool, for resources its quota leaves out). Jobs of
//!   equal priority are planned lowest share first, each placement raising its
//!   circle's share, so contending circles fill the pool in proportion to their
//!   quotas (equally without quotas): dominant-resource fairness.

use std::collections::{BTreeMap, HashMap, HashSet};

use aigrid_api::{AllocId, Allocation, Held, Node, NodeStatus, Quota, Resources};

/// What allocations hold: thousandths of a GPU by GPU model, GPU memory, CPU and
/// memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Thousandths of GPUs, by the GPUs' model.
    pub gpus: BTreeMap<String, u64>,
    /// GPU memory, MiB.
    pub gpu_memory_mib: u64,
    /// CPU, thousandths of a core.
    pub cpu_millis: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
}

impl Amounts {
    /// Adds `other`.
    pub fn add(&mut self, other: &Amounts) {
        for (model, milli) in &other.gpus {
            *self.gpus.entry(model.clone()).or_default() += milli;
        }
        self.gpu_memory_mib += other.gpu_memory_mib;
        self.cpu_millis += other.cpu_millis;
        self.memory_mib += other.memory_mib;
    }

    /// Takes `other` away.
    pub fn sub(&mut self, other: &Amounts) {
        for (model, milli) in &other.gpus {
            if let Some(held) = self.gpus.get_mut(model) {
                *held = held.saturating_sub(*milli);
            }
        }
        self.gpus.retain(|_, m| *m > 0);
        self.gpu_memory_mib = self.gpu_memory_mib.saturating_sub(other.gpu_memory_mib);
        self.cpu_millis = self.cpu_millis.saturating_sub(other.cpu_millis);
        self.memory_mib = self.memory_mib.saturating_sub(other.memory_mib);
    }

    /// Thousandths of GPUs whose model contains `key` (and of any model: `*`).
    fn gpus_matching(&self, key: &str) -> u64 {
        self.gpus
            .iter()
            .filter(|(model, _)| model.contains(key) || model.as_str() == "*")
            .map(|(_, m)| m)
            .sum()
    }

    /// As the API shows it, GPUs by `keys` where a key matches, else by model.
    pub fn to_held(&self, keys: &[&String]) -> Held {
        let mut gpus: BTreeMap<String, f64> = BTreeMap::new();
        for (model, milli) in &self.gpus {
            let key = keys.iter().find(|k| model.contains(k.as_str()));
            let name = key.map_or_else(|| model.clone(), |k| (*k).clone());
            *gpus.entry(name).or_default() += *milli as f64 / 1000.0;
        }
        Held {
            gpus,
            gpu_memory_mib: self.gpu_memory_mib,
            cpu_millis: self.cpu_millis,
            memory_mib: self.memory_mib,
        }
    }
}

/// What `resources` hold on GPUs `uuids` of a node with `devices`: a whole GPU
/// counts 1000 thousandths and all its memory, a memory slice its share and its
/// size.
fn amounts_of(
    resources: &Resources,
    uuids: &[String],
    devices: &HashMap<String, (String, u64)>,
) -> Amounts {
    let slice_mib = resources
        .gpus
        .as_ref()
        .and_then(|g| g.memory_slice_mib)
        .map(|m| m.get());
    let mut out = Amounts {
        cpu_millis: resources.cpu_millis.get(),
        memory_mib: resources.memory_mib.get(),
        ..Amounts::default()
    };
    for uuid in uuids {
        let Some((model, memory)) = devices.get(uuid) else {
            continue;
        };
        let (milli, mib) = match slice_mib {
            Some(slice) if *memory > 0 => ((1000 * slice / memory).min(1000), slice),
            _ => (1000, *memory),
        };
        *out.gpus.entry(model.clone()).or_default() += milli;
        out.gpu_memory_mib += mib;
    }
    out
}

/// One live allocation as fairness counts it.
#[derive(Debug, Clone)]
struct Counted {
    circle: String,
    priority: u32,
    amounts: Amounts,
}

/// Quotas, what each circle holds, and which allocations are borrowed.
#[derive(Debug, Clone, Default)]
pub struct Fairness {
    quotas: BTreeMap<String, Quota>,
    /// What the pool's ready nodes offer.
    capacity: Amounts,
    /// Per GPU uuid: its model and memory.
    devices: HashMap<String, (String, u64)>,
    used: HashMap<String, Amounts>,
    live: HashMap<AllocId, Counted>,
    /// Live allocations by circle.
    members: HashMap<String, HashSet<AllocId>>,
    borrowed: HashSet<AllocId>,
    /// The borrowed allocations by circle, so marking a circle's again forgets
    /// only what it marked before.
    borrowed_of: HashMap<String, Vec<AllocId>>,
}

impl Fairness {
    /// Fairness over `nodes` with `quotas`; no allocation counted yet.
    pub fn new<'a>(
        quotas: BTreeMap<String, Quota>,
        nodes: impl IntoIterator<Item = &'a Node>,
    ) -> Self {
        let mut fair = Fairness {
            quotas,
            ..Fairness::default()
        };
        for node in nodes {
            for gpu in &node.resources.gpus {
                fair.devices
                    .insert(gpu.uuid.clone(), (gpu.model.clone(), gpu.memory_mib.get()));
            }
            if node.status != NodeStatus::Ready {
                continue;
            }
            let c = &mut fair.capacity;
            c.cpu_millis += node.resources.cpu_millis.get();
            c.memory_mib += node.resources.memory_mib.get();
            for gpu in node.resources.gpus.iter().filter(|g| g.healthy) {
                *c.gpus.entry(gpu.model.clone()).or_default() += 1000;
                c.gpu_memory_mib += gpu.memory_mib.get();
            }
        }
        fair
    }

    /// Whether any circle has a quota: without one, only the fair-share order
    /// applies.
    pub fn enforced(&self) -> bool {
        !self.quotas.is_empty()
    }

    /// What an allocation of `resources` on GPUs `uuids` holds.
    pub fn amounts(&self, resources: &Resources, uuids: &[String]) -> Amounts {
        amounts_of(resources, uuids, &self.devices)
    }

    /// Counts a live allocation of `circle`'s job of `priority`.
    pub fn hold(&mut self, alloc: &Allocation, circle: &str, priority: u32) {
        let amounts = self.amounts(&alloc.resources, &alloc.gpus);
        self.count(alloc.id.clone(), circle, priority, amounts);
    }

    /// Counts allocation `id` of `circle` holding `amounts`.
    pub fn count(&mut self, id: AllocId, circle: &str, priority: u32, amounts: Amounts) {
        self.release(&id);
        self.used
            .entry(circle.to_owned())
            .or_default()
            .add(&amounts);
        self.members
            .entry(circle.to_owned())
            .or_default()
            .insert(id.clone());
        self.live.insert(
            id,
            Counted {
                circle: circle.to_owned(),
                priority,
                amounts,
            },
        );
    }

    /// Stops counting allocation `id`.
    pub fn release(&mut self, id: &AllocId) {
        if let Some(old) = self.live.remove(id) {
            if let Some(used) = self.used.get_mut(&old.circle) {
                used.sub(&old.amounts);
            }
            if let Some(members) = self.members.get_mut(&old.circle) {
                members.remove(id);
            }
        }
        self.borrowed.remove(id);
    }

    /// The quota of `circle`, if it has one.
    pub fn quota(&self, circle: &str) -> Option<&Quota> {
        self.quotas.get(circle)
    }

    /// What `circle` holds.
    pub fn used(&self, circle: &str) -> Amounts {
        self.used.get(circle).cloned().unwrap_or_default()
    }

    /// Where `amounts` exceed `circle`'s quota, as `held of quota what` lines; empty
    /// when within it (or without a quota).
    pub fn excess(&self, circle: &str, amounts: &Amounts) -> Vec<String> {
        let Some(q) = self.quotas.get(circle) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, count) in &q.gpus {
            let held = amounts.gpus_matching(key);
            if held > u64::from(*count) * 1000 {
                out.push(format!("{} of {count} {key} GPUs", held as f64 / 1000.0));
            }
        }
        let mut check = |limit: Option<u64>, held: u64, what: &str| {
            if limit.is_some_and(|l| held > l) {
                out.push(format!("{held} of {} {what}", limit.unwrap_or(0)));
            }
        };
        check(
            q.gpu_memory_mib,
            amounts.gpu_memory_mib,
            "MiB of GPU memory",
        );
        check(q.cpu_millis, amounts.cpu_millis, "CPU millis");
        check(q.memory_mib, amounts.memory_mib, "MiB of memory");
        out
    }

    /// Where what `circle` holds with `more` would exceed its quota (see
    /// [`Fairness::excess`]).
    pub fn excess_with(&self, circle: &str, more: &Amounts) -> Vec<String> {
        if !self.quotas.contains_key(circle) {
            return Vec::new();
        }
        let mut after = self.used(circle);
        after.add(more);
        self.excess(circle, &after)
    }

    /// Whether `circle` has a quota and holds, with `more`, no more than it.
    pub fn within(&self, circle: &str, more: &Amounts) -> bool {
        self.quotas.contains_key(circle) && self.excess_with(circle, more).is_empty()
    }

    /// Marks which allocations are borrowed (see the module documentation).
    pub fn find_borrowed(&mut self) {
        self.borrowed.clear();
        self.borrowed_of.clear();
        let circles: Vec<String> = self.quotas.keys().cloned().collect();
        for circle in circles {
            self.find_borrowed_of(&circle);
        }
    }

    /// Marks again which of `circle`'s allocations are borrowed: after a plan
    /// changed what it holds.
    pub fn find_borrowed_of(&mut self, circle: &str) {
        for id in self.borrowed_of.remove(circle).unwrap_or_default() {
            self.borrowed.remove(&id);
        }
        let mut left = self.used(circle);
        if self.excess(circle, &left).is_empty() {
            return;
        }
        let Some(members) = self.members.get(circle) else {
            return;
        };
        let mut mine: Vec<(&AllocId, &Counted)> = members
            .iter()
            .filter_map(|id| Some((id, self.live.get(id)?)))
            .collect();
        mine.sort_by(|a, b| a.1.priority.cmp(&b.1.priority).then(b.0.cmp(a.0)));
        let mut marked = Vec::new();
        for (id, counted) in mine {
            if self.excess(circle, &left).is_empty() {
                break;
            }
            if self.relieves(circle, &left, &counted.amounts) {
                left.sub(&counted.amounts);
                marked.push(id.clone());
            }
        }
        self.borrowed.extend(marked.iter().cloned());
        self.borrowed_of.insert(circle.to_owned(), marked);
    }

    /// Whether giving up `amounts` lowers something `circle` is over on.
    fn relieves(&self, circle: &str, held: &Amounts, amounts: &Amounts) -> bool {
        let Some(q) = self.quotas.get(circle) else {
            return false;
        };
        let gpu = q.gpus.iter().any(|(key, count)| {
            held.gpus_matching(key) > u64::from(*count) * 1000 && amounts.gpus_matching(key) > 0
        });
        let over = |limit: Option<u64>, h: u64, a: u64| limit.is_some_and(|l| h > l) && a > 0;
        gpu || over(
            q.gpu_memory_mib,
            held.gpu_memory_mib,
            amounts.gpu_memory_mib,
        ) || over(q.cpu_millis, held.cpu_millis, amounts.cpu_millis)
            || over(q.memory_mib, held.memory_mib, amounts.memory_mib)
    }

    /// Whether any allocation is borrowed: reclaim has nothing to take otherwise.
    pub fn any_borrowed(&self) -> bool {
        !self.borrowed.is_empty()
    }

    /// Whether allocation `id` is borrowed capacity.
    pub fn is_borrowed(&self, id: &AllocId) -> bool {
        self.borrowed.contains(id)
    }

    /// The circle of live allocation `id`.
    pub fn circle_of(&self, id: &AllocId) -> Option<&str> {
        self.live.get(id).map(|c| c.circle.as_str())
    }

    /// Whether a job of `circle` may evict allocation `victim` (of another job)
    /// by priority: always without quotas; under quotas only the same circle's
    /// work, borrowed work, or work of a circle without a quota.
    pub fn may_preempt(&self, circle: &str, victim: &AllocId) -> bool {
        if !self.enforced() {
            return true;
        }
        match self.circle_of(victim) {
            Some(c) => c == circle || self.is_borrowed(victim) || !self.quotas.contains_key(c),
            None => true,
        }
    }

    /// `circle`'s dominant share: the largest fraction of its quota, or of the
    /// pool for what its quota leaves out, that it holds over every resource.
    pub fn share(&self, circle: &str) -> f64 {
        let nothing = Amounts::default();
        let used = self.used.get(circle).unwrap_or(&nothing);
        let quota = self.quotas.get(circle);
        let frac = |held: u64, denom: u64| {
            if denom > 0 {
                held as f64 / denom as f64
            } else if held > 0 {
                f64::MAX
            } else {
                0.0
            }
        };
        let mut share: f64 = 0.0;
        for (model, milli) in &used.gpus {
            let by_quota = quota.and_then(|q| {
                q.gpus
                    .iter()
                    .find(|(k, _)| model.contains(k.as_str()))
                    .map(|(k, c)| (used.gpus_matching(k), u64::from(*c) * 1000))
            });
            let (held, denom) =
                by_quota.unwrap_or((*milli, self.capacity.gpus.get(model).copied().unwrap_or(0)));
            share = share.max(frac(held, denom));
        }
        let pick = |q: Option<u64>, cap: u64| q.unwrap_or(cap);
        share = share.max(frac(
            used.gpu_memory_mib,
            pick(
                quota.and_then(|q| q.gpu_memory_mib),
                self.capacity.gpu_memory_mib,
            ),
        ));
        share = share.max(frac(
            used.cpu_millis,
            pick(quota.and_then(|q| q.cpu_millis), self.capacity.cpu_millis),
        ));
        share.max(frac(
            used.memory_mib,
            pick(quota.and_then(|q| q.memory_mib), self.capacity.memory_mib),
        ))
    }

    /// What of `circle`'s holding is borrowed.
    pub fn borrowed_by(&self, circle: &str) -> Amounts {
        let mut out = Amounts::default();
        for id in &self.borrowed {
            if let Some(c) = self.live.get(id).filter(|c| c.circle == circle) {
                out.add(&c.amounts);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::testkit::*;

    fn gpu_alloc(id: &str, job: &str, node: &str, gpu: usize) -> Allocation {
        let uuid = format!("{node}-gpu{gpu}");
        holding(id, job, node, ("g", gpu as u32), &[&uuid])
    }

    fn quota(h100: u32) -> Quota {
        Quota {
            gpus: [("H100".to_owned(), h100)].into(),
            ..Quota::default()
        }
    }

    #[test]
    fn what_a_circle_holds_beyond_its_quota_is_borrowed_lowest_priority_first() {
        let n = node("n1", &[], 64000, 65536, &h100s(4));
        let quotas = [("a".to_owned(), quota(1)), ("b".to_owned(), quota(3))].into();
        let mut fair = Fairness::new(quotas, [&n]);
        fair.hold(&gpu_alloc("a-hi", "ja", "n1", 0), "a", 50);
        fair.hold(&gpu_alloc("a-lo", "ja", "n1", 1), "a", 10);
        fair.hold(&gpu_alloc("b-0", "jb", "n1", 2), "b", 10);
        fair.find_borrowed();
        assert!(fair.is_borrowed(&AllocId::new("a-lo")));
        assert!(!fair.is_borrowed(&AllocId::new("a-hi")));
        assert!(!fair.is_borrowed(&AllocId::new("b-0")));
        assert_eq!(fair.excess("a", &fair.used("a")), ["2 of 1 H100 GPUs"]);
        // b may reclaim a's borrowed GPU but not the one a's quota guarantees;
        // a may not preempt b, whose work is within its quota.
        assert!(fair.may_preempt("b", &AllocId::new("a-lo")));
        assert!(!fair.may_preempt("b", &AllocId::new("a-hi")));
        assert!(!fair.may_preempt("a", &AllocId::new("b-0")));
        // Shares of quota: a holds twice its one GPU, b a third of its three.
        assert!((fair.share("a") - 2.0).abs() < 1e-9);
        assert!((fair.share("b") - 1.0 / 3.0).abs() < 1e-9);
        let one_more = fair.amounts(
            &gpu_alloc("x", "jb", "n1", 3).resources,
            &["n1-gpu3".into()],
        );
        assert!(fair.within("b", &one_more));
        assert!(!fair.within("a", &one_more));
        fair.release(&AllocId::new("a-lo"));
        fair.find_borrowed();
        assert!(fair.excess("a", &fair.used("a")).is_empty());
    }

    #[test]
    fn without_quotas_shares_are_of_the_pool() {
        let n = node("n1", &[], 8000, 8192, &h100s(4));
        let mut fair = Fairness::new(BTreeMap::new(), [&n]);
        fair.hold(&gpu_alloc("a-0", "ja", "n1", 0), "a", 0);
        assert!(!fair.enforced());
        assert!(fair.may_preempt("b", &AllocId::new("a-0")));
        assert!((fair.share("a") - 0.25).abs() < 1e-9);
        assert_eq!(fair.share("b"), 0.0);
    }
}
