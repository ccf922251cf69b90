//! The seeded workload: a cluster of 8-GPU nodes and a stream of jobs.
//!
//! Both are built as the wire carries them (JSON decoded into
//! [`NodeRegistration`] and validated [`JobSpec`]), so a run through real servers
//! can register and submit exactly what the planner alone was given, and fields
//! the API gains with defaults need no change here.
//!
//! The cluster mixes H100 nodes (one NVSwitch domain), A100 nodes (NVLink in
//! fours or in pairs) and L4 nodes (PCIe only); every node has `country`, `region`
//! and `site` attributes, sites being spread over a dozen European countries. A
//! few GPUs are unhealthy. Jobs ask for 1 to 100 instances of 1, 2, 4 or 8 GPUs of
//! a model or a minimum memory, often limited to some countries or one region and
//! usually spread over `site`.

use aigrid_api::{JobSpec, NodeRegistration};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Countries sites are in, each with its region.
const COUNTRIES: [(&str, &str); 12] = [
    ("BE", "eu-west"),
    ("NL", "eu-west"),
    ("LU", "eu-west"),
    ("FR", "eu-west"),
    ("DE", "eu-central"),
    ("AT", "eu-central"),
    ("CH", "eu-central"),
    ("PL", "eu-central"),
    ("DK", "eu-north"),
    ("SE", "eu-north"),
    ("IT", "eu-south"),
    ("ES", "eu-south"),
];

/// Regions, for `region = ...` constraints.
const REGIONS: [&str; 4] = ["eu-west", "eu-central", "eu-north", "eu-south"];

/// GPUs per node.
pub const GPUS_PER_NODE: usize = 8;

/// Percent of GPUs that report themselves unhealthy.
const UNHEALTHY_GPU_PCT: f64 = 0.5;

/// One kind of node: its share of the cluster and what it offers.
struct NodeKind {
    percent: u32,
    model: &'static str,
    gpu_memory_mib: u64,
    /// GPUs per interconnect domain; `None` for PCIe only.
    domain: Option<usize>,
    cpu_millis: u64,
    memory_mib: u64,
}

const NODE_KINDS: [NodeKind; 4] = [
    NodeKind {
        percent: 30,
        model: "NVIDIA H100 80GB HBM3",
        gpu_memory_mib: 81_559,
        domain: Some(8),
        cpu_millis: 224_000,
        memory_mib: 2_097_152,
    },
    NodeKind {
        percent: 20,
        model: "NVIDIA A100-SXM4-40GB",
        gpu_memory_mib: 40_960,
        domain: Some(4),
        cpu_millis: 128_000,
        memory_mib: 1_048_576,
    },
    NodeKind {
        percent: 20,
        model: "NVIDIA A100-PCIE-40GB",
        gpu_memory_mib: 40_960,
        domain: Some(2),
        cpu_millis: 128_000,
        memory_mib: 524_288,
    },
    NodeKind {
        percent: 30,
        model: "NVIDIA L4",
        gpu_memory_mib: 23_034,
        domain: None,
        cpu_millis: 64_000,
        memory_mib: 393_216,
    },
];

/// What shapes the workload; shared by every subcommand so they can be compared.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seed of the cluster and the job stream: the same flags give the same
    /// workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Simulated nodes, 8 GPUs each.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: usize,

    /// Sites the nodes are spread over; site i is in country i mod 12.
    #[arg(long, default_value_t = 100)]
    pub sites: usize,

    /// Jobs in the stream. By default, as many as ask for `--fill` times the
    /// cluster's GPUs in all.
    #[arg(long)]
    pub jobs: Option<usize>,

    /// Without `--jobs`: the GPUs the stream asks for, as a multiple of the
    /// cluster's GPUs.
    #[arg(long, default_value_t = 1.0)]
    pub fill: f64,
}

/// A cluster and the jobs to place on it, in submission order.
#[derive(Debug)]
pub struct Workload {
    /// The nodes, ids in ascending order (`node-00000`, ...).
    pub nodes: Vec<NodeRegistration>,
    /// The jobs, one group each.
    pub jobs: Vec<JobSpec>,
}

impl Workload {
    /// Builds the workload the arguments describe.
    pub fn generate(args: &Args) -> Result<Self> {
        anyhow::ensure!(args.nodes > 0, "--nodes must be at least 1");
        anyhow::ensure!(args.sites > 0, "--sites must be at least 1");
        anyhow::ensure!(
            args.fill.is_finite() && args.fill > 0.0,
            "--fill must be positive"
        );
        let mut rng = StdRng::seed_from_u64(args.seed);
        let width = args.nodes.saturating_sub(1).to_string().len().max(5);
        let nodes = (0..args.nodes)
            .map(|i| {
                let node = node(&mut rng, &format!("node-{i:0width$}"), args.sites);
                serde_json::from_value(node).context("a generated node registration")
            })
            .collect::<Result<Vec<NodeRegistration>>>()?;
        let wanted_gpus = (nodes.len() * GPUS_PER_NODE) as f64 * args.fill;
        let mut jobs = Vec::new();
        let mut asked = 0u64;
        loop {
            match args.jobs {
                Some(n) if jobs.len() >= n => break,
                None if asked as f64 >= wanted_gpus => break,
                _ => {}
            }
            let spec: JobSpec = serde_json::from_value(job(&mut rng, jobs.len()))
                .context("a generated job spec")?;
            spec.validate()
                .with_context(|| format!("generated job {} is invalid", spec.name))?;
            asked += gpus_asked(&spec);
            jobs.push(spec);
        }
        Ok(Self { nodes, jobs })
    }

    /// Instances the stream asks for.
    pub fn instances(&self) -> u64 {
        self.jobs.iter().map(JobSpec::instance_count).sum()
    }

    /// GPUs the stream asks for.
    pub fn gpus_asked(&self) -> u64 {
        self.jobs.iter().map(gpus_asked).sum()
    }

    /// Nodes of each GPU model, for the report's header.
    pub fn node_mix(&self) -> Vec<(&'static str, usize)> {
        NODE_KINDS
            .iter()
            .map(|kind| {
                let count = self
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.resources
                            .gpus
                            .first()
                            .is_some_and(|g| g.model == kind.model)
                    })
                    .count();
                (kind.model, count)
            })
            .collect()
    }
}

/// GPUs a job asks for over all its instances.
fn gpus_asked(spec: &JobSpec) -> u64 {
    spec.groups
        .iter()
        .map(|g| u64::from(g.count) * u64::from(g.resources.gpus.as_ref().map_or(0, |r| r.count)))
        .sum()
}

/// The site `index` and its country and region.
fn site(index: usize) -> (String, &'static str, &'static str) {
    let (country, region) = COUNTRIES[index % COUNTRIES.len()];
    let name = format!(
        "{}-{:02}",
        country.to_lowercase(),
        index / COUNTRIES.len() + 1
    );
    (name, country, region)
}

/// One node registration: a kind by share, a site uniformly at random.
fn node(rng: &mut StdRng, id: &str, sites: usize) -> Value {
    let mut roll = rng.random_range(0..100);
    let kind = NODE_KINDS
        .iter()
        .find(|k| {
            let hit = roll < k.percent;
            roll = roll.saturating_sub(k.percent);
            hit
        })
        .unwrap_or(&NODE_KINDS[0]);
    let (site, country, region) = site(rng.random_range(0..sites));
    let gpus: Vec<Value> = (0..GPUS_PER_NODE)
        .map(|i| {
            json!({
                "index": i,
                "uuid": format!("{id}-gpu{i}"),
                "vendor": "nvidia",
                "model": kind.model,
                "memory_mib": kind.gpu_memory_mib,
                "healthy": !rng.random_bool(UNHEALTHY_GPU_PCT / 100.0),
                "interconnect_group": kind.domain.map(|size| format!("nvlink{}", i / size)),
            })
        })
        .collect();
    json!({
        "id": id,
        "name": id,
        "attributes": {"country": country, "region": region, "site": site},
        "resources": {
            "cpu_millis": kind.cpu_millis,
            "memory_mib": kind.memory_mib,
            "disk_mib": 4_000_000,
            "gpus": gpus,
        },
    })
}

/// One job spec: one group of 1-100 instances asking for whole GPUs.
fn job(rng: &mut StdRng, index: usize) -> Value {
    let count: u32 = rng.random_range(1..=100);
    let gpus: u64 = match rng.random_range(0..100) {
        0..35 => 1,
        35..60 => 2,
        60..80 => 4,
        _ => 8,
    };
    let gpu = match rng.random_range(0..100) {
        0..30 => json!({"count": gpus, "model": "H100"}),
        30..60 => json!({"count": gpus, "model": "A100"}),
        60..80 => json!({"count": gpus, "model": "L4"}),
        _ => json!({"count": gpus, "min_memory_mib": 40_000}),
    };
    let cpu_per_gpu: u64 = *[4000, 6000, 8000].choose(rng).unwrap_or(&4000);
    let memory_per_gpu: u64 = *[16_384, 32_768, 49_152].choose(rng).unwrap_or(&16_384);
    let constraints = match rng.random_range(0..100) {
        0..45 => {
            let how_many = rng.random_range(2..=4);
            let countries: Vec<&str> = COUNTRIES
                .choose_multiple(rng, how_many)
                .map(|(c, _)| *c)
                .collect();
            json!([{"attribute": "country", "op": "in", "value": countries}])
        }
        45..60 => {
            let region = REGIONS.choose(rng).unwrap_or(&REGIONS[0]);
            json!([{"attribute": "region", "op": "=", "value": region}])
        }
        _ => json!([]),
    };
    let spread = if count > 1 && rng.random_bool(0.7) {
        json!([{"attribute": "site"}])
    } else {
        json!([])
    };
    json!({
        "name": format!("job-{index:05}"),
        "groups": [{
            "name": "worker",
            "count": count,
            "resources": {
                "cpu_millis": cpu_per_gpu * gpus,
                "memory_mib": memory_per_gpu * gpus,
                "gpus": gpu,
            },
            "constraints": constraints,
            "spread": spread,
            "task": {"driver": "exec", "command": "/bin/true"},
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(seed: u64, jobs: Option<usize>) -> Args {
        Args {
            seed,
            nodes: 200,
            sites: 10,
            jobs,
            fill: 1.0,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let one = Workload::generate(&args(7, None)).unwrap();
        let two = Workload::generate(&args(7, None)).unwrap();
        assert_eq!(one.nodes, two.nodes);
        assert_eq!(one.jobs, two.jobs);
        let other = Workload::generate(&args(8, None)).unwrap();
        assert_ne!(one.jobs, other.jobs);
    }

    #[test]
    fn the_stream_asks_for_the_cluster_once_over_unless_counted() {
        let w = Workload::generate(&args(1, None)).unwrap();
        let cluster = (w.nodes.len() * GPUS_PER_NODE) as u64;
        assert!(w.gpus_asked() >= cluster);
        let last = w.jobs.last().map_or(0, gpus_asked);
        assert!(w.gpus_asked() - last < cluster);
        assert_eq!(Workload::generate(&args(1, Some(3))).unwrap().jobs.len(), 3);
        assert_eq!(w.node_mix().iter().map(|(_, n)| n).sum::<usize>(), 200);
    }
}
