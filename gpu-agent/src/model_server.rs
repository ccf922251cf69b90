//! How a `model-server` task runs: as an `exec` task of the agent's own binary,
//!
//! ```text
//! <program> <args..> --model DIGEST --server URL --listen IP:PORT
//!     --cache-dir <data_dir>/model-cache --device cuda:0|cpu
//! ```
//!
//! so it gets everything `exec` tasks get (supervisor, logs, restarts, stops,
//! reattach after an agent restart, GPU visibility). The port is the one the
//! control plane assigned the allocation from the node's port range, and is part
//! of the task from its first start: in-place restarts and a restarted agent use
//! the same one.
//!
//! The servers reach the model server at the node's address, which is the source
//! address the node registered from (the registration's answer says which), and
//! the assigned port, and nowhere else; the endpoint the agent reports is only
//! what it believes that to be. The model server listens on that address when it
//! is one of this machine's, else (behind NAT) on every interface; with no address
//! known, on 127.0.0.1. The only listener this adds is the workload's own serving
//! port; the agent still accepts no inbound control connection.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use aigrid_api::allocation::check_endpoint;
use aigrid_api::node::workload_endpoint;
use aigrid_api::{Allocation, ExecTask, ModelServerTask, RestartPolicy};

use crate::sandbox::{Grants, SandboxConfig};

/// The directory, under the agent's data dir, model servers cache model bytes in.
pub const CACHE_DIR: &str = "model-cache";

/// How a model server is started: `<program> <args..>` and then its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelServerLaunch {
    /// The program, normally the `aigrid` binary itself.
    pub program: PathBuf,
    /// Arguments before the flags, normally `["serve"]`.
    pub args: Vec<String>,
}

impl ModelServerLaunch {
    /// `<program> serve`: the role of the same binary that runs the agent.
    pub fn serve(program: PathBuf) -> Self {
        ModelServerLaunch {
            program,
            args: vec!["serve".into()],
        }
    }
}

/// What a model server needs from the agent beyond its task: which server to
/// load the model's manifest from and where the node is reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeSite {
    /// What is passed as `--server`: the agent's control-plane URLs,
    /// comma-separated, the one it last heard from first.
    pub server: Option<String>,
    /// The node's address as the servers recorded it at registration; `None`
    /// before the agent has registered.
    pub address: Option<IpAddr>,
    /// The cluster CA's certificate (PEM), handed over as [`CA_PEM_VARIABLE`]: a
    /// model server trusts it for the control plane and the store's data ports.
    /// In the environment rather than a file, since a model server's sandbox
    /// cannot see the agent's data dir, and the certificate is no secret.
    pub ca_pem: Option<String>,
}

/// The variable a process of this binary reads a cluster CA certificate from (PEM
/// text), as it reads a file from `AIGRID_CA_CERT`.
pub const CA_PEM_VARIABLE: &str = "AIGRID_CA_CERT_PEM";

/// Where a model server listens, and the endpoint it is reported at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The address it binds.
    pub listen: SocketAddr,
    /// `http://host:port`, with the host the servers reach the node at.
    pub endpoint: String,
}

/// Where a model server assigned `port` listens on this node: on `address` when
/// it is one of this machine's, else (as behind NAT) on every interface; with no
/// address, on 127.0.0.1. Binds the port once to find out, and lets it go; fails
/// when the port is taken, so the allocation fails with that reason and is placed
/// again rather than crash-looping.
pub fn place(address: Option<IpAddr>, port: u16) -> io::Result<Placement> {
    let ip = address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let listener = match TcpListener::bind((ip, port)) {
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            let any = match ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            TcpListener::bind((any, port))?
        }
        other => other?,
    };
    let listen = listener.local_addr()?;
    drop(listener);
    let endpoint = workload_endpoint(ip, port);
    check_endpoint(&endpoint)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.message))?;
    Ok(Placement { listen, endpoint })
}

/// What a model server's sandbox lets it reach beyond its own directory: its
/// program (read and execute), the shared model cache (read and write) and the
/// configured local store directories (read).
pub fn grants(launch: &ModelServerLaunch, data_dir: &Path, sandbox: &SandboxConfig) -> Grants {
    Grants {
        exec: vec![launch.program.clone()],
        read: sandbox.model_reads.clone(),
        shared: vec![data_dir.join(CACHE_DIR)],
    }
}

/// The device a model server of `alloc` computes on: the first GPU it may see
/// (its GPUs are the only visible ones) or the CPU.
pub fn device(alloc: &Allocation) -> &'static str {
    if alloc.gpus.is_empty() {
        "cpu"
    } else {
        "cuda:0"
    }
}

/// The `exec` task a `model-server` task of `alloc` runs as, and the endpoint it
/// will serve at. Fails, with the allocation's failure reason, when there is no
/// server to name, the model could be read as a flag, or the allocation has no
/// assigned port or it is taken.
pub fn exec_task(
    launch: &ModelServerLaunch,
    site: &ServeSite,
    data_dir: &Path,
    alloc: &Allocation,
    task: &ModelServerTask,
) -> Result<(ExecTask, String), String> {
    let server = site
        .server
        .as_deref()
        .ok_or("no control-plane server is known yet to load the model from")?;
    if task.model.is_empty() || task.model.starts_with('-') {
        return Err(format!("model `{}` is not a digest", task.model));
    }
    let port = alloc
        .port
        .ok_or("the control plane assigned this model server no port")?;
    let placement = place(site.address, port)
        .map_err(|e| format!("cannot listen on assigned port {port}: {e}"))?;
    let mut args = launch.args.clone();
    for (flag, value) in [
        ("--model", task.model.clone()),
        ("--server", server.to_owned()),
        ("--listen", placement.listen.to_string()),
        (
            "--cache-dir",
            data_dir.join(CACHE_DIR).to_string_lossy().into_owned(),
        ),
        ("--device", device(alloc).to_owned()),
    ] {
        args.push(flag.to_owned());
        args.push(value);
    }
    if task.auto_truncate {
        args.push("--auto-truncate".to_owned());
    }
    let exec = ExecTask {
        command: launch.program.to_string_lossy().into_owned(),
        args,
        env: site
            .ca_pem
            .iter()
            .map(|pem| (CA_PEM_VARIABLE.to_owned(), pem.clone()))
            .collect(),
        artifacts: Vec::new(),
        restart: RestartPolicy::default(),
        // Time to finish the requests under way before SIGKILL.
        kill_timeout_ms: Some(10_000),
    };
    Ok((exec, placement.endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port nothing listens on right now: the system's pick, let go.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn alloc(gpus: &[&str], port: Option<u16>) -> Allocation {
        let mut alloc = crate::testkit::allocation("a-1", "run", gpus);
        alloc.port = port;
        alloc
    }

    #[test]
    fn a_local_agent_listens_and_is_reached_on_loopback_at_its_assigned_port() {
        let port = free_port();
        let p = place(None, port).unwrap();
        assert_eq!(p.listen, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        assert_eq!(p.endpoint, format!("http://127.0.0.1:{port}"));
        // The port was let go: the model server can bind it.
        let held = TcpListener::bind(p.listen).unwrap();
        // Taken, it is refused rather than shared.
        let err = place(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), port).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(held);
    }

    #[test]
    fn an_address_that_is_not_this_machines_listens_everywhere() {
        // TEST-NET-3: never assigned to this machine.
        let port = free_port();
        let p = place(Some("203.0.113.7".parse().unwrap()), port).unwrap();
        assert!(p.listen.ip().is_unspecified());
        assert_eq!(p.listen.port(), port);
        assert_eq!(p.endpoint, format!("http://203.0.113.7:{port}"));
        let p = place(Some("2001:db8::7".parse().unwrap()), free_port());
        if let Ok(p) = p {
            assert!(p.endpoint.starts_with("http://[2001:db8::7]:"), "{p:?}");
        }
    }

    #[test]
    fn argv_names_model_server_listen_cache_and_device() {
        let launch = ModelServerLaunch::serve("/usr/bin/aigrid".into());
        let site = ServeSite {
            server: Some("http://10.0.0.1:7700".into()),
            address: None,
            ca_pem: None,
        };
        let task = ModelServerTask {
            model: "ab".repeat(32),
            auto_truncate: false,
        };
        let port = free_port();
        let (exec, endpoint) = exec_task(
            &launch,
            &site,
            Path::new("/data"),
            &alloc(&["GPU-x"], Some(port)),
            &task,
        )
        .unwrap();
        assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
        assert_eq!(exec.command, "/usr/bin/aigrid");
        let listen = format!("127.0.0.1:{port}");
        let model = "ab".repeat(32);
        let want = [
            "serve",
            "--model",
            model.as_str(),
            "--server",
            "http://10.0.0.1:7700",
            "--listen",
            listen.as_str(),
            "--cache-dir",
            "/data/model-cache",
            "--device",
            "cuda:0",
        ];
        assert_eq!(exec.args, want);
        assert!(exec.env.is_empty(), "no CA known, none handed over");
        let trusting = ServeSite {
            ca_pem: Some("-----BEGIN CERTIFICATE-----\n...".into()),
            ..site.clone()
        };
        let (exec, _) = exec_task(
            &launch,
            &trusting,
            Path::new("/data"),
            &alloc(&[], Some(port)),
            &task,
        )
        .unwrap();
        assert_eq!(
            exec.env[CA_PEM_VARIABLE],
            "-----BEGIN CERTIFICATE-----\n..."
        );
        let cpu = alloc(&[], Some(port));
        let (cpu, _) = exec_task(&launch, &site, Path::new("/data"), &cpu, &task).unwrap();
        assert_eq!(cpu.args.last().map(String::as_str), Some("cpu"));

        let truncating = ModelServerTask {
            auto_truncate: true,
            ..task.clone()
        };
        let any = alloc(&[], Some(port));
        let (exec, _) = exec_task(&launch, &site, Path::new("/data"), &any, &truncating).unwrap();
        assert_eq!(
            exec.args.last().map(String::as_str),
            Some("--auto-truncate")
        );

        let flag = ModelServerTask {
            model: "--help".into(),
            auto_truncate: false,
        };
        let any = alloc(&[], Some(port));
        assert!(exec_task(&launch, &site, Path::new("/d"), &any, &flag).is_err());
        let nowhere = ServeSite::default();
        let err = exec_task(&launch, &nowhere, Path::new("/d"), &any, &task).unwrap_err();
        assert!(err.contains("control-plane server"), "{err}");
        let portless = alloc(&[], None);
        let err = exec_task(&launch, &site, Path::new("/d"), &portless, &task).unwrap_err();
        assert!(err.contains("no port"), "{err}");
    }
}
