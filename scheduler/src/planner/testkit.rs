//! Fixtures and the invariant checker shared by the planner's, preemption's
//! and defragmentation's tests.

use std::collections::{HashMap, HashSet};

use aigrid_api::{
    AllocId, AllocState, Allocation, Constraint, ConstraintOp, ConstraintValue, DesiredState,
    ExecTask, GpuDevice, GpuRequest, JobId, MemoryMib, MilliCpu, Node, NodeId, NodeResources,
    NodeStatus, Resources, Spread, TaskGroup, TaskSpec, Timestamp,
};
use proptest::prelude::*;

use super::*;

/// A GPU as tests describe it: model, memory in GiB, healthy, interconnect group.
pub(crate) type Gpu = (&'static str, u64, bool, Option<&'static str>);

pub(crate) fn node(id: &str, attrs: &[(&str, &str)], cpu: u64, memory: u64, gpus: &[Gpu]) -> Node {
    Node {
        id: NodeId::new(id),
        name: id.to_owned(),
        attributes: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        resources: NodeResources {
            cpu_millis: MilliCpu::new(cpu),
            memory_mib: MemoryMib::new(memory),
            disk_mib: 1000.into(),
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, (model, gib, healthy, link))| GpuDevice {
                    index: u32::try_from(i).unwrap(),
                    uuid: format!("{id}-gpu{i}"),
                    vendor: "nvidia".to_owned(),
                    model: (*model).to_owned(),
                    memory_mib: MemoryMib::new(gib * 1024),
                    healthy: *healthy,
                    health_reason: None,
                    numa_node: None,
                    interconnect_group: link.map(str::to_owned),
                    mig_capable: false,
                })
                .collect(),
        },
        status: NodeStatus::Ready,
        registered_at: Timestamp::new(1),
        last_seen: Timestamp::new(1),
        drain: None,
        public_key: None,
        revoked: false,
        address: None,
        ports: aigrid_api::PortRange::DEFAULT,
        data_port: None,
        data_tls: false,
        telemetry: None,
        protections: None,
        offer: None,
        usage: None,
    }
}

pub(crate) fn h100s(n: usize) -> Vec<Gpu> {
    vec![("NVIDIA H100", 80, true, None); n]
}

pub(crate) fn group(
    name: &str,
    count: u32,
    cpu: u64,
    memory: u64,
    gpus: Option<GpuRequest>,
) -> TaskGroup {
    TaskGroup {
        name: name.to_owned(),
        count,
        gang: false,
        resources: Resources {
            cpu_millis: MilliCpu::new(cpu),
            memory_mib: MemoryMib::new(memory),
            gpus,
        },
        constraints: Vec::new(),
        spread: Vec::new(),
        affinities: Vec::new(),
        movable: true,
        max_unavailable: None,
        update: None,
        scaling: None,
        task: TaskSpec::Exec(ExecTask {
            command: "/bin/true".to_owned(),
            args: Vec::new(),
            restart: Default::default(),
            kill_timeout_ms: None,
            env: Default::default(),
            artifacts: Vec::new(),
        }),
    }
}

pub(crate) fn gpus(count: u32, model: Option<&str>, min_gib: Option<u64>) -> Option<GpuRequest> {
    Some(GpuRequest {
        count,
        model: model.map(str::to_owned),
        min_memory_mib: min_gib.map(|g| MemoryMib::new(g * 1024)),
        memory_slice_mib: None,
        same_interconnect: false,
    })
}

pub(crate) fn rule(attribute: &str, op: ConstraintOp, value: &[&str]) -> Constraint {
    let value = match op {
        ConstraintOp::In | ConstraintOp::NotIn => {
            ConstraintValue::Many(value.iter().map(|v| (*v).to_owned()).collect())
        }
        _ => ConstraintValue::One(value[0].to_owned()),
    };
    Constraint {
        attribute: attribute.to_owned(),
        op,
        value,
    }
}

pub(crate) fn request(groups: Vec<TaskGroup>) -> PlanRequest {
    PlanRequest {
        job_id: JobId::new("job"),
        groups: groups
            .into_iter()
            .map(|g| GroupDemand {
                indices: (0..g.count).collect(),
                group: g,
            })
            .collect(),
    }
}

pub(crate) fn run(nodes: &[Node], groups: Vec<TaskGroup>) -> Plan {
    plan(&PlanSnapshot::new(nodes, &[]), &request(groups))
}

pub(crate) fn on(plan: &Plan) -> Vec<&str> {
    nodes_of(&plan.placements)
}

/// The nodes placements went to, in order.
pub(crate) fn nodes_of(placements: &[Placement]) -> Vec<&str> {
    placements.iter().map(|p| p.node_id.as_str()).collect()
}

pub(crate) fn live(
    id: &str,
    job: &str,
    node: &str,
    resources: Resources,
    gpus: &[&str],
) -> Allocation {
    Allocation {
        id: AllocId::new(id),
        job_id: JobId::new(job),
        job_version: 1,
        node_id: NodeId::new(node),
        group: "g".to_owned(),
        index: 0,
        resources,
        gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
        previous: None,
        reschedules: 0,
        state: AllocState::Running,
        reason: None,
        restarts: 0,
        limits: None,
        port: None,
        endpoint: None,
        desired: DesiredState::Run,
        canary: false,
        healthy: None,
        created_at: Timestamp::new(1),
        updated_at: Timestamp::new(1),
    }
}

/// A live allocation of instance `index` of `job`'s group `group`, holding
/// `gpus` whole, 1000 CPU millis and 1 GiB.
pub(crate) fn holding(
    id: &str,
    job: &str,
    node: &str,
    (group, index): (&str, u32),
    gpus: &[&str],
) -> Allocation {
    let count = u32::try_from(gpus.len()).unwrap();
    let resources = Resources {
        cpu_millis: 1000.into(),
        memory_mib: 1024.into(),
        gpus: (count > 0).then_some(GpuRequest {
            count,
            model: None,
            min_memory_mib: None,
            memory_slice_mib: None,
            same_interconnect: false,
        }),
    };
    let mut alloc = live(id, job, node, resources, gpus);
    alloc.group = group.to_owned();
    alloc.index = index;
    alloc
}

/// The live allocation a placement of `job`'s `group` becomes.
pub(crate) fn placed(id: &str, job: &JobId, group: &TaskGroup, p: &Placement) -> Allocation {
    let mut alloc = live(
        id,
        job.as_str(),
        p.node_id.as_str(),
        group.resources.clone(),
        &[],
    );
    alloc.group = p.group.clone();
    alloc.index = p.index;
    alloc.gpus = p.gpus.clone();
    alloc
}

/// A job placed before the one under test: one group, its priority, and how
/// many of its instances may be disrupted now.
#[derive(Debug, Clone)]
pub(crate) struct Earlier {
    pub(crate) job_id: JobId,
    pub(crate) priority: u32,
    pub(crate) group: TaskGroup,
    pub(crate) budget: u32,
}

impl Earlier {
    /// What a snapshot is told of an earlier job's allocations.
    pub(crate) fn info(jobs: &[Earlier], job_id: &JobId) -> Option<GroupInfo> {
        let job = jobs.iter().find(|j| &j.job_id == job_id)?;
        Some(GroupInfo {
            priority: job.priority,
            movable: job.group.movable,
            listens: GroupInfo::listening(&job.group),
        })
    }
}

/// Places earlier jobs one after another, as a scheduling pass would, keeping
/// one snapshot current with [`PlanSnapshot::add`]; answers their allocations.
pub(crate) fn populate(nodes: &[Node], jobs: &[Earlier]) -> Vec<Allocation> {
    let mut snapshot = PlanSnapshot::new(nodes, &[]);
    let mut allocs = Vec::new();
    for job in jobs {
        let req = PlanRequest {
            job_id: job.job_id.clone(),
            groups: vec![GroupDemand {
                indices: (0..job.group.count).collect(),
                group: job.group.clone(),
            }],
        };
        for p in plan(&snapshot, &req).placements {
            let id = format!("{}-{}", job.job_id, p.index);
            let alloc = placed(&id, &job.job_id, &job.group, &p);
            snapshot.add(&alloc, GroupInfo::default());
            allocs.push(alloc);
        }
    }
    allocs
}

/// A GPU server: four or eight GPUs of one model, in interconnect domains of
/// some size or none, now and then an unhealthy one, and CPU and memory to
/// spare, so that GPUs are what runs out.
pub(crate) fn arb_gpu_node(i: usize) -> impl Strategy<Value = Node> {
    (
        prop::sample::select(vec!["BE", "NL", "FR"]),
        0usize..3,
        prop::sample::select(vec![4usize, 8]),
        prop::sample::select(vec!["H100", "A100"]),
        prop::sample::select(vec![None, Some(2usize), Some(4), Some(8)]),
        prop::option::weighted(0.2, 0usize..8),
        prop::option::weighted(0.1, Just(NodeStatus::Down)),
    )
        .prop_map(move |(country, site, count, model, domain, sick, down)| {
            const DOMAINS: [&str; 4] = ["nvl-0", "nvl-1", "nvl-2", "nvl-3"];
            let gs: Vec<Gpu> = (0..count)
                .map(|g| (model, 80, sick != Some(g), domain.map(|d| DOMAINS[g / d])))
                .collect();
            let site = ["s0", "s1", "s2"][site];
            let id = format!("n{i:03}");
            let attrs = [("country", country), ("site", site), ("host", &id)];
            let mut n = node(&id, &attrs, 64000, 262_144, &gs);
            n.status = down.unwrap_or(NodeStatus::Ready);
            n
        })
}

/// A group of GPU instances: up to `most` whole GPUs each, or now and then a
/// slice; sometimes limited to countries, spread over sites or hosts (which
/// scatters it over every node), a gang, or held to one interconnect domain.
pub(crate) fn arb_gpu_group(
    i: usize,
    count: std::ops::Range<u32>,
    most: u32,
) -> impl Strategy<Value = TaskGroup> {
    (
        count,
        1u32..=most,
        prop::option::weighted(0.15, 0u64..3),
        prop::option::weighted(0.3, prop::sample::select(vec!["H100", "A100"])),
        prop::option::weighted(
            0.2,
            prop::sample::select(vec![vec!["BE"], vec!["BE", "NL"], vec!["NL", "FR"]]),
        ),
        (
            prop::option::of(prop::sample::select(vec!["site", "host"])),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.2),
        ),
        (1u64..8, 1u64..16),
    )
        .prop_map(
            move |(count, n, slice, model, countries, (spread, gang, linked), (cpu, mem))| {
                let gpu = GpuRequest {
                    count: if slice.is_some() { 1 } else { n },
                    model: model.map(str::to_owned),
                    min_memory_mib: None,
                    memory_slice_mib: slice.map(|s| MemoryMib::new((s + 1) * 16 * 1024)),
                    same_interconnect: linked,
                };
                let mut g = group(&format!("g{i}"), count, cpu * 1000, mem * 1024, Some(gpu));
                g.gang = gang;
                if let Some(cs) = countries {
                    g.constraints = vec![rule("country", ConstraintOp::In, &cs)];
                }
                if let Some(attribute) = spread {
                    g.spread = vec![Spread {
                        attribute: attribute.to_owned(),
                        weight: None,
                    }];
                }
                g
            },
        )
}

pub(crate) fn arb_earlier(i: usize) -> impl Strategy<Value = Earlier> {
    (
        arb_gpu_group(i + 10, 1..7, 2),
        prop::sample::select(vec![0u32, 0, 10, 10, 20, 30, 40, 60]),
        prop::bool::weighted(0.85),
        0u32..8,
    )
        .prop_map(move |(mut group, priority, movable, budget)| {
            group.movable = movable;
            group.gang = false;
            Earlier {
                job_id: JobId::new(format!("earlier{i}")),
                priority,
                group,
                budget,
            }
        })
}

/// A GPU cluster with earlier jobs placed on it, a job to place, and its
/// priority.
pub(crate) fn arb_crowded() -> impl Strategy<Value = (Vec<Node>, Vec<Earlier>, Vec<TaskGroup>, u32)>
{
    (2usize..6, 2usize..9, 1usize..3).prop_flat_map(|(n, e, g)| {
        (
            (0..n).map(arb_gpu_node).collect::<Vec<_>>(),
            (0..e).map(arb_earlier).collect::<Vec<_>>(),
            (0..g)
                .map(|i| arb_gpu_group(i, 1..4, 8))
                .collect::<Vec<_>>(),
            prop::sample::select(vec![15u32, 35, 50, 70]),
        )
    })
}

/// Like [`arb_crowded`], but half the time the earlier jobs are one-GPU
/// instances spread over hosts: free GPUs scattered over every node, the
/// case defragmentation is for.
pub(crate) fn arb_scattered(
) -> impl Strategy<Value = (Vec<Node>, Vec<Earlier>, Vec<TaskGroup>, u32)> {
    (arb_crowded(), any::<bool>()).prop_map(|((nodes, mut earlier, groups, priority), scatter)| {
        if scatter {
            for job in &mut earlier {
                let g = &mut job.group;
                g.spread = vec![Spread {
                    attribute: "host".to_owned(),
                    weight: None,
                }];
                g.constraints.clear();
                g.resources.gpus = Some(GpuRequest {
                    count: 1,
                    model: None,
                    min_memory_mib: None,
                    memory_slice_mib: None,
                    same_interconnect: false,
                });
            }
        }
        (nodes, earlier, groups, priority)
    })
}

/// What holds resources once a change commits: `allocs` less those `stopped`,
/// plus `added`.
pub(crate) fn after(
    allocs: &[Allocation],
    stopped: &HashSet<&AllocId>,
    added: impl IntoIterator<Item = Allocation>,
) -> Vec<Allocation> {
    let mut out: Vec<Allocation> = allocs
        .iter()
        .filter(|a| !stopped.contains(&a.id))
        .cloned()
        .collect();
    out.extend(added);
    out
}

/// Checks a plan against its input: no over-commit, constraints hold, gangs whole.
pub(crate) fn check_plan(nodes: &[Node], allocs: &[Allocation], req: &PlanRequest, plan: &Plan) {
    let by_id: HashMap<&NodeId, &Node> = nodes.iter().map(|n| (&n.id, n)).collect();
    let mut cpu: HashMap<&NodeId, u64> = HashMap::new();
    let mut mem: HashMap<&NodeId, u64> = HashMap::new();
    let mut whole: HashSet<(&NodeId, &str)> = HashSet::new();
    let mut sliced: HashMap<(&NodeId, &str), u64> = HashMap::new();
    let mut take = |node: &'_ NodeId, c: u64, m: u64, gpus: &[String], slice: Option<u64>| {
        let node = by_id[node];
        let (id, r) = (&node.id, &node.resources);
        *cpu.entry(id).or_default() += c;
        *mem.entry(id).or_default() += m;
        assert!(cpu[id] <= r.cpu_millis.get(), "CPU over-committed on {id}");
        assert!(
            mem[id] <= r.memory_mib.get(),
            "memory over-committed on {id}"
        );
        for uuid in gpus {
            let gpu = r.gpus.iter().find(|g| &g.uuid == uuid).expect("a real GPU");
            let key = (id, gpu.uuid.as_str());
            match slice {
                None => assert!(
                    whole.insert(key) && !sliced.contains_key(&key),
                    "{uuid} shared"
                ),
                Some(s) => {
                    assert!(!whole.contains(&key), "{uuid} held whole");
                    let total = sliced.entry(key).or_default();
                    *total += s;
                    assert!(*total <= gpu.memory_mib.get(), "{uuid} over-sliced");
                }
            }
        }
    };
    for a in allocs.iter().filter(|a| a.is_live()) {
        let slice = a.resources.gpus.as_ref().and_then(|g| g.memory_slice_mib);
        take(
            &a.node_id,
            a.resources.cpu_millis.get(),
            a.resources.memory_mib.get(),
            &a.gpus,
            slice.map(MemoryMib::get),
        );
    }
    for p in &plan.placements {
        let demand = req.groups.iter().find(|d| d.group.name == p.group);
        let Some(demand) = demand else { continue };
        let g = &demand.group;
        let node = by_id[&p.node_id];
        assert!(node.status.is_schedulable());
        for c in &g.constraints {
            assert!(Rule::new(&c.attribute, c.op, &c.value).matches(&node.attributes));
        }
        let want = g.resources.gpus.as_ref();
        assert_eq!(p.gpus.len(), want.map_or(0, |w| w.count as usize));
        for uuid in &p.gpus {
            let gpu = node
                .resources
                .gpus
                .iter()
                .find(|d| &d.uuid == uuid)
                .unwrap();
            let w = want.unwrap();
            assert!(gpu.healthy);
            assert!(w.model.as_deref().is_none_or(|m| gpu.model.contains(m)));
            assert!(w.min_memory_mib.is_none_or(|m| gpu.memory_mib >= m));
        }
        take(
            &p.node_id,
            g.resources.cpu_millis.get(),
            g.resources.memory_mib.get(),
            &p.gpus,
            p.gpu_memory_slice.map(MemoryMib::get),
        );
    }
    for d in req.groups.iter().filter(|d| d.group.gang) {
        let placed = plan
            .placements
            .iter()
            .filter(|p| p.group == d.group.name)
            .count();
        assert!(
            placed == 0 || placed == d.indices.len(),
            "gang {} split",
            d.group.name
        );
    }
}

pub(crate) fn arb_node(i: usize) -> impl Strategy<Value = Node> {
    (
        prop::sample::select(vec!["BE", "NL", "FR"]),
        0usize..3,
        1u64..16,
        1u64..16,
        prop::collection::vec(
            (
                prop::sample::select(vec!["H100", "A100", "L4"]),
                0usize..3,
                any::<bool>(),
                prop::option::of(0usize..2),
            ),
            0..6,
        ),
        prop::sample::select(vec![
            NodeStatus::Ready,
            NodeStatus::Ready,
            NodeStatus::Ready,
            NodeStatus::Down,
        ]),
    )
        .prop_map(move |(country, site, cpu, mem, gs, status)| {
            let gs: Vec<Gpu> = gs
                .into_iter()
                .map(|(m, size, healthy, link)| {
                    (
                        m,
                        [24, 40, 80][size],
                        healthy || size == 0,
                        link.map(|l| ["nvl-0", "nvl-1"][l]),
                    )
                })
                .collect();
            let site = ["s0", "s1", "s2"][site];
            let mut n = node(
                &format!("n{i:03}"),
                &[("country", country), ("site", site)],
                cpu * 1000,
                mem * 1024,
                &gs,
            );
            n.status = status;
            n
        })
}

pub(crate) fn arb_group(i: usize) -> impl Strategy<Value = TaskGroup> {
    (
        1u32..6,
        1u64..4,
        1u64..4,
        prop::option::of((
            1u32..4,
            prop::option::of(prop::sample::select(vec!["H100", "A100"])),
            prop::option::of(0u64..3),
            any::<bool>(),
        )),
        prop::option::of(prop::sample::select(vec![
            vec!["BE"],
            vec!["BE", "NL"],
            vec!["NL", "FR"],
        ])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(count, cpu, mem, gpu, countries, gang, spread)| {
            let gpu = gpu.map(|(n, model, slice, _)| GpuRequest {
                count: if slice.is_some() { 1 } else { n },
                model: model.map(str::to_owned),
                min_memory_mib: None,
                memory_slice_mib: slice.map(|s| MemoryMib::new((s + 1) * 8 * 1024)),
                same_interconnect: false,
            });
            let mut g = group(&format!("g{i}"), count, cpu * 1000, mem * 1024, gpu);
            g.gang = gang;
            if let Some(cs) = countries {
                g.constraints = vec![rule("country", ConstraintOp::In, &cs)];
            }
            if spread {
                g.spread = vec![Spread {
                    attribute: "site".to_owned(),
                    weight: None,
                }];
            }
            g
        })
}
