//! The web console in a real browser (headless Chromium through chromedriver): the
//! pages of an `aigrid up` with simulated GPUs and its demo model, a stranger's
//! browser refused, and a stakeholder who imports their identity key, reads a
//! pending proposal whose digest the browser recomputed, and approves it; the
//! change applies. Screenshots of every page land in
//! `$CARGO_TARGET_TMPDIR/console` (or `$AIGRID_CONSOLE_SHOTS`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// chromedriver on a port of its own, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = free_ports(1)[0];
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({e}): the console's test drives Debian's \
                     `chromium` and `chromium-driver` (apt-get install chromium chromium-driver)"
                )
            });
        let url = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .into_iter()
        .find(|b| Path::new(b).exists())
        .expect("no chromium binary (apt-get install chromium)");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

/// Waits until the element `css` shows text containing `what`; answers the text.
async fn text_of(c: &Client, css: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(el) = c.find(Locator::Css(css)).await {
            if let Ok(text) = el.text().await {
                if text.contains(what) {
                    return text;
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = c.source().await.unwrap_or_default();
    panic!("`{css}` never showed `{what}`; it showed `{last}`\n--- page ---\n{page}");
}

struct Shots(PathBuf);

impl Shots {
    async fn take(&self, c: &Client, name: &str) {
        c.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        std::fs::write(self.0.join(format!("{name}.png")), png).unwrap();
    }
}

async fn import_key(c: &Client, server: &str, file: &Path) {
    c.goto(&format!("{server}/ui/#/key")).await.unwrap();
    let area = c.wait().for_element(Locator::Id("key-file")).await.unwrap();
    area.send_keys(&std::fs::read_to_string(file).unwrap())
        .await
        .unwrap();
    c.find(Locator::Id("import-key"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stakeholder_approves_a_proposal_in_the_browser_and_it_applies() {
    let root = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let server = format!("http://{listen}");
    let log = root.path().join("up.log");
    let marker = format!("AIGRID_TEST_CONSOLE_{port}");
    let _reapers = up_reapers(root.path(), &server, &marker);
    let data = root.path().join("data");
    let mut up = spawn_logged(
        &[
            "up".into(),
            "--listen".into(),
            listen.clone().into(),
            "--data-dir".into(),
            data.clone().into(),
            "--simulate-gpus".into(),
            "2xH100-80GB".into(),
            "--attr".into(),
            "site=ghent".into(),
            "--repair-interval-secs".into(),
            "1".into(),
        ],
        &log,
    );
    let admin = |args: &[&str]| aigrid_at(&server, args);
    eventually(Duration::from_secs(60), "up's node", || {
        let out = admin(&["node", "ls", "--json"]);
        (out.status.success() && !json_output(&out).as_array()?.is_empty()).then_some(())
    });

    // Alice and Bob make a 2-of-2 circle; Mallory is known to the cluster but not
    // in it; a stranger's key is known to nobody.
    let (alice, alice_pub) = new_person(root.path(), "alice");
    let (bob, bob_pub) = new_person(root.path(), "bob");
    let (mallory, mallory_pub) = new_person(root.path(), "mallory");
    let (stranger, _) = new_person(root.path(), "stranger");
    assert_success(&admin(&[
        "circle",
        "create",
        "lab",
        "--member",
        &alice_pub,
        "--member",
        &bob_pub,
        "--threshold",
        "2",
    ]));
    assert_success(&admin(&["identity", "add", "mallory", &mallory_pub]));
    // Alice proposes a job of the circle and approves it herself: one of two.
    let job = json!({
        "name": "trainer", "kind": "service", "circle": "lab",
        "groups": [{"name": "main", "count": 1,
                    "resources": {"cpu_millis": 100, "memory_mib": 64},
                    "task": {"driver": "exec", "command": "/bin/sleep", "args": ["300"],
                             "env": {marker.as_str(): "1"}}}]
    });
    let job_file = root.path().join("trainer.json");
    std::fs::write(&job_file, job.to_string()).unwrap();
    let proposed = json_output(&as_person(
        &alice,
        &server,
        &["job", "submit", job_file.to_str().unwrap(), "--json"],
    ));
    let id = proposed["proposal"].as_str().unwrap().to_owned();
    let digest = proposed["digest"].as_str().unwrap().to_owned();
    assert_success(&as_person(&alice, &server, &["proposal", "approve", &id]));

    let driver = Driver::start();
    let shots = Shots(
        std::env::var_os("AIGRID_CONSOLE_SHOTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("console")),
    );
    std::fs::create_dir_all(&shots.0).unwrap();
    let profile = root.path().join("chromium");
    let c = browser(&driver, &profile).await;

    // Anyone gets the page and the cluster's public facts; the console's files
    // forbid framing and inline script.
    c.goto(&format!("{server}/ui")).await.unwrap();
    text_of(&c, "#leader", "1").await;
    text_of(&c, "main", "Members").await;
    shots.take(&c, "cluster").await;
    let page = reqwest::get(format!("{server}/ui/")).await.unwrap();
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    // Without a key, a member's page asks for one; with a key nobody knows, the
    // API refuses it (401) and nothing is shown.
    c.goto(&format!("{server}/ui/#/jobs")).await.unwrap();
    text_of(&c, "main", "Import your identity key").await;
    import_key(&c, &server, &stranger).await;
    text_of(&c, "#who", "stranger").await;
    c.goto(&format!("{server}/ui/#/proposals/{id}"))
        .await
        .unwrap();
    text_of(&c, "main", "401").await;
    assert!(!c.source().await.unwrap().contains(&digest));
    // Mallory is known but not in the circle: 403, and no payload.
    import_key(&c, &server, &mallory).await;
    text_of(&c, "#who", "mallory").await;
    c.goto(&format!("{server}/ui/#/proposals/{id}"))
        .await
        .unwrap();
    text_of(&c, "main", "403").await;
    assert!(!c.source().await.unwrap().contains(&digest));

    // Bob imports his key and looks around.
    import_key(&c, &server, &bob).await;
    text_of(&c, "#who", "bob").await;
    shots.take(&c, "key").await;
    for (page, shows) in [
        ("nodes", "H100"),
        // The demo model, with its shards as the repair loop last found them.
        ("models", "shards checked"),
        ("circles", "lab"),
        ("proposals", &id),
    ] {
        c.goto(&format!("{server}/ui/#/{page}")).await.unwrap();
        text_of(&c, "main", shows).await;
        shots.take(&c, page).await;
    }
    // The circle's page: its quota beside what it holds, and its treasury.
    assert_success(&admin(&[
        "treasury", "deposit", "lab", "250", "--memo", "grant",
    ]));
    assert_success(&admin(&["circle", "quota", "lab", "--gpus", "H100=1"]));
    c.goto(&format!("{server}/ui/#/circles/lab")).await.unwrap();
    text_of(&c, "#circle-treasury", "250").await;
    text_of(&c, "#circle-usage", "GPUs H100").await;
    shots.take(&c, "circle").await;
    let node = json_output(&admin(&["node", "ls", "--json"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.goto(&format!("{server}/ui/#/nodes/{node}"))
        .await
        .unwrap();
    text_of(&c, "main", "NVIDIA H100").await;
    shots.take(&c, "node").await;

    // The proposal: its payload (the secret as a commitment), the digest the
    // server claims and the browser's own check of it.
    c.goto(&format!("{server}/ui/#/proposals/{id}"))
        .await
        .unwrap();
    text_of(&c, "#proposal-digest", &digest).await;
    text_of(&c, "#digest-check", "matches").await;
    let payload = text_of(&c, "#proposal-payload", "/bin/sleep").await;
    assert!(payload.contains("<secret sha256:"), "{payload}");
    text_of(&c, "#proposal-weight", "1 of 2").await;
    shots.take(&c, "proposal").await;
    c.find(Locator::Id("approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&c, "#proposal-state", "applied").await;
    text_of(&c, "#proposal-weight", "2 of 2").await;
    shots.take(&c, "proposal-applied").await;

    // Applied: the job exists, and the CLI agrees with what the browser showed.
    let shown = json_output(&as_person(
        &bob,
        &server,
        &["proposal", "show", &id, "--json"],
    ));
    assert_eq!(shown["state"], "applied", "{shown}");
    let approvals = shown["approvals"].as_array().unwrap();
    assert_eq!(approvals.len(), 2, "{shown}");
    assert_success(&admin(&["job", "status", "trainer"]));
    // The jobs page shows it without a reload.
    c.goto(&format!("{server}/ui/#/jobs")).await.unwrap();
    text_of(&c, "main", "trainer").await;
    shots.take(&c, "jobs").await;
    c.goto(&format!("{server}/ui/#/jobs/trainer"))
        .await
        .unwrap();
    text_of(&c, "main", "Allocations").await;
    shots.take(&c, "job").await;
    // An allocation's logs, through the link on the job's page.
    let alloc = json_output(&admin(&["job", "status", "trainer", "--json"]))["allocations"][0]
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.find(Locator::Css(&format!("a[href=\"#/allocation/{alloc}\"]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_of(&c, "main", "stderr").await;
    shots.take(&c, "logs").await;

    // A scaled service of the demo model: idle for a second, it goes to zero, and
    // its page shows its scaling and the change with its reason.
    let demo = eventually(Duration::from_secs(120), "the demo model", || {
        let out = admin(&["model", "ls", "--json"]);
        let models = json_output(&out);
        models.as_array()?.first()?["digest"]
            .as_str()
            .map(str::to_owned)
    });
    let chat = json!({
        "name": "chat", "kind": "service",
        "groups": [{"name": "llm", "count": 1,
                    "scaling": {"min": 0, "max": 2, "target_concurrency": 4,
                                "scale_down_window": "1s", "idle_to_zero": "1s"},
                    "resources": {"cpu_millis": 100, "memory_mib": 256},
                    "task": {"driver": "model-server", "model": demo}}]
    });
    let chat_file = root.path().join("chat.json");
    std::fs::write(&chat_file, chat.to_string()).unwrap();
    assert_success(&admin(&["job", "submit", chat_file.to_str().unwrap()]));
    eventually(Duration::from_secs(60), "chat scaled to zero", || {
        let job = json_output(&admin(&["job", "status", "chat", "--json"]));
        (job["spec"]["groups"][0]["count"] == 0).then_some(())
    });
    // A job without a circle is the admins': the admin signs in to read it.
    import_key(&c, &server, common::identity::admin_identity_file()).await;
    c.goto(&format!("{server}/ui/#/jobs/chat")).await.unwrap();
    text_of(&c, "main", "no request for 1s").await;
    text_of(&c, "main", "0..2").await;
    shots.take(&c, "job-scaling").await;

    c.close().await.unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status();
    let _ = up.wait();
}
