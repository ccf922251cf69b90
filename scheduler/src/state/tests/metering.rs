//! Metering: running allocations counted per hour, circle, job, node and GPU model.

use super::*;

fn meter(log: &mut Log, at_ms: u64) -> crate::state::metering::Metered {
    match log.apply(Command::Meter {
        at: Timestamp::from_millis(at_ms),
    }) {
        Ok(Applied::Metered(m)) => m,
        other => panic!("expected a meter, got {other:?}"),
    }
}

const HOUR: u64 = 3_600_000;

#[test]
fn running_allocations_are_counted_by_what_they_hold() {
    let mut log = running_with(None);
    // The first meter only starts the clock.
    assert_eq!(meter(&mut log, 10 * HOUR).allocations, 0);
    let m = meter(&mut log, 10 * HOUR + 10_000);
    assert_eq!((m.allocations, m.ms), (2, 10_000));
    let report = log
        .state
        .usage(Some("ml"), Timestamp::from_millis(10 * HOUR));
    // One H100 for 10 s; 2 × 0.5 cores for 10 s; 2 × 256 MiB for 10 s.
    assert_eq!(report.total.gpu_seconds, 10.0);
    assert_eq!(report.total.cpu_seconds, 10.0);
    assert_eq!(report.total.memory_mib_seconds, 5120.0);
    assert_eq!(report.by_gpu_model.len(), 1);
    assert_eq!(report.by_gpu_model[0].key, "H100");
    assert_eq!(report.by_job[0].key, "j1");
    assert_eq!(report.by_job[0].name.as_deref(), Some("api"));
    assert_eq!(report.by_node[0].key, "n1");
    assert_eq!(
        report.metered_until,
        Some(Timestamp::from_millis(10 * HOUR + 10_000))
    );
    // Another circle's report holds none of it; the cluster's holds all.
    assert_eq!(
        log.state
            .usage(Some("web"), Timestamp::new(0))
            .total
            .gpu_seconds,
        0.0
    );
    assert_eq!(
        log.state.usage(None, Timestamp::new(0)).total.gpu_seconds,
        10.0
    );
}

#[test]
fn a_replayed_or_stale_meter_counts_nothing_and_stopped_work_is_not_counted() {
    let mut log = running_with(None);
    meter(&mut log, 5_000);
    meter(&mut log, 15_000);
    let before = log.bytes();
    assert_eq!(meter(&mut log, 15_000).allocations, 0);
    assert_eq!(meter(&mut log, 9_000).allocations, 0);
    assert_eq!(log.bytes(), before);
    log.apply(report("n1", &[("a0", AllocState::Failed)]))
        .unwrap();
    let m = meter(&mut log, 25_000);
    assert_eq!(m.allocations, 1);
    let total = log.state.usage(Some("ml"), Timestamp::new(0)).total;
    assert_eq!(
        total.gpu_seconds, 10.0,
        "a0 stopped before the second interval"
    );
    assert_eq!(total.cpu_seconds, 15.0, "a1 ran on alone at half a core");
}

#[test]
fn intervals_split_at_hours_and_long_gaps_count_only_the_bound() {
    let mut log = running_with(None);
    meter(&mut log, HOUR - 5_000);
    meter(&mut log, HOUR + 5_000);
    let hour1 = log.state.usage(Some("ml"), Timestamp::from_millis(HOUR));
    assert_eq!(
        hour1.total.gpu_seconds, 5.0,
        "the second hour holds its 5 s"
    );
    let both = log
        .state
        .usage(Some("ml"), Timestamp::from_millis(HOUR - 1));
    assert_eq!(both.total.gpu_seconds, 10.0);
    // Ten minutes without a leader: one minute is counted, nine are not.
    let m = meter(&mut log, HOUR + 5_000 + 600_000);
    assert_eq!(m.ms, crate::state::metering::MAX_GAP_MS);
    assert_eq!(log.state.unmetered_ms(), 540_000);
    let totals = log.state.usage_totals();
    let gpu: f64 = totals.iter().map(|t| t.amounts.gpu_seconds).sum();
    assert_eq!(gpu, 70.0);
}

#[test]
fn a_memory_slice_counts_its_share_of_the_gpu() {
    let mut log = Log::new();
    log.apply(register("n1", &["g0"])).unwrap();
    log.apply(submit("j1", "e1", spec("api"))).unwrap();
    let mut sliced = alloc("a0", "j1", "n1", 0, &["g0"]);
    if let Some(g) = sliced.resources.gpus.as_mut() {
        g.memory_slice_mib = Some(MemoryMib::new(20480));
    }
    log.apply(upsert(vec![sliced])).unwrap();
    log.apply(report("n1", &[("a0", AllocState::Running)]))
        .unwrap();
    meter(&mut log, 1_000);
    meter(&mut log, 41_000);
    // A quarter of an 80 GiB H100 for 40 s; the admins' job has no circle.
    let report = log.state.usage(None, Timestamp::new(0));
    assert_eq!(report.total.gpu_seconds, 10.0);
    assert_eq!(log.state.usage_totals()[0].circle, "");
}

#[test]
fn metered_use_survives_a_snapshot() {
    let mut log = running_with(None);
    meter(&mut log, 1_000);
    meter(&mut log, 11_000);
    let mut restored = ClusterState::default();
    restored.restore(&log.bytes()).unwrap();
    assert_eq!(
        restored.usage(Some("ml"), Timestamp::new(0)),
        log.state.usage(Some("ml"), Timestamp::new(0))
    );
    assert_eq!(restored.usage_totals(), log.state.usage_totals());
}
