//! Scale from zero to the first token (`benchmarks/serving`, part e): `aigrid up`'s
//! demo model served by a group that scales to zero, asked while it has no
//! replica, beside the same model already running.
//!
//! The benchmark starts `aigrid up` (the release binary, `--aigrid`) on a free
//! loopback port with a fresh data directory and identity, waits for its demo
//! model to serve, and gives the demo job a `scaling` block (`min` 0, `max` 1,
//! idle to zero after `--idle-secs`) with `aigrid job submit`. Then, `--reps`
//! times:
//!
//! - **From zero**: it waits until the job's count is 0 and its replica is gone,
//!   then streams one chat completion. The clock runs from sending the request to
//!   the first chunk with text: the gateway holds the request, wakes the group
//!   (a committed scale), the leader places the replica, the agent starts
//!   `aigrid serve`, which reads the model from the store, loads and warms it,
//!   the gateway's probe finds it ready and relays the request.
//! - **Already running**: at once after, `--warm` requests one after another to
//!   the replica that the cold request started; the median is its row.
//!
//! Prompts and `max_tokens` are the same on both sides; the table shows the
//! medians and the spread over the reps.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aigrid_benchmarks::measure::{cpus, load_average, median};
use aigrid_benchmarks::serve::{self, prompt};
use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

/// The demo model's name, and its job's.
const DEMO: &str = "tiny-llama";

#[derive(Parser, Debug)]
#[command(about = "Time from zero replicas to the first token, beside a running replica")]
struct Args {
    /// The `aigrid` binary to start `aigrid up` with and submit jobs through.
    #[arg(long, default_value = "target/release/aigrid")]
    aigrid: PathBuf,
    /// Cold starts measured.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Requests to the running replica after each cold start.
    #[arg(long, default_value_t = 10)]
    warm: usize,
    /// Seconds without a request before the group goes to zero.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 16)]
    max_tokens: u64,
}

/// `aigrid up`, killed when dropped.
struct Up {
    child: Child,
    base: String,
    env: Vec<(String, PathBuf)>,
    aigrid: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(aigrid: &Path, root: &Path) -> Result<Up> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let env = vec![("AIGRID_IDENTITY".to_owned(), root.join("identity.json"))];
        let mut child = Command::new(aigrid)
            .args(["up", "--listen", &listen, "--data-dir"])
            .arg(root.join("data"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("AIGRID_STORE")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(root.join("up.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", aigrid.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut banner = String::new();
        while !banner.contains("Press Ctrl-C") {
            if stdout.read_line(&mut banner)? == 0 {
                bail!("aigrid up stopped: {banner}");
            }
        }
        // Keep reading (and dropping) what it prints, so it never sees a closed pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stdout.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        Ok(Up {
            child,
            base: format!("http://{listen}"),
            env,
            aigrid: aigrid.to_owned(),
        })
    }

    /// Runs `aigrid ARGS --server BASE` as the cluster's admin; answers its stdout.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.aigrid)
            .args(args)
            .args(["--server", &self.base])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()?;
        if !out.status.success() {
            bail!(
                "aigrid {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn job(&self) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.cli(&["job", "status", DEMO, "--json"])?,
        )?)
    }
}

/// Polls `done` every 50 ms for at most `limit`.
async fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done()? {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Whether `/v1/models` lists the demo model.
async fn listed(client: &reqwest::Client, base: &str) -> Result<bool> {
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    Ok(models["data"]
        .as_array()
        .is_some_and(|d| d.iter().any(|m| m["id"] == DEMO)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let up = Up::start(&args.aigrid, root.path())?;
    let client = serve::client()?;
    let url = format!("{}/v1/chat/completions", up.base);
    eprintln!("waiting for the demo model to serve at {}", up.base);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !listed(&client, &up.base).await? {
        if Instant::now() > deadline {
            bail!("the demo model did not serve within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut spec = up.job()?["spec"].clone();
    spec["groups"][0]["scaling"] = json!({
        "min": 0, "max": 1, "target_concurrency": 4,
        "scale_down_window": format!("{}s", args.idle_secs),
        "idle_to_zero": format!("{}s", args.idle_secs),
    });
    let file = root.path().join("scaled.json");
    std::fs::write(&file, spec.to_string())?;
    up.cli(&["job", "submit", file.to_str().context("path")?])?;

    let body = |i: usize| {
        json!({"model": DEMO, "max_tokens": args.max_tokens,
               "messages": [{"role": "user", "content": prompt(i)}]})
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for rep in 0..args.reps {
        // At zero: the count committed and the replica gone from the gateway.
        let at_zero = Instant::now();
        let limit = Duration::from_secs(args.idle_secs + 120);
        wait("scaling to zero", limit, || {
            Ok(up.job()?["spec"]["groups"][0]["count"] == 0)
        })
        .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while listed(&client, &up.base).await? {
            if Instant::now() > deadline {
                bail!("the replica did not go within 60 s of the count reaching 0");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "rep {rep}: at zero after {:.1} s; asking",
            at_zero.elapsed().as_secs_f64()
        );
        let first = serve::stream(&client, &url, &body(rep)).await?;
        let ttft = first.ttft().context("the cold request streamed no text")?;
        cold.push(ms(ttft));
        let mut running = Vec::new();
        for i in 0..args.warm {
            let s = serve::stream(&client, &url, &body(1000 + i)).await?;
            running.push(ms(s.ttft().context("a warm request streamed no text")?));
        }
        let m = median(&running);
        warm.push(m);
        eprintln!("rep {rep}: from zero {:.0} ms, running {m:.1} ms", ms(ttft));
    }
    let events = up.job()?["scale_events"].clone();
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.1} – {hi:.1}")
    };
    let (cold_median, warm_median) = (median(&cold), median(&warm));
    println!(
        "\n### Scale from zero to first token: `{DEMO}` ({} reps, {} warm requests each)\n",
        args.reps, args.warm
    );
    println!("{} cores, load {}\n", cpus(), load_average());
    println!("| path | TTFT median, ms | range, ms |");
    println!("|---|--:|--:|");
    println!(
        "| from zero (held at the gateway, replica placed, started and loaded) | {cold_median:.0} | {} |",
        spread(&cold)
    );
    println!(
        "| already running (same model, same requests) | {warm_median:.1} | {} |",
        spread(&warm)
    );
    println!(
        "\nfrom zero / running: {:.0}×",
        cold_median / warm_median.max(f64::MIN_POSITIVE)
    );
    if let Some(last) = events.as_array().and_then(|e| e.last()) {
        println!("the last scale event: {last}");
    }
    Ok(())
}
