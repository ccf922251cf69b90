//! How a `model-server` task runs: as an `exec` task of the agent's own binary,
//!
//! ```text
//! <program> <args..> --model DIGEST --server URL --listen IP:PORT
//!     --cache-dir <data_dir>/model-cache --device cuda:0|cpu
//! ```
//!
//! so it gets everything `exec` tasks get (supervisor, logs, restarts, stops,
//! reattach after an agent restart, GPU visibility). The port is picked once, when
//! the allocation is first applied, and is part of the task from then on: in-place
//! restarts and a restarted agent use the same one, so the endpoint the control
//! plane knows stays right.
//!
//! The endpoint is reported at the address the servers reach this node at: the
//! node's `address` attribute when the operator gave one, else `127.0.0.1` (an agent
//! on the servers' own machine, as `aigrid up` runs it). The only listener this adds
//! is the workload's own serving port; the agent still accepts no inbound control
//! connection.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use aigrid_api::allocation::check_endpoint;
use aigrid_api::{Allocation, ExecTask, ModelServerTask, RestartPolicy};

use crate::sandbox::{Grants, SandboxConfig};

/// The node attribute naming the address servers reach this node's workloads at.
pub const ADDRESS_ATTRIBUTE: &str = "address";

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
    /// The node's address as servers reach it (its `address` attribute); `None`
    /// for an agent on the servers' own machine.
    pub address: Option<String>,
}

/// Where a model server listens, and the endpoint it is reported at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The address it binds.
    pub listen: SocketAddr,
    /// `http://host:port`, with the host the servers reach the node at.
    pub endpoint: String,
}

/// Picks a free port for a model server on this node: binds port 0 where it will
/// listen, takes the port and lets it go. With no address, it listens on and is
/// reported at 127.0.0.1; with an IP address it listens there (or on every
/// interface when the address is not one of this machine's, as behind NAT); with a
/// host name it listens on every interface.
pub fn place(address: Option<&str>) -> io::Result<Placement> {
    let address = address.map(str::trim).filter(|a| !a.is_empty());
    let (host, ip) = match address {
        None => ("127.0.0.1".to_owned(), IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some(a) => {
            let bare = a.trim_start_matches('[').trim_end_matches(']');
            match bare.parse::<IpAddr>() {
                Ok(ip @ IpAddr::V6(_)) => (format!("[{ip}]"), ip),
                Ok(ip) => (ip.to_string(), ip),
                Err(_) => (a.to_owned(), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            }
        }
    };
    let listener = match TcpListener::bind((ip, 0)) {
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            let any = match ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            TcpListener::bind((any, 0))?
        }
        other => other?,
    };
    let listen = listener.local_addr()?;
    drop(listener);
    let endpoint = format!("http://{host}:{}", listen.port());
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
/// server to name, the model could be read as a flag, or no port is free.
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
    let placement = place(site.address.as_deref())
        .map_err(|e| format!("cannot pick a port for the model server: {e}"))?;
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
    let exec = ExecTask {
        command: launch.program.to_string_lossy().into_owned(),
        args,
        env: Default::default(),
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

    fn alloc(gpus: &[&str]) -> Allocation {
        crate::testkit::allocation("a-1", "run", gpus)
    }

    fn port(endpoint: &str) -> u16 {
        endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    #[test]
    fn a_local_agent_listens_and_is_reached_on_loopback() {
        let p = place(None).unwrap();
        assert_eq!(p.listen.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(p.endpoint, format!("http://127.0.0.1:{}", p.listen.port()));
        assert_ne!(p.listen.port(), 0);
        // The port was let go: the model server can bind it.
        TcpListener::bind(p.listen).unwrap();
    }

    #[test]
    fn an_address_that_is_not_this_machines_listens_everywhere() {
        // TEST-NET-3: never assigned to this machine.
        let p = place(Some("203.0.113.7")).unwrap();
        assert!(p.listen.ip().is_unspecified());
        assert_eq!(
            p.endpoint,
            format!("http://203.0.113.7:{}", p.listen.port())
        );
        let p = place(Some("gpu-7.example")).unwrap();
        assert!(p.listen.ip().is_unspecified());
        assert!(p.endpoint.starts_with("http://gpu-7.example:"));
        let p = place(Some("127.0.0.1")).unwrap();
        assert_eq!(p.listen.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn argv_names_model_server_listen_cache_and_device() {
        let launch = ModelServerLaunch::serve("/usr/bin/aigrid".into());
        let site = ServeSite {
            server: Some("http://10.0.0.1:7700".into()),
            address: None,
        };
        let task = ModelServerTask {
            model: "ab".repeat(32),
        };
        let (exec, endpoint) = exec_task(
            &launch,
            &site,
            Path::new("/data"),
            &alloc(&["GPU-x"]),
            &task,
        )
        .unwrap();
        let p = port(&endpoint);
        assert_eq!(exec.command, "/usr/bin/aigrid");
        let listen = format!("127.0.0.1:{p}");
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
        let (cpu, _) = exec_task(&launch, &site, Path::new("/data"), &alloc(&[]), &task).unwrap();
        assert_eq!(cpu.args.last().map(String::as_str), Some("cpu"));

        let flag = ModelServerTask {
            model: "--help".into(),
        };
        assert!(exec_task(&launch, &site, Path::new("/d"), &alloc(&[]), &flag).is_err());
        let nowhere = ServeSite::default();
        let err = exec_task(&launch, &nowhere, Path::new("/d"), &alloc(&[]), &task).unwrap_err();
        assert!(err.contains("control-plane server"), "{err}");
    }
}
