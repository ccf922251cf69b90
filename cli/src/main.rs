//! `aigrid`: the one binary. `up` runs the embedded default, `server` runs one
//! control-plane server, and the other subcommands are clients of the control API.
//!
//! - [`layers`]: where a role's settings come from: flags over `AIGRID_*` variables
//!   over the TOML file over defaults, merged by figment; unknown keys refused.
//! - [`config`]: the server roles' (`server`, `up`) settings, resolved and checked.
//! - [`server`]: `aigrid server` and `aigrid up`, run until Ctrl-C or SIGTERM.
//! - [`files`]: the dispersed store's TOML file, and the embedded default store.
//! - [`output`]: what people read: lines, tables, `--json`, times and byte counts;
//!   plain when not on a terminal.
//! - [`shutdown`]: the signal that stops a long-running role.
//! - [`client`]: the HTTP client, failing over between servers, signing every
//!   request with the caller's identity, with one-line errors.
//! - [`keys`]: identity key files: made (mode 0600), read, and signing with them.
//! - [`commands`]: the client subcommands `job`, `alloc`, `node`, `cluster`, `key`,
//!   `whoami`, `identity`, `circle`, `proposal`, `audit`, `apikey`, `ca`.
//! - [`agent`]: the node agent role, its flags and its metrics listener.
//! - [`placement`]: waiting for a submitted job's placement and saying where it went.
//! - [`logs`]: allocations' output: by id prefix, by job, followed.
//! - [`model`]: the dispersed model store's commands (registry look-ups, the store
//!   and keys, push, repair) and the periodic repair loop.
//! - [`serve`]: `aigrid serve`, one model behind the OpenAI-compatible `/v1` API.
//! - [`demo`]: the tiny demo model `aigrid up` pushes and deploys.

mod agent;
mod client;
mod commands;
mod config;
mod data_port;
mod demo;
mod files;
mod keys;
mod layers;
mod logs;
mod model;
mod output;
mod placement;
mod serve;
mod server;
mod shutdown;
mod staging;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::Client;

/// aigrid: a GPU-aware AI cloud with a replicated control plane.
#[derive(Parser)]
#[command(name = "aigrid", version, about, propagate_version = true)]
struct Cli {
    /// Control API URL(s); a comma-separated list fails over to the next on errors.
    #[arg(
        long,
        global = true,
        env = "AIGRID_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    server: String,

    /// The identity file requests are signed with (`aigrid key new` makes one); the
    /// default is your config dir's `aigrid/identity.json`.
    #[arg(long, global = true, env = "AIGRID_IDENTITY", value_name = "FILE")]
    identity: Option<std::path::PathBuf>,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true, env = "AIGRID_JSON")]
    json: bool,

    /// The cluster CA's certificate (`ca.pem`): `https://` servers are trusted only
    /// under it.
    #[arg(long, global = true, env = "AIGRID_CA_CERT", value_name = "FILE")]
    ca_cert: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded default: one server on this machine, serving on 127.0.0.1:7700.
    ///
    /// `up` owns what it starts: Ctrl-C or SIGTERM stops its workloads and model
    /// servers (each within its grace period) before the server stops.
    #[command(after_help = layers::HELP)]
    Up(config::UpArgs),
    /// Run one control-plane server of a cluster.
    #[command(after_help = layers::HELP)]
    Server(Box<config::ServerArgs>),
    /// Run this machine's node agent: it joins the servers and runs what they assign.
    ///
    /// Stopping the agent (Ctrl-C, SIGTERM) leaves its workloads running: an agent
    /// restart or upgrade must not kill work. The next start on the same data dir
    /// reattaches to them. (`aigrid up`, by contrast, stops what it started.)
    #[command(after_help = layers::HELP)]
    Agent(Box<agent::AgentArgs>),
    /// Serve one model (a directory, or a registered model by digest) behind the
    /// OpenAI-compatible `/v1` API.
    Serve(Box<serve::ServeArgs>),
    /// Submit, list, inspect and remove jobs.
    #[command(subcommand)]
    Job(commands::JobCommand),
    /// Follow and steer a service's rollout: status, pause, resume, promote, abort.
    #[command(subcommand)]
    Deployment(commands::DeploymentCommand),
    /// Send a model to nodes chosen by attributes, in waves, and follow it.
    #[command(subcommand)]
    Rollout(commands::RolloutCommand),
    /// Inspect nodes, manage join tokens, revoke node keys.
    #[command(subcommand)]
    Node(commands::NodeCommand),
    /// Inspect allocations: the end of their output.
    #[command(subcommand)]
    Alloc(commands::AllocCommand),
    /// Push, list, show, pull, verify, repair and remove models in the dispersed store.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Inspect and change the control plane's membership.
    #[command(subcommand)]
    Cluster(commands::ClusterCommand),
    /// Make or show this user's identity (a key pair, kept on this machine).
    #[command(subcommand)]
    Key(commands::KeyCommand),
    /// Show who the servers take this identity for: its roles.
    Whoami,
    /// Manage the identities the cluster knows (admins only).
    #[command(subcommand)]
    Identity(commands::IdentityCommand),
    /// Show circles and manage their members' roles.
    #[command(subcommand)]
    Circle(commands::CircleCommand),
    /// Show, approve, reject and veto proposals: guarded changes waiting for their
    /// circle's quorum.
    #[command(subcommand)]
    Proposal(commands::ProposalCommand),
    /// Read, export and verify the audit log of every control change.
    #[command(subcommand)]
    Audit(commands::AuditCommand),
    /// Create, list and revoke a circle's API keys for `/v1`.
    #[command(subcommand)]
    Apikey(commands::ApiKeyCommand),
    /// Show what a circle's (or the cluster's) allocations held while they ran:
    /// GPU-hours by model, CPU-hours and memory, by job and node.
    Usage(commands::UsageArgs),
    /// Circles' treasuries: balances, ledgers, deposits, transfers out through the
    /// circle's quorum, and what farmers earned.
    #[command(subcommand)]
    Treasury(commands::TreasuryCommand),
    /// Make the cluster's certificate authority and issue server certificates.
    #[command(subcommand)]
    Ca(commands::CaCommand),
    /// Supervise one allocation's workload (started by the agent, detached).
    #[command(hide = true)]
    Supervise { alloc_dir: std::path::PathBuf },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIGRID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: logs in files and pipes stay plain text.
        .with_ansi(output::stderr_is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// mimalloc rather than the system allocator: a server holding a million
/// allocations churns through many small strings, and glibc's per-thread arenas
/// kept a few hundred MiB more resident for the same state.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A control-plane server's heap is its state: a great many small objects, added a
/// few KiB at a time and freed as often. With transparent huge pages the kernel
/// backs each region mimalloc asks to be huge with a 2 MiB page, zeroed in full on
/// its first touch, and again after the allocator returns part of it: at 64
/// clients of `benchmarks/control_plane/run.sh` zeroing pages took 5-6% of both
/// cores. Without them the same load committed 4,535 writes/s against 4,130 (mean
/// of four alternating runs each) with p99 at 32 ms against 39 ms. Only `aigrid
/// server` opts out: model serving keeps huge pages for its tensors.
fn small_pages_for_the_control_plane() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        // Nothing depends on it: the server runs as before, a little slower.
        eprintln!("warning: cannot turn off transparent huge pages for this server: {e}");
    }
}

/// A command whose output goes to a pipe that was closed (`aigrid job ls | head`)
/// ends at once and quietly, with the status a shell gives a process killed by
/// SIGPIPE, as other command-line tools do; Rust's runtime ignores SIGPIPE, so a
/// write there fails and `println!` panics instead. Every other panic is reported
/// as before.
fn quiet_on_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    // Before any runtime or thread exists: the supervisor blocks signals process-wide.
    if let Command::Supervise { alloc_dir } = &cli.command {
        return aigrid_agent::supervisor::run(alloc_dir);
    }
    // Before any thread exists.
    aigrid_serving::device::set_cpu_threads();
    if let Command::Server(_) = &cli.command {
        small_pages_for_the_control_plane();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let identity = cli.identity.clone();
    let server = cli.server.clone();
    let client = move || -> anyhow::Result<Client> {
        Client::new(&server, keys::client_key(identity.as_deref())?)
    };
    let result = runtime.block_on(async move {
        if let Some(path) = &cli.ca_cert {
            client::trust_ca_file(path)?;
        } else {
            client::trust_ca_variable()?;
        }
        match cli.command {
            Command::Up(args) => {
                init_logging();
                server::run_up(args, cli.identity.as_deref()).await
            }
            Command::Server(args) => {
                init_logging();
                server::run_server(*args, cli.identity.as_deref()).await
            }
            Command::Agent(args) => {
                init_logging();
                agent::run_agent(*args).await
            }
            Command::Serve(args) => {
                init_logging();
                serve::run_serve(&cli.server, *args).await
            }
            Command::Alloc(cmd) => commands::alloc(&client()?, cmd, cli.json).await,
            Command::Job(cmd) => commands::job(&client()?, cmd, cli.json).await,
            Command::Deployment(cmd) => commands::deployment(&client()?, cmd, cli.json).await,
            Command::Rollout(cmd) => commands::rollout(&client()?, cmd, cli.json).await,
            Command::Node(cmd) => commands::node(&client()?, cmd, cli.json).await,
            Command::Model(cmd) => model::model(&client()?, cmd, cli.json).await,
            Command::Cluster(cmd) => commands::cluster(&client()?, cmd, cli.json).await,
            Command::Key(cmd) => commands::key(cli.identity.as_deref(), cmd, cli.json),
            Command::Whoami => commands::whoami(&client()?, cli.json).await,
            Command::Identity(cmd) => commands::identity(&client()?, cmd, cli.json).await,
            Command::Circle(cmd) => commands::circle(&client()?, cmd, cli.json).await,
            Command::Apikey(cmd) => commands::apikey(&client()?, cmd, cli.json).await,
            Command::Usage(args) => commands::usage(&client()?, args, cli.json).await,
            Command::Treasury(cmd) => commands::treasury(&client()?, cmd, cli.json).await,
            Command::Proposal(cmd) => commands::proposal(&client()?, cmd, cli.json).await,
            Command::Audit(commands::AuditCommand::Verify {
                file,
                cluster_key,
                older,
            }) => commands::verify_audit(&file, cluster_key.as_deref(), older.as_deref(), cli.json),
            Command::Audit(cmd) => commands::audit(&client()?, cmd, cli.json).await,
            Command::Ca(cmd) => commands::ca(cmd, cli.json),
            Command::Supervise { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's arguments agree with the global ones (a subcommand's own
    /// `--identity` or `--server` would shadow them and fail at run time).
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
