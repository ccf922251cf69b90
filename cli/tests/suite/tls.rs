//! The cluster CA from the command line, and the control API's HTTPS: on beyond
//! loopback, plain HTTP there only with `--insecure`.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn ca_init_makes_a_ca_once_and_issues_server_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_arg = ca.to_str().unwrap();
    let made = json_output(&aigrid(&["ca", "init", "--dir", ca_arg, "--json"]));
    let fingerprint = made["fingerprint"].as_str().unwrap().to_owned();
    assert!(fingerprint.starts_with("sha256:"), "{made}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // An existing CA is never replaced; kept on request.
    assert_one_line_failure(
        &aigrid(&["ca", "init", "--dir", ca_arg]),
        "refusing to replace",
    );
    let kept = json_output(&aigrid(&[
        "ca",
        "init",
        "--dir",
        ca_arg,
        "--keep-existing",
        "--json",
    ]));
    assert_eq!(kept["fingerprint"], fingerprint.as_str());
    // A server's own directory: no CA key in it.
    let out = dir.path().join("server-7");
    assert_success(&aigrid(&[
        "ca",
        "issue",
        "--dir",
        ca_arg,
        "--id",
        "7",
        "--host",
        "server7.example",
        "--out",
        out.to_str().unwrap(),
    ]));
    for file in ["ca.pem", "server.pem", "server.key"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    assert!(!out.join("ca.key").exists());
}

fn server(dir: &std::path::Path, port: u16, extra: &[&str]) -> Child {
    let mut args = vec![
        "server".to_owned(),
        "--id".into(),
        "1".into(),
        "--listen".into(),
        format!("0.0.0.0:{port}"),
        "--data-dir".into(),
        dir.join("data").to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(aigrid_bin())
        .args(&args)
        .env("AIGRID_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap()
}

async fn answers(client: &reqwest::Client, url: &str, child: &mut Child) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = get_json(client, &format!("{url}/api/v1/cluster")).await {
            return v;
        }
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("the server exited ({exit})");
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_api_is_https_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let mut child = server(dir.path(), port, &[]);
    // A one-server cluster made its CA in its data dir; its API is HTTPS under it.
    let ca_dir = dir.path().join("data").join("ca");
    let https = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ca_dir.join("ca.pem").is_file() {
        assert!(Instant::now() < deadline, "no CA was made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = answers(&https_client(&ca_dir), &https, &mut child).await;
    assert_eq!(status["id"], 1);
    let plain = format!("http://127.0.0.1:{port}");
    assert!(get_json(&http(), &format!("{plain}/api/v1/cluster"))
        .await
        .is_none());
    // The CLI trusts the CA it is given, and nothing else.
    let ca_pem = ca_dir.join("ca.pem");
    let out = aigrid(&[
        "cluster",
        "status",
        "--server",
        &https,
        "--ca-cert",
        ca_pem.to_str().unwrap(),
    ]);
    assert_success(&out);
    assert_one_line_failure(
        &aigrid(&["cluster", "status", "--server", &https]),
        "cannot reach",
    );
    // As an agent hands it to its model servers: the CA's PEM in the environment.
    let pem = std::fs::read_to_string(&ca_pem).unwrap();
    let with_variable = |value: &str| {
        aigrid_cmd()
            .args(["cluster", "status", "--server", &https])
            .env("AIGRID_CA_CERT_PEM", value)
            .output()
            .unwrap()
    };
    assert_success(&with_variable(&pem));
    assert_one_line_failure(&with_variable("not a certificate"), "AIGRID_CA_CERT_PEM");
    child.kill().unwrap();
    child.wait().unwrap();

    // --insecure: plain HTTP, and a warning at start.
    let mut child = server(dir.path(), port, &["--insecure"]);
    answers(&http(), &plain, &mut child).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("plain HTTP beyond loopback"), "{log}");
}
