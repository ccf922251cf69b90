//! Seeded simulations of whole clusters: message loss, reordering, partitions and
//! crashes that lose unsynced writes. A failure names its seed; rerun one seed with
//! `AIGRID_SIM_SEED=<seed> cargo test -p aigrid-consensus --test simulation`.

use aigrid_consensus::testkit::{seeds, with_seed, ListMachine, SimConfig, Simulation};

fn run_seeds(servers: u64, count: u64) {
    let mut acknowledged = 0;
    let mut lost_writes = 0;
    let mut crashes = 0;
    let mut terms = 0;
    for seed in seeds(count) {
        let config = SimConfig {
            servers,
            ..SimConfig::default()
        };
        let report = with_seed(seed, || {
            Simulation::new(seed, config, ListMachine::default).run(
                |rng, step| {
                    use rand::Rng;
                    step * 1_000_000 + rng.random_range(0..1_000_000u64)
                },
                |state, value| state.values.contains(value),
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
        acknowledged += report.acknowledged;
        lost_writes += report.lost_writes;
        crashes += report.crashes;
        terms += report.terms_with_leader;
    }
    eprintln!(
        "{servers} servers: {acknowledged} acknowledged, {crashes} crashes, {lost_writes} lost unsynced writes, {terms} terms with a leader"
    );
    // The faults must actually have happened, or the run proves nothing.
    assert!(acknowledged > 0, "no command was acknowledged");
    assert!(crashes > 0, "no crash was simulated");
    assert!(lost_writes > 0, "no crash lost an unsynced write");
}

#[test]
fn three_servers_survive_faults() {
    run_seeds(3, 100);
}

#[test]
fn five_servers_survive_faults() {
    run_seeds(5, 100);
}

/// A server added to a running cluster becomes a voter promptly, although no
/// snapshot that includes it is due for a long time: the leader makes one when the
/// newcomer needs it.
#[test]
fn a_joining_server_becomes_a_voter_before_any_scheduled_snapshot() {
    for seed in seeds(10) {
        let config = SimConfig {
            snapshot_entries: 100_000,
            ..SimConfig::default()
        };
        let mut values = |rng: &mut rand::rngs::StdRng, step: u64| {
            use rand::Rng;
            step * 1_000_000 + rng.random_range(0..1_000_000u64)
        };
        with_seed(seed, || {
            let mut sim = Simulation::new(seed, config, ListMachine::default);
            sim.settle(100, &mut values)?;
            sim.join_server(4, 400, &mut values)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
