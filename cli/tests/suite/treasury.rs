//! Treasuries end to end: a real server and a priced agent with simulated GPUs. A
//! circle's deposit pays for its GPU work, settled to the node's farmer; a spent
//! circle's new work is held and its running work stopped after the grace
//! period, until a deposit; credits leave a circle only through its quorum; the
//! ledger sums to zero; strangers and other members are refused.

use crate::common;

use std::time::Duration;

use common::agents::*;
use common::*;
use serde_json::{json, Value};

fn amount(v: &Value) -> f64 {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn a_circles_gpu_work_is_paid_for_held_when_spent_and_resumed_by_a_deposit() {
    // The farmer's key exists before the node that pays it.
    let keys = tempfile::tempdir().unwrap();
    let (farmer, farmer_pub) = new_person(keys.path(), "fiona");
    let farmer_id = person_id(&farmer);
    // One credit per GPU-second; CPU and memory free.
    let OneNode {
        cluster: _cluster,
        urls,
        rt,
        root,
        marker,
        reaper: _reaper,
        agent: _agent,
    } = one_node_with(
        &[
            "--meter-every-ms",
            "200",
            "--settle-every-ms",
            "1000",
            "--treasury-grace-ms",
            "3000",
        ],
        "farm-node",
        &[
            "--simulate-gpus",
            "2xH100-80GB",
            "--price",
            "gpu.*=3600",
            "--farmer",
            &farmer_id,
        ],
    );
    let s = urls[0].as_str();
    eventually(Duration::from_secs(20), "the node registered", || {
        let nodes = cli_json(s, &["node", "ls"]);
        (nodes.as_array().unwrap().len() == 1).then_some(())
    });
    let node = cli_json(s, &["node", "status", "farm-node"]);
    assert_eq!(node["offer"]["prices"]["gpu_hour"]["*"], "3600", "{node}");
    assert_eq!(node["offer"]["farmer"], farmer_id.as_str());
    let shown = assert_success(&cli(s, &["node", "status", "farm-node"]));
    assert!(
        shown.contains(&format!(
            "gpu.*=3600 credits per hour, paid to farmer:{farmer_id}"
        )),
        "{shown}"
    );

    assert_success(&cli(s, &["identity", "add", "fiona", &farmer_pub]));
    let viewer = member_of(s, root.path(), "vera", "ml", "viewer");

    // Without a deposit the circle has no treasury. Only admins deposit; bad
    // amounts are refused before anything is sent.
    let closed = cli_json(s, &["treasury", "show", "ml"]);
    assert_eq!(closed["open"], false, "{closed}");
    assert_one_line_failure(
        &as_person(&viewer, s, &["treasury", "deposit", "ml", "5"]),
        "(forbidden)",
    );
    let stranger = root.path().join("stranger.json");
    common::identity::write_key_file(&stranger, "eve", &common::identity::stranger_key());
    assert_one_line_failure(
        &as_person(&stranger, s, &["treasury", "show", "ml"]),
        "(unauthorized)",
    );
    for bad in ["abc", "0", "1.0000001", "1e3"] {
        assert_one_line_failure(&cli(s, &["treasury", "deposit", "ml", bad]), "amount");
    }
    assert_one_line_failure(
        &cli(s, &["treasury", "deposit", "nobody", "5"]),
        "not found",
    );
    let opened = cli_json(
        s,
        &["treasury", "deposit", "ml", "6", "--memo", "invoice 1"],
    );
    assert_eq!(opened["balance"], "6", "{opened}");

    // A one-GPU job runs, and what it uses is settled to the farmer.
    let resources = json!({"cpu_millis": 200, "memory_mib": 64, "gpus": {"count": 1}});
    let mut job = sleeper("train", &marker, resources.clone(), 600);
    job["circle"] = json!("ml");
    assert_success(&cli(
        s,
        &[
            "job",
            "submit",
            job_file(root.path(), &job).to_str().unwrap(),
        ],
    ));
    eventually(Duration::from_secs(30), "the instance running", || {
        running(s, "train", 1)
    });
    let paid = eventually(Duration::from_secs(20), "a settlement", || {
        let page = json_output(&as_person(
            &farmer,
            s,
            &["treasury", "farmer", &farmer_id, "--json"],
        ));
        (amount(&page["balance"]) > 0.0).then_some(page)
    });
    assert_eq!(paid["entries"][0]["from"], "circle:ml", "{paid}");
    assert_eq!(paid["entries"][0]["kind"], "settlement", "{paid}");
    // Another farmer's earnings are not the viewer's to read.
    assert_one_line_failure(
        &as_person(&viewer, s, &["treasury", "farmer", &farmer_id]),
        "(forbidden)",
    );
    let seen = json_output(&as_person(
        &viewer,
        s,
        &["treasury", "show", "ml", "--json"],
    ));
    assert_eq!(amount(&seen["rate_per_hour"]), 3600.0, "{seen}");

    // Spent: new work is held with the reason, and after the grace period the
    // running instance is asked to stop.
    let held = eventually(Duration::from_secs(30), "the circle held", || {
        let view = cli_json(s, &["treasury", "show", "ml"]);
        view["hold"].is_string().then_some(view)
    });
    assert!(amount(&held["available"]) <= 0.0, "{held}");
    let mut second = sleeper("eval", &marker, resources, 600);
    second["circle"] = json!("ml");
    assert_success(&cli(
        s,
        &[
            "job",
            "submit",
            job_file(root.path(), &second).to_str().unwrap(),
        ],
    ));
    let why = eventually(Duration::from_secs(20), "the new job left unplaced", || {
        let status = cli_json(s, &["job", "status", "eval"]);
        let reason = status["unplaced"][0]["reason"].as_str().map(str::to_owned);
        reason.filter(|r| r.contains("treasury is spent"))
    });
    assert!(why.contains("deposit"), "{why}");
    eventually(
        Duration::from_secs(20),
        "the running instance stopped",
        || {
            let status = cli_json(s, &["job", "status", "train"]);
            let allocs = status["allocations"].as_array().unwrap().clone();
            allocs.iter().all(|a| a["desired"] == "stop").then_some(())
        },
    );
    let human = assert_success(&cli(s, &["treasury", "show", "ml"]));
    assert!(
        human.contains("held") && human.contains("stopped"),
        "{human}"
    );

    // A deposit lifts the hold: both jobs run.
    cli_json(
        s,
        &["treasury", "deposit", "ml", "1000", "--memo", "invoice 2"],
    );
    eventually(Duration::from_secs(30), "both jobs running again", || {
        running(s, "train", 1).and(running(s, "eval", 1))
    });

    // Every entry debits what it credits.
    let accounts = cli_json(s, &["treasury", "accounts"]);
    assert_eq!(accounts["sum"], "0", "{accounts}");
    assert_eq!(accounts["balances"]["external"], "-1006", "{accounts}");
    let ledger = json_output(&as_person(
        &viewer,
        s,
        &["treasury", "ledger", "ml", "--json"],
    ));
    let kinds: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"deposit") && kinds.contains(&"settlement"),
        "{ledger}"
    );
    assert_one_line_failure(
        &as_person(&viewer, s, &["treasury", "accounts"]),
        "(forbidden)",
    );
    let metrics = metrics_text(&rt, s);
    assert!(
        metrics.contains("aigrid_treasury_balance_credits{account=\"external\"} -1006"),
        "{metrics}"
    );

    // Credits leave a circle only through a quorum: an ungoverned circle cannot.
    assert_one_line_failure(
        &cli(s, &["treasury", "transfer", "ml", "external", "1"]),
        "not governed",
    );
    assert_one_line_failure(
        &cli(s, &["treasury", "transfer", "ml", "bank:x", "1"]),
        "an account",
    );
}

#[test]
fn a_transfer_out_applies_only_once_the_circles_quorum_approves() {
    let (_cluster, s) = one_server();
    let root = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = new_person(root.path(), "alice");
    let (bob, bob_pub) = new_person(root.path(), "bob");
    // A 2-of-2 circle whose policy guards nothing it may drop: transfers stay
    // guarded anyway.
    let made = json_output(&aigrid_at(
        &s,
        &[
            "circle",
            "create",
            "lab",
            "--member",
            &alice_pub,
            "--member",
            &bob_pub,
            "--threshold",
            "2",
            "--json",
        ],
    ));
    assert!(
        made["policy"]["guarded"]
            .as_array()
            .unwrap()
            .contains(&json!("treasury.transfer")),
        "{made}"
    );
    assert_success(&aigrid_at(&s, &["treasury", "deposit", "lab", "10"]));

    // More than it holds is refused; an amount it holds is proposed, not applied.
    assert_one_line_failure(
        &as_person(
            &alice,
            &s,
            &["treasury", "transfer", "lab", "external", "11"],
        ),
        "available",
    );
    let proposed = json_output(&as_person(
        &alice,
        &s,
        &[
            "treasury",
            "transfer",
            "lab",
            "circle:ml",
            "4",
            "--memo",
            "grant",
            "--json",
        ],
    ));
    assert_eq!(proposed["kind"], "treasury.transfer", "{proposed}");
    let id = proposed["proposal"].as_str().unwrap().to_owned();
    let view = json_output(&as_person(&bob, &s, &["treasury", "show", "lab", "--json"]));
    assert_eq!(
        view["balance"], "10",
        "nothing moves before the quorum: {view}"
    );
    assert_success(&as_person(&alice, &s, &["proposal", "approve", &id]));
    assert_success(&as_person(&bob, &s, &["proposal", "approve", &id]));
    let after = eventually(Duration::from_secs(10), "the transfer applied", || {
        let v = json_output(&as_person(&bob, &s, &["treasury", "show", "lab", "--json"]));
        (v["balance"] == "6").then_some(v)
    });
    assert_eq!(after["spent_24h"], "4", "{after}");
    let ledger = json_output(&as_person(
        &alice,
        &s,
        &["treasury", "ledger", "lab", "--json"],
    ));
    assert_eq!(ledger["entries"][0]["kind"], "transfer", "{ledger}");
    assert_eq!(ledger["entries"][0]["to"], "circle:ml", "{ledger}");
    assert_eq!(ledger["entries"][0]["memo"], "grant", "{ledger}");
    let accounts = json_output(&aigrid_at(&s, &["treasury", "accounts", "--json"]));
    assert_eq!(accounts["sum"], "0", "{accounts}");
    assert_eq!(accounts["balances"]["circle:ml"], "4", "{accounts}");
}
