//! `aigrid usage`: what a circle's (or the cluster's) allocations held while they
//! ran, from the control plane's meter; `aigrid circle usage` and `circle quota`:
//! what a circle is guaranteed, holds and borrows now.

use aigrid_api::{CircleUsage, Held, Quota, UsageLine, UsageReport};
use clap::Args;
use reqwest::Method;

use crate::client::{path_segment, Client};
use crate::output::{ms_to_text, print_json, print_table};

/// `aigrid usage [--circle NAME] [--since 24h]`.
#[derive(Args)]
pub struct UsageArgs {
    /// The circle (its members may read it); without it, the whole cluster (admins).
    #[arg(long)]
    circle: Option<String>,
    /// How far back: 90m, 24h, 7d. Counted from the start of that hour.
    #[arg(long, default_value = "24h")]
    since: String,
}

/// Shows metered use.
pub async fn usage(client: &Client, args: UsageArgs, json: bool) -> anyhow::Result<()> {
    // Checked here too, so a typo fails without a round trip.
    aigrid_api::usage::parse_since(&args.since).map_err(anyhow::Error::msg)?;
    let mut query = format!("since={}", args.since.trim());
    if let Some(circle) = &args.circle {
        query.push_str(&format!("&circle={}", path_segment(circle)?));
    }
    let report: UsageReport = client
        .call::<(), _>(Method::GET, &format!("/api/v1/usage?{query}"), None)
        .await?;
    if json {
        return print_json(&report);
    }
    let whose = report.circle.as_deref().unwrap_or("the cluster");
    let until = report.metered_until.map_or_else(
        || "not metered yet".to_owned(),
        |t| ms_to_text(t.as_millis()),
    );
    println!(
        "Usage of {whose} from {} to {until}",
        ms_to_text(report.from.as_millis())
    );
    let t = &report.total;
    println!(
        "  {:.3} GPU-hours, {:.3} CPU-hours, {:.3} GiB-hours of memory",
        t.gpu_seconds / 3600.0,
        t.cpu_seconds / 3600.0,
        t.memory_mib_seconds / 3600.0 / 1024.0
    );
    for (title, lines) in [
        ("GPU model", &report.by_gpu_model),
        ("job", &report.by_job),
        ("node", &report.by_node),
    ] {
        if lines.is_empty() {
            continue;
        }
        println!();
        print_table(
            2,
            &[title, "GPU-HOURS", "CPU-HOURS", "GIB-HOURS"],
            &lines.iter().map(row).collect::<Vec<_>>(),
        );
    }
    Ok(())
}

fn row(line: &UsageLine) -> Vec<String> {
    let a = &line.amounts;
    vec![
        line.name.clone().unwrap_or_else(|| line.key.clone()),
        format!("{:.3}", a.gpu_seconds / 3600.0),
        format!("{:.3}", a.cpu_seconds / 3600.0),
        format!("{:.3}", a.memory_mib_seconds / 3600.0 / 1024.0),
    ]
}

/// `aigrid circle quota NAME [--gpus H100=8] [--cpu-millis N] ... | --clear`.
#[derive(Args)]
pub struct QuotaArgs {
    /// The circle.
    circle: String,
    /// Whole GPUs by model, `H100=8,L4=2` (a model matches every GPU model
    /// containing it).
    #[arg(long, value_name = "MODEL=COUNT,...")]
    gpus: Option<String>,
    /// GPU memory, MiB.
    #[arg(long)]
    gpu_memory_mib: Option<u64>,
    /// CPU, thousandths of a core.
    #[arg(long)]
    cpu_millis: Option<u64>,
    /// Memory, MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Remove the circle's quota instead.
    #[arg(long, conflicts_with_all = ["gpus", "gpu_memory_mib", "cpu_millis", "memory_mib"])]
    clear: bool,
}

/// Sets or removes a circle's quota, and shows its usage under it.
pub async fn quota(client: &Client, args: QuotaArgs, json: bool) -> anyhow::Result<()> {
    let path = format!("/api/v1/circles/{}/quota", path_segment(&args.circle)?);
    let usage: CircleUsage = if args.clear {
        client.call::<(), _>(Method::DELETE, &path, None).await?
    } else {
        let quota = Quota {
            gpus: match &args.gpus {
                Some(list) => Quota::parse_gpus(list).map_err(|e| anyhow::anyhow!("--gpus {e}"))?,
                None => Default::default(),
            },
            gpu_memory_mib: args.gpu_memory_mib,
            cpu_millis: args.cpu_millis,
            memory_mib: args.memory_mib,
        };
        if quota == Quota::default() {
            anyhow::bail!(
                "give the quota (--gpus, --gpu-memory-mib, --cpu-millis, --memory-mib) or --clear"
            );
        }
        quota.validate()?;
        client.call(Method::PUT, &path, Some(&quota)).await?
    };
    print_circle_usage(&usage, json)
}

/// Shows a circle's quota, use, borrowing and share.
pub async fn circle_usage(client: &Client, circle: &str, json: bool) -> anyhow::Result<()> {
    let path = format!("/api/v1/circles/{}/usage", path_segment(circle)?);
    let usage: CircleUsage = client.call::<(), _>(Method::GET, &path, None).await?;
    print_circle_usage(&usage, json)
}

/// One amount of what a circle holds.
type HeldField = fn(&Held) -> u64;

fn print_circle_usage(usage: &CircleUsage, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(usage);
    }
    println!(
        "circle {}: share {:.3}, {} instance{} waiting{}",
        usage.circle,
        usage.share,
        usage.pending,
        if usage.pending == 1 { "" } else { "s" },
        if usage.quota.is_none() {
            ", no quota"
        } else {
            ""
        }
    );
    let quota = usage.quota.clone().unwrap_or_default();
    let mut models: Vec<&String> = usage.used.gpus.keys().chain(quota.gpus.keys()).collect();
    models.sort();
    models.dedup();
    // What the quota leaves out is not limited: shown as `-`.
    let limit = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            let gpus = |h: &Held| format!("{}", h.gpus.get(*m).copied().unwrap_or(0.0));
            vec![
                format!("GPUs {m}"),
                limit(quota.gpus.get(*m).map(|c| u64::from(*c))),
                gpus(&usage.used),
                gpus(&usage.borrowed),
            ]
        })
        .collect();
    let fields: [(&str, Option<u64>, HeldField); 3] = [
        ("GPU memory MiB", quota.gpu_memory_mib, |h| h.gpu_memory_mib),
        ("CPU millis", quota.cpu_millis, |h| h.cpu_millis),
        ("memory MiB", quota.memory_mib, |h| h.memory_mib),
    ];
    for (name, q, held) in fields {
        rows.push(vec![
            name.to_owned(),
            limit(q),
            held(&usage.used).to_string(),
            held(&usage.borrowed).to_string(),
        ]);
    }
    print_table(2, &["RESOURCE", "QUOTA", "USED", "BORROWED"], &rows);
    Ok(())
}
