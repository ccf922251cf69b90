//! The job specification's parsing, defaults and validation, end to end.

use super::*;
use crate::units::{MemoryMib, MilliCpu};
use serde_json::json;

const DIGEST: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

/// The example job of DESIGN.md, verbatim.
fn design_example() -> serde_json::Value {
    json!({
      "name": "llama-chat",
      "kind": "service",
      "priority": 50,
      "circle": "vision-lab",
      "groups": [{
        "name": "replica",
        "count": 2,
        "gang": false,
        "resources": {"cpu_millis": 2000, "memory_mib": 8192,
                      "gpus": {"count": 1, "model": "H100", "min_memory_mib": 40000}},
        "constraints": [{"attribute": "country", "op": "in", "value": ["BE", "NL"]}],
        "spread": [{"attribute": "site"}],
        "task": {"driver": "exec", "command": "/usr/bin/python3", "args": ["serve.py"],
                 "env": {"MODE": "prod"}, "artifacts": [{"source": "...", "blake3": "..."}]}
      }]
    })
}

fn valid() -> serde_json::Value {
    let mut v = design_example();
    v["groups"][0]["task"]["artifacts"][0]["blake3"] = json!(DIGEST);
    v
}

fn parse(v: serde_json::Value) -> Result<JobSpec, serde_json::Error> {
    serde_json::from_value(v)
}

#[test]
fn design_example_parses_and_names_the_bad_digest() {
    let spec = parse(design_example()).unwrap();
    assert_eq!(spec.name, "llama-chat");
    assert_eq!(spec.kind, JobKind::Service);
    assert_eq!(spec.circle.as_deref(), Some("vision-lab"));
    let group = &spec.groups[0];
    assert_eq!(group.count, 2);
    assert_eq!(group.resources.cpu_millis, MilliCpu::new(2000));
    let gpus = group.resources.gpus.as_ref().unwrap();
    assert_eq!(gpus.min_memory_mib, Some(MemoryMib::new(40000)));
    assert_eq!(group.constraints[0].op, ConstraintOp::In);
    assert_eq!(
        group.constraints[0].value,
        ConstraintValue::Many(vec!["BE".into(), "NL".into()])
    );
    assert!(matches!(&group.task, TaskSpec::Exec(e) if e.env["MODE"] == "prod"));
    let err = spec.validate().unwrap_err();
    assert_eq!(err.field, "groups[0].task.artifacts[0].blake3");
    parse(valid()).unwrap().validate().unwrap();
    // Once its size is checked, the rules alone give the same answers.
    assert_eq!(spec.validate_sized().unwrap_err().field, err.field);
    parse(valid()).unwrap().validate_sized().unwrap();
}

#[test]
fn a_spec_read_from_json_bytes_keeps_no_spare_room_in_its_lists() {
    // The state keeps every job's spec as it was read from a log entry or a
    // snapshot: room a list grew while it was read is kept with it.
    let mut v = valid();
    v["groups"][0]["affinities"] =
        json!([{"attribute": "site", "op": "=", "value": "a", "weight": 10}]);
    let spec: JobSpec = serde_json::from_slice(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(spec.groups.capacity(), 1);
    let group = &spec.groups[0];
    assert_eq!(group.constraints.capacity(), 1);
    assert_eq!(group.spread.capacity(), 1);
    assert_eq!(group.affinities.capacity(), 1);
    let TaskSpec::Exec(task) = &group.task else {
        panic!("an exec task")
    };
    assert_eq!(task.args.capacity(), 1);
    assert_eq!(task.artifacts.capacity(), 1);
}

#[test]
fn toml_has_the_same_shape() {
    let text = format!(
        r#"
name = "llama-chat"
kind = "service"
priority = 50
circle = "vision-lab"

[[groups]]
name = "replica"
count = 2
gang = false
resources = {{ cpu_millis = 2000, memory_mib = 8192, gpus = {{ count = 1, model = "H100", min_memory_mib = 40000 }} }}
constraints = [{{ attribute = "country", op = "in", value = ["BE", "NL"] }}]
spread = [{{ attribute = "site" }}]

[groups.task]
driver = "exec"
command = "/usr/bin/python3"
args = ["serve.py"]
env = {{ MODE = "prod" }}
artifacts = [{{ source = "...", blake3 = "{DIGEST}" }}]
"#
    );
    let from_toml: JobSpec = toml::from_str(&text).unwrap();
    assert_eq!(from_toml, parse(valid()).unwrap());
    let round = toml::to_string(&from_toml).unwrap();
    assert_eq!(toml::from_str::<JobSpec>(&round).unwrap(), from_toml);
}

#[test]
fn toml_rejects_unknown_keys_inside_the_task() {
    let text = r#"
name = "j"
[[groups]]
name = "g"
resources = { cpu_millis = 1, memory_mib = 1 }
[groups.task]
driver = "model-server"
model = "m"
replicas = 3
"#;
    let err = toml::from_str::<JobSpec>(text).unwrap_err();
    assert!(err.to_string().contains("replicas"), "{err}");
}

#[test]
fn defaults_fill_omitted_fields() {
    let spec = parse(json!({
        "name": "j",
        "groups": [{"name": "g", "resources": {"cpu_millis": 100, "memory_mib": 64},
                    "task": {"driver": "model-server", "model": "blake3:abc"}}]
    }))
    .unwrap();
    assert_eq!(spec.kind, JobKind::Service);
    assert_eq!(spec.priority, DEFAULT_PRIORITY);
    assert_eq!(spec.groups[0].count, 1);
    assert!(!spec.groups[0].gang);
    assert_eq!(spec.instance_count(), 1);
    spec.validate().unwrap();
}

#[test]
fn json_round_trip_is_lossless() {
    let spec = parse(valid()).unwrap();
    let text = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<JobSpec>(&text).unwrap(), spec);
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    let places: &[&[&str]] = &[
        &[],
        &["groups", "0"],
        &["groups", "0", "resources"],
        &["groups", "0", "resources", "gpus"],
        &["groups", "0", "constraints", "0"],
        &["groups", "0", "spread", "0"],
        &["groups", "0", "task"],
        &["groups", "0", "task", "artifacts", "0"],
    ];
    for place in places {
        let mut v = valid();
        let mut target = &mut v;
        for key in *place {
            target = match key.parse::<usize>() {
                Ok(i) => &mut target[i],
                Err(_) => &mut target[*key],
            };
        }
        target["surprise"] = json!(1);
        let err = parse(v).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{place:?}: {err}");
    }
}

#[test]
fn unknown_fields_are_rejected_in_a_model_server_task() {
    let mut v = valid();
    v["groups"][0]["task"] = json!({"driver": "model-server", "model": "d", "command": "x"});
    let err = parse(v).unwrap_err();
    assert!(err.to_string().contains("command"), "{err}");
}

#[test]
fn unknown_or_missing_driver_is_rejected() {
    let mut v = valid();
    v["groups"][0]["task"] = json!({"driver": "docker", "image": "x"});
    assert!(parse(v).unwrap_err().to_string().contains("docker"));
    let mut v = valid();
    v["groups"][0]["task"] = json!({"command": "x"});
    assert!(parse(v).unwrap_err().to_string().contains("driver"));
}

#[test]
fn negative_numbers_and_wrong_value_types_are_parse_errors() {
    let mut v = valid();
    v["groups"][0]["resources"]["cpu_millis"] = json!(-1);
    assert!(parse(v).is_err());
    let mut v = valid();
    v["groups"][0]["constraints"][0]["value"] = json!(5);
    let err = parse(v).unwrap_err();
    assert!(
        err.to_string().contains("a string or a list of strings"),
        "{err}"
    );
}

/// Applies `edit` to a valid spec and returns the field validation blames.
fn blamed(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = valid();
    edit(&mut v);
    let spec = parse(v).expect("edit keeps the document parseable");
    spec.validate().expect_err("edit breaks a rule").field
}

/// An edit that breaks one rule of a valid spec.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

#[test]
fn validation_names_the_offending_field() {
    let cases: Vec<(&str, Edit)> = vec![
        ("name", Box::new(|v| v["name"] = json!(""))),
        ("name", Box::new(|v| v["name"] = json!("Llama"))),
        ("name", Box::new(|v| v["name"] = json!("-llama"))),
        ("name", Box::new(|v| v["name"] = json!("a b"))),
        ("name", Box::new(|v| v["name"] = json!("x".repeat(64)))),
        ("priority", Box::new(|v| v["priority"] = json!(101))),
        ("circle", Box::new(|v| v["circle"] = json!("Vision Lab"))),
        ("groups", Box::new(|v| v["groups"] = json!([]))),
        (
            "groups[0].name",
            Box::new(|v| v["groups"][0]["name"] = json!("")),
        ),
        (
            "groups[0].count",
            Box::new(|v| v["groups"][0]["count"] = json!(0)),
        ),
        (
            "groups[0].count",
            Box::new(|v| v["groups"][0]["count"] = json!(MAX_GROUP_COUNT + 1)),
        ),
        (
            "groups[0].resources.cpu_millis",
            Box::new(|v| v["groups"][0]["resources"]["cpu_millis"] = json!(0)),
        ),
        (
            "groups[0].resources.memory_mib",
            Box::new(|v| v["groups"][0]["resources"]["memory_mib"] = json!(0)),
        ),
        (
            "groups[0].resources.gpus.count",
            Box::new(|v| v["groups"][0]["resources"]["gpus"]["count"] = json!(0)),
        ),
        (
            "groups[0].resources.gpus.model",
            Box::new(|v| v["groups"][0]["resources"]["gpus"]["model"] = json!(" ")),
        ),
        (
            "groups[0].resources.gpus.min_memory_mib",
            Box::new(|v| v["groups"][0]["resources"]["gpus"]["min_memory_mib"] = json!(0)),
        ),
        (
            "groups[0].constraints[0].attribute",
            Box::new(|v| v["groups"][0]["constraints"][0]["attribute"] = json!("")),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| v["groups"][0]["constraints"][0]["value"] = json!("BE")),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| v["groups"][0]["constraints"][0]["value"] = json!([])),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| {
                v["groups"][0]["constraints"][0] =
                    json!({"attribute": "site", "op": "not_in", "value": "x"})
            }),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| {
                v["groups"][0]["constraints"][0] =
                    json!({"attribute": "site", "op": "regex", "value": "("})
            }),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| {
                v["groups"][0]["constraints"][0] =
                    json!({"attribute": "cuda", "op": ">=", "value": ["12"]})
            }),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| {
                v["groups"][0]["constraints"][0] =
                    json!({"attribute": "cuda", "op": "<=", "value": "twelve"})
            }),
        ),
        (
            "groups[0].constraints[0].value",
            Box::new(|v| {
                v["groups"][0]["constraints"][0] =
                    json!({"attribute": "site", "op": "=", "value": ["a"]})
            }),
        ),
        (
            "groups[0].spread[0].attribute",
            Box::new(|v| v["groups"][0]["spread"][0]["attribute"] = json!("")),
        ),
        (
            "groups[0].spread[0].weight",
            Box::new(|v| v["groups"][0]["spread"][0]["weight"] = json!(0)),
        ),
        (
            "groups[0].resources.gpus.memory_slice_mib",
            Box::new(|v| v["groups"][0]["resources"]["gpus"]["memory_slice_mib"] = json!(0)),
        ),
        (
            "groups[0].resources.gpus.count",
            Box::new(|v| {
                v["groups"][0]["resources"]["gpus"] = json!({"count": 2, "memory_slice_mib": 10240})
            }),
        ),
        (
            "groups[0].resources.gpus.same_interconnect",
            Box::new(|v| {
                v["groups"][0]["resources"]["gpus"] =
                    json!({"count": 1, "memory_slice_mib": 10240, "same_interconnect": true})
            }),
        ),
        (
            "groups[0].affinities[0].attribute",
            Box::new(|v| {
                v["groups"][0]["affinities"] =
                    json!([{"attribute": " ", "op": "=", "value": "a", "weight": 5}])
            }),
        ),
        (
            "groups[0].affinities[0].value",
            Box::new(|v| {
                v["groups"][0]["affinities"] =
                    json!([{"attribute": "site", "op": "in", "value": "a", "weight": 5}])
            }),
        ),
        (
            "groups[0].affinities[0].weight",
            Box::new(|v| {
                v["groups"][0]["affinities"] =
                    json!([{"attribute": "site", "op": "=", "value": "a", "weight": 0}])
            }),
        ),
        (
            "groups[0].affinities[0].weight",
            Box::new(|v| {
                v["groups"][0]["affinities"] =
                    json!([{"attribute": "site", "op": "=", "value": "a", "weight": -101}])
            }),
        ),
        (
            "groups[0].max_unavailable",
            Box::new(|v| v["groups"][0]["max_unavailable"] = json!(0)),
        ),
        (
            "groups[0].task.command",
            Box::new(|v| v["groups"][0]["task"]["command"] = json!("  ")),
        ),
        (
            "groups[0].task.env",
            Box::new(|v| v["groups"][0]["task"]["env"] = json!({"A=B": "c"})),
        ),
        (
            "groups[0].task.artifacts[0].source",
            Box::new(|v| v["groups"][0]["task"]["artifacts"][0]["source"] = json!("")),
        ),
        (
            "groups[0].task.model",
            Box::new(|v| v["groups"][0]["task"] = json!({"driver": "model-server", "model": ""})),
        ),
        (
            "groups[1].name",
            Box::new(|v| {
                let copy = v["groups"][0].clone();
                v["groups"].as_array_mut().unwrap().push(copy);
            }),
        ),
    ];
    for (field, edit) in cases {
        assert_eq!(blamed(edit), field);
    }
}

#[test]
fn good_constraints_pass() {
    let mut v = valid();
    v["groups"][0]["constraints"] = json!([
        {"attribute": "site", "op": "=", "value": "ghent"},
        {"attribute": "site", "op": "!=", "value": ""},
        {"attribute": "country", "op": "not_in", "value": ["FR"]},
        {"attribute": "gpu.model", "op": "regex", "value": "^H1[0-9]0$"},
        {"attribute": "cuda", "op": ">=", "value": "12.1"},
        {"attribute": "disk_mib", "op": "<=", "value": "1000000"},
    ]);
    v["groups"][0]["spread"] = json!([{"attribute": "site", "weight": 100}]);
    parse(v).unwrap().validate().unwrap();
}

#[test]
fn placement_fields_default_and_round_trip() {
    let spec = parse(valid()).unwrap();
    let group = &spec.groups[0];
    assert!(group.movable && group.affinities.is_empty());
    assert_eq!(group.max_unavailable, None);
    let gpus = group.resources.gpus.as_ref().unwrap();
    assert!(!gpus.is_slice() && !gpus.same_interconnect);
    // Defaults stay off the wire, so older specs serialise exactly as before.
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["groups"][0].get("movable"), None);
    assert_eq!(
        json["groups"][0]["resources"]["gpus"].get("same_interconnect"),
        None
    );

    let mut v = valid();
    v["groups"][0]["movable"] = json!(false);
    v["groups"][0]["max_unavailable"] = json!(2);
    v["groups"][0]["affinities"] = json!([
        {"attribute": "site", "op": "=", "value": "ghent", "weight": 50},
        {"attribute": "farm", "op": "in", "value": ["a", "b"], "weight": -100},
    ]);
    v["groups"][0]["resources"]["gpus"] =
        json!({"count": 1, "model": "L4", "memory_slice_mib": 8192});
    let spec = parse(v).unwrap();
    spec.validate().unwrap();
    let group = &spec.groups[0];
    assert!(!group.movable);
    assert_eq!(group.max_unavailable, Some(2));
    assert_eq!(group.affinities[1].weight, -100);
    let gpus = group.resources.gpus.as_ref().unwrap();
    assert_eq!(gpus.memory_slice_mib, Some(MemoryMib::new(8192)));
    assert!(gpus.is_slice());
    let back: JobSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);

    let mut v = valid();
    v["groups"][0]["affinities"] =
        json!([{"attribute": "site", "op": "=", "value": "a", "weight": 1, "extra": 1}]);
    assert!(parse(v).is_err());
}

#[test]
fn wire_words_parse_back() {
    for op in ConstraintOp::ALL {
        assert_eq!(op.as_str().parse::<ConstraintOp>().unwrap(), *op);
        assert_eq!(serde_json::to_value(op).unwrap(), json!(op.as_str()));
    }
    assert!("~".parse::<ConstraintOp>().is_err());
    assert_eq!("training".parse::<JobKind>().unwrap(), JobKind::Training);
}

#[test]
fn a_change_of_count_keeps_instances_except_a_gangs() {
    let group = parse(valid()).unwrap().groups[0].clone();
    let mut more = group.clone();
    more.count += 2;
    more.max_unavailable = Some(3);
    assert!(group.same_instances(&more));
    let mut other_task = group.clone();
    other_task.resources.cpu_millis = MilliCpu::new(group.resources.cpu_millis.get() + 1);
    assert!(!group.same_instances(&other_task));
    let gang = TaskGroup {
        gang: true,
        ..group.clone()
    };
    let bigger_gang = TaskGroup {
        count: gang.count + 1,
        ..gang.clone()
    };
    assert!(gang.same_instances(&gang.clone()));
    assert!(!gang.same_instances(&bigger_gang), "a gang starts whole");
}

/// A model-server service scaled between `min` and `max` (the interface's
/// example), starting at `count`.
fn scaled(count: u32, scaling: serde_json::Value) -> serde_json::Value {
    json!({
        "name": "chat", "kind": "service",
        "groups": [{"name": "llm", "count": count, "scaling": scaling,
                    "resources": {"cpu_millis": 1000, "memory_mib": 1024},
                    "task": {"driver": "model-server", "model": DIGEST}}]
    })
}

#[test]
fn a_scaling_block_parses_with_its_defaults_and_breaks_no_rule() {
    let example = json!({"min": 0, "max": 4, "target_concurrency": 8,
                         "scale_up_window": "10s", "scale_down_window": "60s",
                         "idle_to_zero": "120s"});
    let spec = parse(scaled(0, example)).unwrap();
    spec.validate().unwrap();
    let s = spec.groups[0].scaling.as_ref().unwrap();
    assert_eq!((s.min, s.max, s.target_concurrency), (0, 4, Some(8)));
    assert_eq!(s.idle_limit(), Some(Span::from_secs(120)));
    assert_eq!(s.clamp(9), 4);
    // Defaults: windows of 10 s and 60 s, and to zero after the latter.
    let spec = parse(scaled(1, json!({"max": 2, "target_tokens_per_second": 50}))).unwrap();
    spec.validate().unwrap();
    let s = spec.groups[0].scaling.as_ref().unwrap();
    assert_eq!(s.scale_up_window, Span::from_secs(10));
    assert_eq!(s.idle_limit(), Some(Span::from_secs(60)));
    assert_eq!(s.targets(), "50 tokens/s");
    // With `min` above zero it never goes to zero.
    let spec = parse(scaled(
        2,
        json!({"min": 2, "max": 3, "target_concurrency": 1}),
    ))
    .unwrap();
    assert_eq!(spec.groups[0].scaling.as_ref().unwrap().idle_limit(), None);
    // A scaling block changes no instance: the same instances at any count.
    let plain = parse(valid()).unwrap().groups[0].clone();
    let mut with = plain.clone();
    with.scaling = spec.groups[0].scaling.clone();
    assert!(plain.same_instances(&with));
}

#[test]
fn a_scaling_block_that_breaks_a_rule_names_its_field() {
    let target = |extra: serde_json::Value| {
        let mut s = json!({"min": 0, "max": 4, "target_concurrency": 8});
        s.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s
    };
    let cases = [
        (
            scaled(1, target(json!({"max": 0}))),
            "groups[0].scaling.max",
            "between 1",
        ),
        (
            scaled(1, target(json!({"min": 5}))),
            "groups[0].scaling.min",
            "at most max",
        ),
        (
            scaled(1, json!({"max": 2})),
            "groups[0].scaling.target_concurrency",
            "needs a target",
        ),
        (
            scaled(1, target(json!({"target_concurrency": 0}))),
            "groups[0].scaling.target_concurrency",
            "at least 1",
        ),
        (
            scaled(1, target(json!({"scale_down_window": "2h"}))),
            "groups[0].scaling.scale_down_window",
            "at most 1h",
        ),
        (
            scaled(2, target(json!({"min": 1, "idle_to_zero": "1m"}))),
            "groups[0].scaling.idle_to_zero",
            "min 1 forbids",
        ),
        (
            scaled(1, target(json!({"idle_to_zero": "0"}))),
            "groups[0].scaling.idle_to_zero",
            "positive",
        ),
    ];
    for (spec, field, words) in cases {
        let err = parse(spec).unwrap().validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains(words), "{err}");
    }
    // Only a service serving a model, never a gang, scales.
    let mut batch = scaled(1, target(json!({})));
    batch["kind"] = json!("batch");
    let err = parse(batch).unwrap().validate().unwrap_err();
    assert_eq!(err.field, "groups[0].scaling");
    let mut gang = scaled(1, target(json!({})));
    gang["groups"][0]["gang"] = json!(true);
    let err = parse(gang).unwrap().validate().unwrap_err();
    assert!(err.message.contains("gang"), "{err}");
    let mut exec = valid();
    exec["groups"][0]["scaling"] = target(json!({}));
    let err = parse(exec).unwrap().validate().unwrap_err();
    assert!(err.message.contains("model-server"), "{err}");
    // Zero instances only where the group scales from zero.
    let mut fixed = valid();
    fixed["groups"][0]["count"] = json!(0);
    let err = parse(fixed).unwrap().validate().unwrap_err();
    assert_eq!(err.field, "groups[0].count");
    let err = parse(scaled(0, target(json!({"min": 1, "max": 4}))))
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "groups[0].count");
    // Unknown keys are refused as everywhere.
    assert!(parse(scaled(1, target(json!({"target_qps": 3})))).is_err());
}
