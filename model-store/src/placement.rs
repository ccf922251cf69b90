//! Placing shards by a placement policy: which backends take a stripe's shards. The
//! policy itself ([`Policy`], its rules and their text form) is a wire type of
//! `aigrid-api`, re-exported here; this module is the algorithm over it.

use std::collections::BTreeMap;

pub use aigrid_api::placement::{Constraint, Op, Policy, PolicySyntaxError, Spread};

/// Why shards cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Fewer eligible backends than shards per stripe.
    #[error("a stripe needs {need} distinct backends but the policy `{policy}` allows {eligible} of the {total} configured")]
    TooFewBackends {
        /// Shards to place.
        need: usize,
        /// Backends the constraints allow.
        eligible: usize,
        /// Backends configured.
        total: usize,
        /// The policy.
        policy: String,
    },
    /// Enough backends, but the spread caps cannot all hold.
    #[error("the policy `{policy}` cannot place {need} shards of a stripe: its caps allow {placeable} over the {eligible} eligible backends")]
    Unsatisfiable {
        /// Shards to place.
        need: usize,
        /// Shards the caps allow.
        placeable: usize,
        /// Backends the constraints allow.
        eligible: usize,
        /// The policy.
        policy: String,
    },
}

/// The placement algorithm over a [`Policy`].
pub trait Place {
    /// Whether a backend with `attributes` may hold shards at all.
    fn allows(&self, attributes: &BTreeMap<String, String>) -> bool;

    /// Whether shards already on `chosen` (indices into `backends`) satisfy the
    /// policy: every backend allowed, distinct, every cap held.
    fn admits(&self, backends: &[&BTreeMap<String, String>], chosen: &[usize]) -> bool;

    /// Picks `need` more backends (indices into `backends`) for one stripe whose other
    /// shards already sit on `taken`: eligible, distinct, not in `taken`, and within
    /// every cap counting `taken`. Candidates are tried greedily from `start` round the
    /// list, so successive stripes spread over every backend. With several caps a
    /// greedy pick can strand a stripe that another order places, so when the pick
    /// from `start` falls short the other starting points are tried, and then a
    /// bounded search ([`PLACE_SEARCH_STEPS`]) before the policy is called
    /// unsatisfiable.
    fn place(
        &self,
        backends: &[&BTreeMap<String, String>],
        need: usize,
        taken: &[usize],
        start: usize,
    ) -> Result<Vec<usize>, PlacementError>;
}

impl Place for Policy {
    fn allows(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.constraints.iter().all(|c| {
            let found = attributes
                .get(&c.attribute)
                .is_some_and(|v| c.values.contains(v));
            match c.op {
                Op::In => found,
                Op::NotIn => !found,
            }
        }) && self
            .spread
            .iter()
            .all(|s| attributes.contains_key(&s.attribute))
    }

    fn admits(&self, backends: &[&BTreeMap<String, String>], chosen: &[usize]) -> bool {
        let distinct: std::collections::BTreeSet<&usize> = chosen.iter().collect();
        distinct.len() == chosen.len()
            && chosen.iter().all(|i| self.allows(backends[*i]))
            && self.spread.iter().all(|rule| {
                let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
                chosen.iter().all(|i| {
                    let v = backends[*i]
                        .get(&rule.attribute)
                        .map(String::as_str)
                        .unwrap_or("");
                    let n = seen.entry(v).or_default();
                    *n += 1;
                    *n <= rule.max
                })
            })
    }

    fn place(
        &self,
        backends: &[&BTreeMap<String, String>],
        need: usize,
        taken: &[usize],
        start: usize,
    ) -> Result<Vec<usize>, PlacementError> {
        let eligible: Vec<usize> = (0..backends.len())
            .filter(|i| self.allows(backends[*i]))
            .collect();
        let usable = eligible.iter().filter(|i| !taken.contains(i)).count();
        if usable < need {
            return Err(PlacementError::TooFewBackends {
                need: need + taken.len(),
                eligible: eligible.len(),
                total: backends.len(),
                policy: self.to_string(),
            });
        }
        let n = eligible.len();
        if need == 0 || n == 0 {
            return Ok(Vec::new());
        }
        let (tally, values) = Tally::new(&self.spread, backends, &eligible, taken);
        let free: Vec<bool> = eligible.iter().map(|i| !taken.contains(i)).collect();
        // Candidates (positions in `eligible`) round the list from rotation `r`.
        let order = |r: usize| -> Vec<usize> {
            (0..n)
                .map(|step| (r + step) % n)
                .filter(|at| free[*at])
                .collect()
        };
        let start = start % n;
        let answer = |picked: Vec<usize>| picked.into_iter().map(|at| eligible[at]).collect();
        let mut placeable = 0;
        for r in 0..n {
            let picked = tally.greedy(&values, &order((start + r) % n), need);
            if picked.len() == need {
                return Ok(answer(picked));
            }
            placeable = placeable.max(picked.len());
        }
        let mut search = Search {
            order: order(start),
            values: &values,
            need,
            tally,
            picked: Vec::new(),
            steps: 0,
            deepest: 0,
        };
        if search.run(0) {
            return Ok(answer(search.picked));
        }
        Err(PlacementError::Unsatisfiable {
            need: need + taken.len(),
            placeable: placeable.max(search.deepest) + taken.len(),
            eligible: n,
            policy: self.to_string(),
        })
    }
}

/// Most candidates [`Place::place`]'s search tries before it gives up: backends are
/// few (at most 256 shards a stripe), but caps on several attributes can make an
/// exhaustive search exponential, and a push or repair must answer promptly.
pub const PLACE_SEARCH_STEPS: usize = 100_000;

/// Shards per attribute value of one stripe, against the policy's caps, with values
/// numbered per rule so checking a backend is a few array lookups.
#[derive(Clone)]
struct Tally {
    /// Per rule, its cap.
    max: Vec<usize>,
    /// Per rule, per value, shards placed so far.
    count: Vec<Vec<usize>>,
}

impl Tally {
    /// The tally of the shards on `taken`, and each eligible backend's value numbers.
    fn new(
        spread: &[Spread],
        backends: &[&BTreeMap<String, String>],
        eligible: &[usize],
        taken: &[usize],
    ) -> (Tally, Vec<Vec<usize>>) {
        let mut ids: Vec<BTreeMap<&str, usize>> = vec![BTreeMap::new(); spread.len()];
        let mut value = |rule: usize, backend: usize| {
            let v = backends[backend].get(&spread[rule].attribute)?;
            let next = ids[rule].len();
            Some(*ids[rule].entry(v.as_str()).or_insert(next))
        };
        let values: Vec<Vec<usize>> = eligible
            .iter()
            .map(|b| {
                (0..spread.len())
                    .map(|r| value(r, *b).expect("an eligible backend has every spread attribute"))
                    .collect()
            })
            .collect();
        // A taken backend without the attribute counts against no value, as before.
        let taken: Vec<Vec<Option<usize>>> = taken
            .iter()
            .map(|b| (0..spread.len()).map(|r| value(r, *b)).collect())
            .collect();
        let mut count: Vec<Vec<usize>> = ids.iter().map(|m| vec![0; m.len()]).collect();
        for on in taken {
            for (r, v) in on.into_iter().enumerate() {
                if let Some(v) = v {
                    count[r][v] += 1;
                }
            }
        }
        let max = spread.iter().map(|s| s.max).collect();
        (Tally { max, count }, values)
    }

    fn fits(&self, values: &[usize]) -> bool {
        values
            .iter()
            .zip(&self.max)
            .zip(&self.count)
            .all(|((v, max), count)| count[*v] < *max)
    }

    fn add(&mut self, values: &[usize]) {
        for (v, count) in values.iter().zip(&mut self.count) {
            count[*v] += 1;
        }
    }

    fn sub(&mut self, values: &[usize]) {
        for (v, count) in values.iter().zip(&mut self.count) {
            count[*v] -= 1;
        }
    }

    /// Takes each candidate of `order` in turn that fits, up to `need` of them.
    fn greedy(&self, values: &[Vec<usize>], order: &[usize], need: usize) -> Vec<usize> {
        let mut tally = self.clone();
        let mut picked = Vec::new();
        for &at in order {
            if picked.len() == need {
                break;
            }
            if tally.fits(&values[at]) {
                tally.add(&values[at]);
                picked.push(at);
            }
        }
        picked
    }
}

/// A depth-first search for `need` candidates that fit together, trying them in
/// `order`, for at most [`PLACE_SEARCH_STEPS`] steps.
struct Search<'a> {
    order: Vec<usize>,
    values: &'a [Vec<usize>],
    need: usize,
    tally: Tally,
    picked: Vec<usize>,
    steps: usize,
    /// The most candidates that fitted together.
    deepest: usize,
}

impl Search<'_> {
    /// Whether `picked` can be completed from `order[from..]`; on success `picked`
    /// holds the placement.
    fn run(&mut self, from: usize) -> bool {
        self.deepest = self.deepest.max(self.picked.len());
        if self.picked.len() == self.need {
            return true;
        }
        for i in from..self.order.len() {
            if self.picked.len() + (self.order.len() - i) < self.need
                || self.steps >= PLACE_SEARCH_STEPS
            {
                return false;
            }
            self.steps += 1;
            let at = self.order[i];
            if self.tally.fits(&self.values[at]) {
                self.tally.add(&self.values[at]);
                self.picked.push(at);
                if self.run(i + 1) {
                    return true;
                }
                self.picked.pop();
                self.tally.sub(&self.values[at]);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(site: &str, country: &str) -> BTreeMap<String, String> {
        [("site", site), ("country", country)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn placement_honours_constraints_and_caps_and_rotates() {
        let backends = [
            attrs("a", "BE"),
            attrs("a", "BE"),
            attrs("b", "NL"),
            attrs("c", "NL"),
            attrs("d", "FR"),
            attrs("", "NL"),
        ];
        let refs: Vec<&BTreeMap<String, String>> = backends.iter().collect();
        let p = Policy::parse(&["country in BE,NL; max 1 per site"]).unwrap();
        let picked = p.place(&refs, 3, &[], 0).unwrap();
        assert_eq!(picked, vec![0, 2, 3]);
        let picked = p.place(&refs, 3, &[], 1).unwrap();
        assert_eq!(picked, vec![1, 2, 3]);
        // A fourth shard has no site left to go to.
        assert!(matches!(
            p.place(&refs, 4, &[], 0),
            Err(PlacementError::Unsatisfiable {
                placeable: 3,
                eligible: 4,
                ..
            })
        ));
        assert!(matches!(
            p.place(&refs, 5, &[], 0),
            Err(PlacementError::TooFewBackends {
                eligible: 4,
                total: 6,
                ..
            })
        ));
        assert!(p.admits(&refs, &[0, 2, 3]));
        assert!(!p.admits(&refs, &[0, 1, 2]), "two shards on site a");
        assert!(!p.admits(&refs, &[0, 4]), "FR is not allowed");
        // Replacing one shard of a stripe on sites a and b: only site c is left.
        assert_eq!(p.place(&refs, 1, &[0, 2], 0).unwrap(), vec![3]);
        // The empty policy takes every backend once.
        let any = Policy::default();
        let mut all = any.place(&refs, 6, &[], 4).unwrap();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn two_caps_place_what_a_single_greedy_pass_would_strand() {
        let p = Policy::parse(&["max 1 per site; max 2 per country"]).unwrap();
        // From B, a greedy pass takes B and C, then D (a third BE) and A (site 1
        // again) no longer fit; starting elsewhere places all three.
        let backends = [
            attrs("1", "NL"),
            attrs("1", "BE"),
            attrs("2", "BE"),
            attrs("3", "BE"),
        ];
        let refs: Vec<&BTreeMap<String, String>> = backends.iter().collect();
        assert_eq!(p.place(&refs, 3, &[], 0).unwrap(), vec![0, 2, 3]);
        for start in 0..8 {
            let picked = p.place(&refs, 3, &[], start).unwrap();
            assert!(p.admits(&refs, &picked), "start {start}: {picked:?}");
        }
        // Here no starting point works greedily; only {0, 2, 3, 5} fits.
        let backends = [
            attrs("c", "Z"),
            attrs("b", "X"),
            attrs("b", "Y"),
            attrs("d", "X"),
            attrs("c", "X"),
            attrs("a", "X"),
        ];
        let refs: Vec<&BTreeMap<String, String>> = backends.iter().collect();
        for start in 0..6 {
            let mut picked = p.place(&refs, 4, &[], start).unwrap();
            picked.sort_unstable();
            assert_eq!(picked, vec![0, 2, 3, 5], "start {start}");
        }
        // Counting shards already placed: 0 and 2 taken leave only 3 and 5.
        let mut rest = p.place(&refs, 2, &[0, 2], 1).unwrap();
        rest.sort_unstable();
        assert_eq!(rest, vec![3, 5]);
    }

    #[test]
    fn an_unsatisfiable_search_stops_and_reports_the_most_placeable() {
        // 200 backends on distinct sites in 50 countries: caps allow 100 shards, and
        // proving 101 impossible exhaustively would never end.
        let backends: Vec<BTreeMap<String, String>> = (0..200)
            .map(|i| attrs(&format!("s{i}"), &format!("c{}", i % 50)))
            .collect();
        let refs: Vec<&BTreeMap<String, String>> = backends.iter().collect();
        let p = Policy::parse(&["max 1 per site; max 2 per country"]).unwrap();
        assert_eq!(p.place(&refs, 100, &[], 7).unwrap().len(), 100);
        assert!(matches!(
            p.place(&refs, 101, &[], 7),
            Err(PlacementError::Unsatisfiable {
                need: 101,
                placeable: 100,
                eligible: 200,
                ..
            })
        ));
    }
}
