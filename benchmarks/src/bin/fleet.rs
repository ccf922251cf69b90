//! Heartbeat load of a large fleet against a 3-server control plane, measured from
//! outside: what the servers handle, how long a heartbeat takes, and what it costs
//! the servers in CPU and memory.
//!
//! - `observe`: aigrid. The fleet (`aigrid agent --simulate-fleet N`) runs
//!   elsewhere; this samples the servers' `/metrics` and `/proc` and the fleet's
//!   round-trip histogram over the window.
//! - `lease`: the baseline. N simulated kubelets renew their node lease every
//!   interval, each renewal one `put` through etcd's v3 JSON gateway: the storage
//!   write under every Kubernetes node heartbeat. It samples the etcd members'
//!   `/proc` the same way.
//!
//! Each prints one JSON line: `{"target","agents","secs","heartbeats_per_sec",
//! "p50_ms","p99_ms","errors","cpu_pct_mean","cpu_pct_max","rss_mib_max"}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "fleet",
    about = "Fleet heartbeat load: aigrid observer and etcd lease baseline"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Measure aigrid servers under a running simulated fleet.
    Observe {
        /// Server base URLs, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// The fleet process's metrics URL (`http://ADDR/metrics`).
        #[arg(long)]
        fleet_metrics: String,
        /// Server process ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        pids: Vec<u32>,
        /// Agents in the fleet (reported only).
        #[arg(long)]
        agents: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 120)]
        secs: u64,
    },
    /// Renew N leases in etcd every interval and measure the members.
    Lease {
        /// etcd client URLs, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
        /// etcd member process ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        pids: Vec<u32>,
        /// Simulated kubelets.
        #[arg(long)]
        agents: usize,
        /// Milliseconds between one kubelet's renewals.
        #[arg(long, default_value_t = 10_000)]
        interval_ms: u64,
        /// Unmeasured seconds first, so every kubelet is renewing.
        #[arg(long, default_value_t = 20)]
        warmup_secs: u64,
        /// Measured seconds.
        #[arg(long, default_value_t = 120)]
        secs: u64,
    },
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let rest = stat.rsplit_once(") ").context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident memory of a process, MiB.
fn rss_peak_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// CPU use of each process over a window, as a percentage of one core.
struct CpuWindow {
    pids: Vec<u32>,
    start: Vec<f64>,
    at: Instant,
}

impl CpuWindow {
    fn start(pids: &[u32]) -> Result<Self> {
        Ok(CpuWindow {
            pids: pids.to_vec(),
            start: pids.iter().map(|p| cpu_secs(*p)).collect::<Result<_>>()?,
            at: Instant::now(),
        })
    }

    fn finish(&self) -> Result<Vec<f64>> {
        let secs = self.at.elapsed().as_secs_f64();
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(p, s)| Ok((cpu_secs(*p)? - s) / secs * 100.0))
            .collect()
    }
}

async fn text(client: &reqwest::Client, url: &str) -> Result<String> {
    Ok(client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Sum of every sample of `name` (any labels) in a Prometheus text page.
fn sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The cumulative buckets of histogram `name`: (upper bound, count).
fn buckets(page: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut out: Vec<(f64, f64)> = page
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once('"')?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile, in ms, of the observations between two snapshots of one
/// histogram: the upper bound of the bucket it falls in.
fn quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before.iter().find(|(b, _)| b == le).map_or(0.0, |b| b.1);
            (*le, n - was)
        })
        .collect();
    let total = delta.last().map_or(0.0, |d| d.1);
    let want = total * q;
    delta
        .iter()
        .find(|(_, n)| *n >= want)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

fn exact_quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// One measured window.
struct Outcome<'a> {
    target: &'a str,
    agents: usize,
    secs: u64,
    per_sec: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    cpu: &'a [f64],
    rss: &'a [f64],
}

fn report(o: Outcome<'_>) {
    let Outcome {
        target,
        agents,
        secs,
        per_sec,
        p50,
        p99,
        errors,
        cpu,
        rss,
    } = o;
    let mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;
    let max = cpu.iter().copied().fold(0.0, f64::max);
    let rss_max = rss.iter().copied().fold(0.0, f64::max);
    println!(
        "{}",
        json!({
            "target": target, "agents": agents, "secs": secs,
            "heartbeats_per_sec": (per_sec * 10.0).round() / 10.0,
            "p50_ms": (p50 * 100.0).round() / 100.0, "p99_ms": (p99 * 100.0).round() / 100.0,
            "errors": errors,
            "cpu_pct_mean": (mean * 10.0).round() / 10.0, "cpu_pct_max": (max * 10.0).round() / 10.0,
            "rss_mib_max": rss_max.round(),
        })
    );
}

async fn observe(
    servers: Vec<String>,
    fleet_metrics: String,
    pids: Vec<u32>,
    agents: usize,
    secs: u64,
) -> Result<()> {
    let client = reqwest::Client::new();
    const HANDLED: &str = "aigrid_agent_heartbeats_total";
    const ROUND_TRIP: &str = "aigrid_agent_heartbeat_round_trip_seconds";
    let handled = |pages: &[String]| pages.iter().map(|p| sum(p, HANDLED)).sum::<f64>();
    let mut pages = Vec::new();
    for s in &servers {
        pages.push(text(&client, &format!("{s}/metrics")).await?);
    }
    let fleet_before = text(&client, &fleet_metrics).await?;
    let errors_before = sum(
        &fleet_before,
        "aigrid_agent_heartbeats_sent_total{outcome=\"error\"}",
    );
    let before = handled(&pages);
    let cpu = CpuWindow::start(&pids)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu = cpu.finish()?;
    let mut after_pages = Vec::new();
    for s in &servers {
        after_pages.push(text(&client, &format!("{s}/metrics")).await?);
    }
    let fleet_after = text(&client, &fleet_metrics).await?;
    let per_sec = (handled(&after_pages) - before) / secs as f64;
    let (b, a) = (
        buckets(&fleet_before, ROUND_TRIP),
        buckets(&fleet_after, ROUND_TRIP),
    );
    let errors = sum(
        &fleet_after,
        "aigrid_agent_heartbeats_sent_total{outcome=\"error\"}",
    ) - errors_before;
    let rss = pids
        .iter()
        .map(|p| rss_peak_mib(*p))
        .collect::<Result<Vec<_>>>()?;
    report(Outcome {
        target: "aigrid",
        agents,
        secs,
        per_sec,
        p50: quantile_ms(&b, &a, 0.5),
        p99: quantile_ms(&b, &a, 0.99),
        errors: errors as u64,
        cpu: &cpu,
        rss: &rss,
    });
    Ok(())
}

async fn lease(
    endpoints: Vec<String>,
    pids: Vec<u32>,
    agents: usize,
    interval: Duration,
    warmup: Duration,
    secs: u64,
) -> Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let samples = Arc::new(parking_free::Samples::default());
    let errors = Arc::new(AtomicU64::new(0));
    let done = Instant::now() + warmup + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..agents {
        let (client, measuring, samples, errors) = (
            client.clone(),
            measuring.clone(),
            samples.clone(),
            errors.clone(),
        );
        let url = format!("{}/v3/kv/put", endpoints[i % endpoints.len()]);
        // A node lease as kubelet writes it, renewed with a fresh time each time.
        let key = BASE64.encode(format!("/registry/leases/kube-node-lease/node-{i:05}"));
        let offset = interval.mul_f64(i as f64 / agents as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < done {
                tick.tick().await;
                let renew = format!(
                    "{{\"kind\":\"Lease\",\"apiVersion\":\"coordination.k8s.io/v1\",\"metadata\":{{\"name\":\"node-{i:05}\",\"namespace\":\"kube-node-lease\"}},\"spec\":{{\"holderIdentity\":\"node-{i:05}\",\"leaseDurationSeconds\":40,\"renewTime\":\"{:?}\"}}}}",
                    std::time::SystemTime::now()
                );
                let body = json!({"key": key, "value": BASE64.encode(renew)});
                let started = Instant::now();
                let ok = matches!(client.post(&url).json(&body).send().await, Ok(r) if r.status().is_success());
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        samples.push(started.elapsed());
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let cpu = CpuWindow::start(&pids)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = cpu.finish()?;
    let rss = pids
        .iter()
        .map(|p| rss_peak_mib(*p))
        .collect::<Result<Vec<_>>>()?;
    for t in tasks {
        t.abort();
    }
    let mut all = samples.take();
    all.sort();
    if all.is_empty() {
        bail!("no lease renewal succeeded");
    }
    report(Outcome {
        target: "etcd",
        agents,
        secs,
        per_sec: all.len() as f64 / secs as f64,
        p50: exact_quantile_ms(&all, 0.5),
        p99: exact_quantile_ms(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
        cpu: &cpu,
        rss: &rss,
    });
    Ok(())
}

/// A lock-light sample sink: one mutex-protected vector, touched once per
/// renewal (1,000 a second), which is nothing next to an HTTP request.
mod parking_free {
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Default)]
    pub struct Samples(Mutex<Vec<Duration>>);

    impl Samples {
        pub fn push(&self, d: Duration) {
            self.0.lock().expect("not poisoned").push(d);
        }

        pub fn take(&self) -> Vec<Duration> {
            std::mem::take(&mut *self.0.lock().expect("not poisoned"))
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().mode {
        Mode::Observe {
            servers,
            fleet_metrics,
            pids,
            agents,
            secs,
        } => observe(servers, fleet_metrics, pids, agents, secs).await,
        Mode::Lease {
            endpoints,
            pids,
            agents,
            interval_ms,
            warmup_secs,
            secs,
        } => {
            lease(
                endpoints,
                pids,
                agents,
                Duration::from_millis(interval_ms),
                Duration::from_secs(warmup_secs),
                secs,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_come_from_the_window() {
        let page = |a: u32, b: u32, c: u32| {
            format!(
                "h_bucket{{le=\"0.001\"}} {a}\nh_bucket{{le=\"0.01\"}} {b}\nh_bucket{{le=\"+Inf\"}} {c}\nh_sum 1\nh_count {c}\n"
            )
        };
        let before = buckets(&page(100, 100, 100), "h");
        let after = buckets(&page(190, 199, 200), "h");
        assert_eq!(quantile_ms(&before, &after, 0.5), 1.0);
        assert_eq!(quantile_ms(&before, &after, 0.99), 10.0);
        assert_eq!(sum("x{a=\"1\"} 2\nx{a=\"2\"} 3\nxy 5\n", "x"), 5.0);
    }
}
