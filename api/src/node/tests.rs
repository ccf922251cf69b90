use super::*;
use serde_json::json;

fn registration() -> serde_json::Value {
    json!({
        "id": "node-1",
        "name": "gpu-box-1",
        "attributes": {"country": "BE", "site": "ghent"},
        "resources": {
            "cpu_millis": 64000, "memory_mib": 512000, "disk_mib": 2000000,
            "gpus": [
                {"index": 0, "uuid": "GPU-a", "vendor": "nvidia", "model": "H100",
                 "memory_mib": 81920, "healthy": true},
                {"index": 1, "uuid": "GPU-b", "vendor": "nvidia", "model": "H100",
                 "memory_mib": 81920, "healthy": true, "numa_node": 1,
                 "interconnect_group": "nvl-0", "mig_capable": true}
            ]
        }
    })
}

fn blamed(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = registration();
    edit(&mut v);
    let reg: NodeRegistration = serde_json::from_value(v).unwrap();
    reg.validate().unwrap_err().field
}

#[test]
fn registration_parses_and_validates() {
    let reg: NodeRegistration = serde_json::from_value(registration()).unwrap();
    reg.validate().unwrap();
    assert_eq!(reg.resources.gpus.len(), 2);
    let (old, new) = (&reg.resources.gpus[0], &reg.resources.gpus[1]);
    assert_eq!(
        (old.numa_node, old.interconnect_group.as_deref()),
        (None, None)
    );
    assert!(!old.mig_capable);
    assert_eq!(new.numa_node, Some(1));
    assert_eq!(new.interconnect_group.as_deref(), Some("nvl-0"));
    assert!(new.mig_capable);
    let json = serde_json::to_value(old).unwrap();
    assert!(json.get("numa_node").is_none() && json.get("mig_capable").is_none());
    let mut v = registration();
    v["extra"] = json!(true);
    assert!(serde_json::from_value::<NodeRegistration>(v).is_err());
}

#[test]
fn protections_are_optional_and_read_as_one_line() {
    let reg: NodeRegistration = serde_json::from_value(registration()).unwrap();
    assert_eq!(reg.protections, None, "an older agent sends none");
    let mut v = registration();
    v["protections"] = json!({"landlock_abi": 7, "per_allocation_uid": true});
    let reg: NodeRegistration = serde_json::from_value(v).unwrap();
    let p = reg.protections.unwrap();
    assert_eq!(p.summary(), "landlock abi 7, per-allocation uid");
    let none = NodeProtections {
        landlock_abi: None,
        sandbox_reason: Some("kernel has no Landlock".into()),
        per_allocation_uid: false,
        uid_reason: Some("agent not root".into()),
    };
    assert_eq!(
        none.summary(),
        "none (kernel has no Landlock), shared uid (agent not root)"
    );
    let back: NodeProtections =
        serde_json::from_value(serde_json::to_value(&none).unwrap()).unwrap();
    assert_eq!(back, none);
}

#[test]
fn port_ranges_parse_validate_and_default() {
    let r: PortRange = "30000-30099".parse().unwrap();
    assert_eq!((r.first, r.last, r.len()), (30_000, 30_099, 100));
    assert!(r.contains(30_000) && r.contains(30_099) && !r.contains(30_100));
    assert_eq!(r.to_string(), "30000-30099");
    let one: PortRange = "8080".parse().unwrap();
    assert_eq!((one.first, one.last, one.len()), (8080, 8080, 1));
    let all: PortRange = "1-65535".parse().unwrap();
    assert_eq!(all.len(), 65_535);
    for bad in ["", "0-10", "20-10", "1-65536", "a-b", "10-", "-10", "1-2-3"] {
        assert_eq!(
            bad.parse::<PortRange>().unwrap_err().field,
            "ports",
            "{bad}"
        );
    }
    assert_eq!(PortRange::default(), PortRange::DEFAULT);
    const {
        assert!(
            PortRange::DEFAULT.last < 32_768,
            "below the ephemeral ports"
        )
    };

    let reg: NodeRegistration = serde_json::from_value(registration()).unwrap();
    assert_eq!(reg.ports, None);
    let mut v = registration();
    v["ports"] = json!({"first": 40000, "last": 40010});
    let reg: NodeRegistration = serde_json::from_value(v).unwrap();
    reg.validate().unwrap();
    assert_eq!(reg.ports.unwrap().len(), 11);
    assert_eq!(
        blamed(|v| v["ports"] = json!({"first": 2, "last": 1})),
        "ports"
    );
    // Where the node is reached is not the agent's to say.
    let mut v = registration();
    v["address"] = json!("203.0.113.7");
    assert!(serde_json::from_value::<NodeRegistration>(v).is_err());
    assert_eq!(
        workload_endpoint("10.0.0.7".parse().unwrap(), 20_417),
        "http://10.0.0.7:20417"
    );
    assert_eq!(
        workload_endpoint("fd00::7".parse().unwrap(), 20_417),
        "http://[fd00::7]:20417"
    );
}

#[test]
fn drain_defaults_and_bounds() {
    let d: DrainSpec = serde_json::from_value(json!({})).unwrap();
    assert_eq!(d, DrainSpec::default());
    assert_eq!(d.max_parallel, 1);
    d.validate().unwrap();
    let zero: DrainSpec = serde_json::from_value(json!({"max_parallel": 0})).unwrap();
    assert_eq!(zero.validate().unwrap_err().field, "max_parallel");
    let many: DrainSpec =
        serde_json::from_value(json!({"max_parallel": MAX_DRAIN_PARALLEL + 1})).unwrap();
    assert!(many.validate().is_err());
    assert!(serde_json::from_value::<DrainSpec>(json!({"parallel": 2})).is_err());
}

#[test]
fn heartbeat_parses_and_validates() {
    let hb: Heartbeat = serde_json::from_value(json!({
        "gpus": [{"uuid": "GPU-a", "healthy": false, "reason": "XID 79"}],
        "allocations": [{"id": "a1", "state": "running"}]
    }))
    .unwrap();
    hb.validate().unwrap();
    assert_eq!(hb.gpus[0].reason.as_deref(), Some("XID 79"));
    let empty: Heartbeat = serde_json::from_value(json!({})).unwrap();
    assert_eq!(empty, Heartbeat::default());
    let blank: Heartbeat =
        serde_json::from_value(json!({"gpus": [{"uuid": " ", "healthy": true}]})).unwrap();
    assert_eq!(blank.validate().unwrap_err().field, "gpus[0].uuid");
    assert!(serde_json::from_value::<Heartbeat>(json!({"load": 1})).is_err());
    assert!(serde_json::from_value::<Heartbeat>(
        json!({"gpus": [{"uuid": "GPU-a", "healthy": true, "temp": 80}]})
    )
    .is_err());
}

#[test]
fn registration_rules_name_the_field() {
    assert_eq!(blamed(|v| v["id"] = json!("")), "id");
    assert_eq!(blamed(|v| v["id"] = json!("a/b")), "id");
    assert_eq!(blamed(|v| v["name"] = json!(" ")), "name");
    assert_eq!(blamed(|v| v["attributes"] = json!({"": "x"})), "attributes");
    assert_eq!(
        blamed(|v| v["resources"]["cpu_millis"] = json!(0)),
        "resources.cpu_millis"
    );
    assert_eq!(
        blamed(|v| v["resources"]["memory_mib"] = json!(0)),
        "resources.memory_mib"
    );
    assert_eq!(
        blamed(|v| v["resources"]["gpus"][1]["uuid"] = json!("GPU-a")),
        "resources.gpus[1].uuid"
    );
    assert_eq!(
        blamed(|v| v["resources"]["gpus"][1]["index"] = json!(0)),
        "resources.gpus[1].index"
    );
    assert_eq!(
        blamed(|v| v["resources"]["gpus"][1]["interconnect_group"] = json!("")),
        "resources.gpus[1].interconnect_group"
    );
}
