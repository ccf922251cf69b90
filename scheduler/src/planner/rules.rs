//! A group's constraints, affinities and per-instance needs, compiled once and
//! evaluated per attribute map and GPU layout.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;

use aigrid_api::{ConstraintOp, ConstraintValue, GpuRequest, MemoryMib};

use super::*;

/// A constraint or affinity rule, ready to evaluate.
#[derive(Debug)]
pub(super) struct Rule {
    pub(super) attribute: String,
    pub(super) op: ConstraintOp,
    pub(super) values: Vec<String>,
    pub(super) regex: Option<regex::Regex>,
    pub(super) number: Option<f64>,
}

impl Rule {
    pub(super) fn new(attribute: &str, op: ConstraintOp, value: &ConstraintValue) -> Self {
        let values = match value {
            ConstraintValue::One(v) => vec![v.clone()],
            ConstraintValue::Many(vs) => vs.clone(),
        };
        let single = values.first().map(String::as_str).unwrap_or_default();
        Self {
            attribute: attribute.to_owned(),
            op,
            // Specs are validated on submission; a pattern that does not compile
            // matches nothing rather than everything.
            regex: (op == ConstraintOp::Regex)
                .then(|| {
                    regex::RegexBuilder::new(single)
                        .size_limit(aigrid_api::spec::MAX_REGEX_BYTES)
                        .build()
                        .ok()
                })
                .flatten(),
            number: single.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
            values,
        }
    }

    #[cfg(test)]
    pub(super) fn matches(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.matches_value(attributes.get(&self.attribute).map(String::as_str))
    }

    /// Whether a node whose value of the rule's attribute is `actual` (`None`:
    /// it lacks the attribute) passes.
    fn matches_value(&self, actual: Option<&str>) -> bool {
        let Some(actual) = actual else {
            return matches!(self.op, ConstraintOp::Ne | ConstraintOp::NotIn);
        };
        let number = || actual.trim().parse::<f64>().ok();
        match self.op {
            ConstraintOp::Eq => self.values.iter().any(|v| v == actual),
            ConstraintOp::Ne => self.values.iter().all(|v| v != actual),
            ConstraintOp::In => self.values.iter().any(|v| v == actual),
            ConstraintOp::NotIn => self.values.iter().all(|v| v != actual),
            ConstraintOp::Regex => self.regex.as_ref().is_some_and(|r| r.is_match(actual)),
            ConstraintOp::Ge => matches!((number(), self.number), (Some(a), Some(b)) if a >= b),
            ConstraintOp::Le => matches!((number(), self.number), (Some(a), Some(b)) if a <= b),
        }
    }

    /// Per attribute map of the snapshot: whether it passes. The rule is
    /// evaluated once per value of its attribute, not once per node.
    pub(super) fn over(&self, shapes: &Shapes) -> Vec<bool> {
        let attribute = shapes.names.get(&self.attribute).copied();
        let absent = self.matches_value(None);
        let by_value: Vec<bool> = attribute.map_or_else(Vec::new, |a| {
            shapes.values[a]
                .iter()
                .map(|v| self.matches_value(Some(v)))
                .collect()
        });
        (0..shapes.attributes.len())
            .map(|set| {
                attribute
                    .and_then(|a| shapes.value(set, a))
                    .map_or(absent, |v| by_value[v])
            })
            .collect()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            ConstraintOp::In | ConstraintOp::NotIn => write!(
                f,
                "{} {} [{}]",
                self.attribute,
                self.op,
                self.values.join(", ")
            ),
            _ => write!(
                f,
                "{} {} {}",
                self.attribute,
                self.op,
                self.values.first().map(String::as_str).unwrap_or_default()
            ),
        }
    }
}

/// What one instance of the group asks for, flattened.
#[derive(Debug)]
pub(super) struct Need {
    pub(super) cpu: u64,
    pub(super) memory: u64,
    pub(super) gpus: Option<GpuNeed>,
    /// Whether an instance listens, taking one of its node's ports.
    pub(super) listens: bool,
}

#[derive(Debug)]
pub(super) struct GpuNeed {
    pub(super) count: usize,
    pub(super) model: Option<String>,
    min_memory: u64,
    pub(super) slice: Option<u64>,
    pub(super) same_interconnect: bool,
}

impl GpuNeed {
    pub(super) fn new(request: &GpuRequest) -> Self {
        Self {
            count: usize::try_from(request.count).unwrap_or(usize::MAX),
            model: request.model.clone(),
            min_memory: request.min_memory_mib.map_or(0, MemoryMib::get),
            slice: request.memory_slice_mib.map(MemoryMib::get),
            same_interconnect: request.same_interconnect,
        }
    }

    /// Per GPU layout of the snapshot: its healthy GPUs of the right model and
    /// size, free or not, as bits. A model is matched once, not once per GPU.
    pub(super) fn suits(&self, shapes: &Shapes) -> Vec<Vec<u64>> {
        let models: Vec<bool> = shapes
            .models
            .iter()
            .map(|model| self.model.as_deref().is_none_or(|m| model.contains(m)))
            .collect();
        shapes
            .layouts
            .iter()
            .map(|layout| {
                let mut bits = vec![0; layout.gpus.len().div_ceil(BITS)];
                for (g, gpu) in layout.gpus.iter().enumerate() {
                    let suits = gpu.healthy
                        && gpu.memory >= self.min_memory
                        && self.slice.is_none_or(|s| gpu.memory >= s)
                        && models[gpu.model];
                    set_bit(&mut bits, g, suits);
                }
                bits
            })
            .collect()
    }

    pub(super) fn describe(&self) -> String {
        let model = self.model.as_deref().unwrap_or("GPU");
        let min = if self.min_memory > 0 {
            format!(" ≥ {} MiB", self.min_memory)
        } else {
            String::new()
        };
        match self.slice {
            Some(slice) => format!("a {model}{min} with {slice} MiB free to share"),
            None if self.same_interconnect => {
                format!("{} free {model}{min} in one interconnect group", self.count)
            }
            None => format!("{} free {model}{min}", self.count),
        }
    }

    /// Whether an instance would get GPUs on a node with GPUs `layout`, of which
    /// `suits` suit: [`GpuNeed::choose`] would answer, without choosing.
    pub(super) fn fits(&self, layout: &Layout, suits: &[u64], used: NodeUse<'_>) -> bool {
        if let Some(slice) = self.slice {
            let (unheld, sliced) = (used.unheld(), used.sliced());
            return (0..layout.gpus.len()).any(|g| {
                bit(unheld, g)
                    && bit(suits, g)
                    && layout.gpus[g]
                        .memory
                        .checked_sub(sliced[g] + slice)
                        .is_some()
            });
        }
        self.fits_whole(layout, suits, used.free())
    }

    /// Whether an instance would get GPUs on a node with GPUs `layout` were
    /// nothing taken there.
    pub(super) fn fits_empty(&self, layout: &Layout, suits: &[u64]) -> bool {
        match self.slice {
            // A suitable GPU has room for the slice.
            Some(_) => suits.iter().any(|&s| s != 0),
            None => self.fits_whole(layout, suits, suits),
        }
    }

    /// Whether whole GPUs would be found for an instance on a node with GPUs
    /// `layout`, of which `suits` suit and `free` are free.
    fn fits_whole(&self, layout: &Layout, suits: &[u64], free: &[u64]) -> bool {
        if common(free, suits) < self.count {
            return false;
        }
        // One domain that holds the whole instance, if it must be one.
        !self.same_interconnect
            || layout.domains.iter().any(|domain| {
                let n: usize = domain
                    .iter()
                    .zip(free)
                    .zip(suits)
                    .map(|((d, f), s)| (d & f & s).count_ones() as usize)
                    .sum();
                n > 0 && n >= self.count
            })
    }

    /// The GPUs (positions on the node) an instance would get, best first.
    pub(super) fn choose(
        &self,
        layout: &Layout,
        suits: &[u64],
        used: NodeUse<'_>,
    ) -> Option<Vec<usize>> {
        if let Some(slice) = self.slice {
            // Best fit: the suitable shared GPU left with the least memory.
            let (unheld, sliced) = (used.unheld(), used.sliced());
            return (0..layout.gpus.len())
                .filter(|&g| bit(unheld, g) && bit(suits, g))
                .filter_map(|g| {
                    let left = layout.gpus[g].memory.checked_sub(sliced[g] + slice)?;
                    Some((left, g))
                })
                .min()
                .map(|(_, g)| vec![g]);
        }
        let free: Vec<usize> = (0..layout.gpus.len())
            .filter(|&g| bit(used.free(), g) && bit(suits, g))
            .collect();
        if free.len() < self.count {
            return None;
        }
        // Group free GPUs by interconnect domain; a GPU without one stands alone.
        let mut domains: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &g in &free {
            domains.entry(layout.gpus[g].domain).or_default().push(g);
        }
        // The smallest domain that holds the whole instance, so large domains stay
        // free for large instances.
        let fits = domains
            .values()
            .filter(|gs| gs.len() >= self.count)
            .min_by_key(|gs| gs.len());
        if let Some(gs) = fits {
            return Some(gs[..self.count].to_vec());
        }
        if self.same_interconnect {
            return None;
        }
        // Otherwise as few domains as possible: largest first.
        let mut ordered: Vec<&Vec<usize>> = domains.values().collect();
        ordered.sort_by_key(|gs| Reverse(gs.len()));
        let mut chosen: Vec<usize> = ordered.into_iter().flatten().copied().collect();
        chosen.truncate(self.count);
        chosen.sort_unstable();
        Some(chosen)
    }
}

/// The first capacity check a node fails for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shortfall {
    Cpu,
    Memory,
    Gpus,
    Ports,
}
