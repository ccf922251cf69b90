//! `aigrid usage`: what a circle's (or the cluster's) allocations held while they
//! ran, from the control plane's meter.

use aigrid_api::{UsageLine, UsageReport};
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
