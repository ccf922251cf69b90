//! Configuration as an operator gives it to the binary: a flag beats its `AIGRID_*`
//! variable, which beats the `--config` file, which beats the default; an unknown key
//! in the file, or a variable that does not parse, stops the role before it starts
//! anything, with one line naming the key and where it was set.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The role variables these tests set; a child gets none of them from the caller.
const ROLE_VARS: &[&str] = &[
    "AIGRID_ID",
    "AIGRID_LISTEN",
    "AIGRID_DATA_DIR",
    "AIGRID_CONFIG",
];

/// `aigrid ARGS` with only the role variables in `vars`.
fn command(args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut cmd = aigrid_cmd();
    cmd.args(args);
    for var in ROLE_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().copied());
    cmd
}

/// Waits for a server listening on `port` to answer its cluster status.
async fn answering(client: &reqwest::Client, port: u16, child: &mut Child) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let url = format!("http://127.0.0.1:{port}/api/v1/cluster");
        if let Some(status) = get_json(client, &url).await {
            return status;
        }
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("the server exited ({exit}) instead of listening on {port}");
        }
        assert!(Instant::now() < deadline, "nothing answers on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn refuses(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_beats_its_variable_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let [from_file, from_env, from_flag] = free_ports(3)[..] else {
        unreachable!()
    };
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "id = 1\nlisten = \"127.0.0.1:{from_file}\"\ndata_dir = {:?}\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let env_listen = format!("127.0.0.1:{from_env}");
    let flag_listen = format!("127.0.0.1:{from_flag}");
    let client = http();
    for (flag, var, listens) in [
        (Some(&flag_listen), Some(&env_listen), from_flag),
        (None, Some(&env_listen), from_env),
        (None, None, from_file),
    ] {
        let mut args = vec!["server", "--config", config];
        if let Some(listen) = flag {
            args.extend(["--listen", listen]);
        }
        let vars: Vec<(&str, &str)> = var
            .map(|v| ("AIGRID_LISTEN", v.as_str()))
            .into_iter()
            .collect();
        let mut server = command(&args, &vars)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let status = answering(&client, listens, &mut server).await;
        assert_eq!(status["id"], 1, "the id comes from the file: {status}");
        // One listener, bound: the other layers' addresses are not it.
        for port in [from_file, from_env, from_flag] {
            assert!(port == listens || refuses(port), "{port} answers too");
        }
        server.kill().unwrap();
        server.wait().unwrap();
    }
}

/// Runs `aigrid ARGS` and expects it to stop at once with one line containing `has`.
fn refused(args: &[&str], vars: &[(&str, &str)], has: &[&str]) {
    let out = command(args, vars).output().unwrap();
    for part in has {
        assert_one_line_failure(&out, part);
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn an_unknown_key_or_a_bad_variable_stops_every_role_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_ports(1)[0]);
    let roles: [(&str, Vec<&str>); 3] = [
        (
            "server",
            vec!["--id", "1", "--data-dir", data, "--listen", &listen],
        ),
        (
            "agent",
            vec!["--servers", "http://127.0.0.1:1", "--data-dir", data],
        ),
        (
            "up",
            vec!["--no-demo-model", "--data-dir", data, "--listen", &listen],
        ),
    ];
    for (role, flags) in &roles {
        let file = write(
            &dir.path().join(format!("{role}.toml")),
            "data_dir = \"/tmp/x\"\nbogus_key = 1\n",
        );
        let mut args = vec![*role, "--config", &file];
        args.extend(flags);
        refused(
            &args,
            &[],
            &[&format!(
                "config file {file}: unknown key `bogus_key` (known keys: "
            )],
        );
        // The file may also be named by AIGRID_CONFIG.
        let mut args = vec![*role];
        args.extend(flags);
        refused(
            &args,
            &[("AIGRID_CONFIG", &file)],
            &["unknown key `bogus_key`"],
        );
    }
    // A variable that does not parse is named, and so is a file value.
    refused(
        &["server", "--id", "1", "--data-dir", data],
        &[("AIGRID_LISTEN", "nowhere")],
        &["AIGRID_LISTEN: "],
    );
    let file = write(&dir.path().join("typed.toml"), "id = \"one\"\n");
    refused(
        &["server", "--config", &file, "--data-dir", data],
        &[],
        &[&format!("config file {file}: key `id`: ")],
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused role started nothing"
    );
}

/// A control-plane server's heap is millions of small objects: it runs without
/// transparent huge pages, which the kernel says in the process's status.
#[cfg(target_os = "linux")]
#[test]
fn a_server_runs_without_transparent_huge_pages() {
    let thp = |pid: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim().to_string())
    };
    // This test process keeps the system's setting: where the kernel has no huge
    // pages, or does not report them (before 6.x), there is nothing to compare.
    if thp("self").as_deref() != Some("1") {
        eprintln!("this kernel reports no transparent huge pages; nothing to check");
        return;
    }
    let (mut cluster, _url) = one_server();
    let pid = cluster.server(1).pid().expect("the server runs");
    assert_eq!(thp(&pid.to_string()).as_deref(), Some("0"));
}
