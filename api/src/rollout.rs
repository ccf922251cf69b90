//! Fleet rollouts: a model sent to the nodes chosen by their attributes, in waves,
//! each node staging it (every chunk fetched and checked against the signed
//! manifest) before it activates it, then attesting, signed with its node key,
//! which digest it runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::ids::NodeId;
use crate::spec::Span;
use crate::units::Timestamp;

/// Most nodes one rollout may reach.
pub const MAX_ROLLOUT_NODES: usize = 100_000;
/// Most waves one rollout may have.
pub const MAX_WAVES: usize = 64;

/// How many nodes a wave takes, as `--waves 1,10,100,all` (each wave that many
/// more nodes; `all` takes the rest) or `--waves exp` (1, 2, 4, ... doubling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waves {
    /// Fixed sizes; `None` is `all`.
    Sizes(Vec<Option<u32>>),
    /// Doubling from one node.
    Exponential,
}

impl std::str::FromStr for Waves {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text == "exp" {
            return Ok(Waves::Exponential);
        }
        let mut sizes = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part == "all" {
                sizes.push(None);
                continue;
            }
            let n: u32 = part.parse().map_err(|_| {
                format!("`{part}` is not a wave size: a count of nodes, `all`, or `exp` alone")
            })?;
            if n == 0 {
                return Err("a wave takes at least one node".into());
            }
            sizes.push(Some(n));
        }
        if sizes.len() > MAX_WAVES {
            return Err(format!("at most {MAX_WAVES} waves"));
        }
        if sizes[..sizes.len() - 1].iter().any(Option::is_none) {
            return Err("`all` can only be the last wave".into());
        }
        Ok(Waves::Sizes(sizes))
    }
}

impl std::fmt::Display for Waves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waves::Exponential => f.write_str("exp"),
            Waves::Sizes(sizes) => {
                let parts: Vec<String> = sizes
                    .iter()
                    .map(|s| s.map_or("all".to_owned(), |n| n.to_string()))
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl Waves {
    /// The waves `nodes` nodes are cut into, in order; nodes past the last fixed
    /// wave form one more.
    pub fn cut(&self, nodes: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut left = nodes;
        let mut take = |n: usize| {
            let n = n.min(left);
            left -= n;
            n
        };
        match self {
            Waves::Exponential => {
                let mut size = 1usize;
                loop {
                    let n = take(size);
                    if n == 0 {
                        break;
                    }
                    out.push(n);
                    size = size.saturating_mul(2);
                }
            }
            Waves::Sizes(sizes) => {
                let asked = sizes.iter().map(|s| s.map_or(usize::MAX, |n| n as usize));
                for size in asked.chain([usize::MAX]) {
                    let n = take(size);
                    if n > 0 {
                        out.push(n);
                    }
                }
            }
        }
        out
    }
}

/// When a rollout stops: after this many failed or timed-out nodes, or this
/// percent of the nodes it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortAfter {
    /// A count of nodes.
    Count(u32),
    /// A percent of the rollout's nodes.
    Percent(u8),
}

impl std::str::FromStr for AbortAfter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Some(p) = text.strip_suffix('%') {
            let p: u8 = p
                .trim()
                .parse()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| format!("`{text}`: a percent lies between 1% and 100%"))?;
            return Ok(AbortAfter::Percent(p));
        }
        text.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .map(AbortAfter::Count)
            .ok_or_else(|| format!("`{text}` is not a count of nodes (at least 1) or a percent"))
    }
}

impl std::fmt::Display for AbortAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortAfter::Count(n) => write!(f, "{n}"),
            AbortAfter::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl AbortAfter {
    /// The failed or timed-out nodes, of `total`, that stop the rollout.
    pub fn limit(self, total: usize) -> usize {
        match self {
            AbortAfter::Count(n) => n as usize,
            AbortAfter::Percent(p) => (total * usize::from(p)).div_ceil(100).max(1),
        }
    }
}

macro_rules! text_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
text_serde!(Waves);
text_serde!(AbortAfter);

/// `POST /api/v1/rollouts`: send a registered model to the nodes whose attributes
/// match every `select` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// The model's digest.
    pub model: String,
    /// Attributes a node must have, all of them (`site`, `country`, tags).
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    /// The waves: `1,10,100,all` or `exp`.
    #[schema(value_type = String, example = "1,10,100,all")]
    pub waves: Waves,
    /// Stop after this many failed or timed-out nodes (`3`) or this share (`10%`);
    /// absent, the first failure stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10%")]
    pub abort_after: Option<AbortAfter>,
    /// How long a node may take to stage and activate.
    #[serde(default = "default_node_timeout")]
    #[schema(value_type = String, example = "10m")]
    pub node_timeout: Span,
}

fn default_node_timeout() -> Span {
    Span::from_secs(600)
}

impl CreateRollout {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.model.len() != 64 || !self.model.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ValidationError::new(
                "model",
                "must be a model's full digest",
            ));
        }
        if self.select.len() > 32 {
            return Err(ValidationError::new("select", "at most 32 attributes"));
        }
        if self.node_timeout.as_millis() < 1000 {
            return Err(ValidationError::new("node_timeout", "must be at least 1s"));
        }
        Ok(())
    }
}

wire_enum!(
    /// Where a fleet rollout stands.
    RolloutState {
        /// Waves under way.
        Running => "running",
        /// Every node attested the model.
        Succeeded => "succeeded",
        /// Too many nodes failed or timed out: no further node is started.
        Aborted => "aborted",
    }
);

wire_enum!(
    /// Where one node of a fleet rollout stands.
    NodeStageState {
        /// Its wave has not started.
        Waiting => "waiting",
        /// Fetching and checking the model's chunks.
        Staging => "staging",
        /// Staged, activated and attested.
        Active => "active",
        /// Staging failed, or it attested another digest.
        Failed => "failed",
        /// Not active within the node timeout.
        TimedOut => "timed_out",
        /// Never started: the rollout stopped first.
        Skipped => "skipped",
    }
);

/// One node of a fleet rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStage {
    /// The node.
    pub node: NodeId,
    /// Where it stands.
    pub state: NodeStageState,
    /// When its wave started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it finished (active, failed or timed out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The digest it attests it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attested: Option<String>,
    /// Its attestation: an ed25519 signature by its node key over
    /// [`attestation_message`], hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One wave of a fleet rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Wave {
    /// Its position, from 0.
    pub index: u32,
    /// Its nodes.
    pub nodes: Vec<NodeStage>,
}

/// A fleet rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FleetRollout {
    /// Its id.
    pub id: String,
    /// The model's digest.
    pub model: String,
    /// The model's name.
    pub name: String,
    /// The attributes that chose its nodes.
    pub select: BTreeMap<String, String>,
    /// As asked.
    #[schema(value_type = String)]
    pub waves_asked: Waves,
    /// As asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub abort_after: Option<AbortAfter>,
    /// As asked.
    #[schema(value_type = String)]
    pub node_timeout: Span,
    /// Where it stands.
    pub state: RolloutState,
    /// Why, in words.
    pub description: String,
    /// The waves, with their nodes.
    pub waves: Vec<Wave>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl FleetRollout {
    /// How many of its nodes are in `state`.
    pub fn count(&self, state: NodeStageState) -> usize {
        self.waves
            .iter()
            .flat_map(|w| &w.nodes)
            .filter(|n| n.state == state)
            .count()
    }
}

/// A model a node's agent must stage and activate for a fleet rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelAssignment {
    /// The rollout.
    pub rollout: String,
    /// The model's digest.
    pub digest: String,
    /// The model's name: what the node activates it as.
    pub name: String,
    /// Nodes to fetch its chunks from before the store: those that attest the
    /// model already (earlier waves) and those staging it beside this one (its
    /// own wave), whose holdings the node asks them for as they grow; their own
    /// site's first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<ModelPeer>,
    /// This node's share of the chunks no peer holds: the ones it fetches from
    /// the store, while the other nodes staging beside it fetch theirs, so the
    /// store sends each chunk about once. None: any chunk no peer holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_share: Option<OriginShare>,
}

/// A node's part of the chunks a wave fetches from the store: the chunks at
/// `index`, `index + of`, `index + 2·of`, ... of the model's chunk list (as every
/// node orders it, by digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OriginShare {
    /// This node's place among the nodes staging the model.
    pub index: u32,
    /// How many nodes are staging it.
    pub of: u32,
}

impl OriginShare {
    /// Whether the chunk at `position` (of the chunk list) is this node's to fetch
    /// from the store.
    pub fn owns(&self, position: usize) -> bool {
        self.of == 0 || position % self.of as usize == self.index as usize
    }
}

/// Where `peer` ranks among the peers named to `asker` in `rollout`: a hash of
/// the three, so each node is told its own pseudo-random set of peers and every
/// node is named to about as many others (no few nodes asked by everyone).
pub fn peer_rank(rollout: &str, asker: &str, peer: &str) -> u64 {
    // FNV-1a over the three, separated; then a SplitMix64 finish to spread it.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [rollout, asker, peer] {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// A node holding a model, as a fleet rollout's later waves are told of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelPeer {
    /// The node.
    pub node: NodeId,
    /// Its private data port (`http://10.0.0.7:7100`).
    pub url: String,
    /// Whether it is of the asking node's site.
    pub same_site: bool,
    /// Whether it holds the whole model (it attests it); false for a node still
    /// staging it, which is asked what it holds.
    #[serde(default = "whole_default")]
    pub whole: bool,
}

fn whole_default() -> bool {
    true
}

/// Most peers one model assignment names.
pub const MAX_MODEL_PEERS: usize = 16;
/// Peers holding the whole model named at least, when there are that many.
pub const MIN_WHOLE_PEERS: usize = 4;

/// Which of `candidates` to name to a staging node, given for each whether it is
/// of the node's site, whether it holds the whole model, and its
/// [`peer_rank`]: at most [`MAX_MODEL_PEERS`], own site first, at least
/// [`MIN_WHOLE_PEERS`] holding the whole model where there are, the rest by rank
/// whoever they are, so the nodes of a wave upload to each other rather than all
/// waiting on the few of earlier waves.
pub fn choose_peers<T>(mut candidates: Vec<T>, key: impl Fn(&T) -> (bool, bool, u64)) -> Vec<T> {
    candidates.sort_by_cached_key(|c| {
        let (same_site, _, rank) = key(c);
        (!same_site, rank)
    });
    let mut chosen = vec![false; candidates.len()];
    let whole = (0..candidates.len()).filter(|i| key(&candidates[*i]).1);
    for i in whole.take(MIN_WHOLE_PEERS.min(MAX_MODEL_PEERS)) {
        chosen[i] = true;
    }
    let mut left = MAX_MODEL_PEERS.saturating_sub(chosen.iter().filter(|c| **c).count());
    for c in chosen.iter_mut() {
        if left == 0 {
            break;
        }
        if !*c {
            *c = true;
            left -= 1;
        }
    }
    candidates
        .into_iter()
        .zip(chosen)
        .filter_map(|(c, keep)| keep.then_some(c))
        .collect()
}

/// What a node's agent says of a model it was asked to stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelReport {
    /// The rollout.
    pub rollout: String,
    /// The digest it runs now (active), or was asked for (failed).
    pub digest: String,
    /// `active` or `failed`; a model still staging is not reported.
    pub state: NodeStageState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `active`: the node key's signature over [`attestation_message`], hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// What a node signs to attest that it runs `digest` for `rollout`.
pub fn attestation_message(rollout: &str, node: &NodeId, digest: &str) -> Vec<u8> {
    format!("aigrid-attestation-v1\nrollout {rollout}\nnode {node}\nmodel {digest}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_node_is_named_its_site_some_whole_peers_and_the_rest_by_rank() {
        // (id, same site, whole): 30 candidates, 10 whole, two of the site.
        let candidates: Vec<(u64, bool, bool)> = (0..30)
            .map(|i| (i, i == 29 || i == 28, i % 3 == 0))
            .collect();
        let chosen = choose_peers(candidates, |c| (c.1, c.2, 1000 - c.0));
        assert_eq!(chosen.len(), MAX_MODEL_PEERS);
        assert_eq!((chosen[0].0, chosen[1].0), (29, 28), "own site first");
        let whole = chosen.iter().filter(|c| c.2).count();
        assert!(whole >= MIN_WHOLE_PEERS, "{chosen:?}");
        assert!(
            whole < MAX_MODEL_PEERS / 2,
            "not only whole peers: {chosen:?}"
        );
        // Fewer candidates than the bound: all of them.
        assert_eq!(choose_peers(vec![1, 2, 3], |_| (false, false, 0)).len(), 3);
    }

    #[test]
    fn waves_cut_the_nodes_as_asked() {
        let fixed: Waves = "1,10,100,all".parse().unwrap();
        assert_eq!(fixed.cut(1000), vec![1, 10, 100, 889]);
        assert_eq!(fixed.cut(5), vec![1, 4]);
        let no_all: Waves = "2,3".parse().unwrap();
        assert_eq!(no_all.cut(10), vec![2, 3, 5]);
        assert_eq!(Waves::Exponential.cut(10), vec![1, 2, 4, 3]);
        assert_eq!(fixed.to_string(), "1,10,100,all");
        for bad in ["0", "all,1", "ten", ""] {
            assert!(bad.parse::<Waves>().is_err(), "{bad}");
        }
    }

    #[test]
    fn abort_thresholds_are_counts_or_percents() {
        assert_eq!("3".parse::<AbortAfter>().unwrap().limit(100), 3);
        assert_eq!("10%".parse::<AbortAfter>().unwrap().limit(25), 3);
        assert_eq!("1%".parse::<AbortAfter>().unwrap().limit(5), 1);
        for bad in ["0", "0%", "101%", "x"] {
            assert!(bad.parse::<AbortAfter>().is_err(), "{bad}");
        }
    }
}
