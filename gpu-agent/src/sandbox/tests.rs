use std::os::unix::fs::MetadataExt;

use super::*;

#[test]
fn uid_ranges_parse_and_keep_their_first_id_for_the_shared_group() {
    let r: UidRange = "200000-265535".parse().unwrap();
    assert_eq!(r, UidRange::default());
    assert_eq!(r.shared_gid(), 200_000);
    assert_eq!(r.allocation_ids().next(), Some(200_001));
    assert_eq!(r.allocation_ids().last(), Some(265_535));
    assert!(r.contains(200_001) && r.contains(265_535));
    assert!(!r.contains(200_000) && !r.contains(265_536));
    for bad in [
        "",
        "5",
        "0-10",
        "300-200000",
        "2000-2000",
        "2000-x",
        "1000-4294967295",
    ] {
        assert!(bad.parse::<UidRange>().is_err(), "{bad}");
    }
}

#[test]
fn each_allocation_keeps_its_uid_and_none_shares_one() {
    let table = UidTable::default();
    let range: UidRange = "5000-5003".parse().unwrap();
    let (a, b, c, d) = (
        AllocId::new("a"),
        AllocId::new("b"),
        AllocId::new("c"),
        AllocId::new("d"),
    );
    table.adopt(&a, 5002);
    let free = |_| false;
    assert_eq!(
        table.take(&a, range, free),
        Some(5002),
        "found on disk, kept"
    );
    // A uid some process still runs under is skipped.
    assert_eq!(table.take(&b, range, |uid| uid == 5001), Some(5003));
    assert_eq!(table.take(&b, range, free), Some(5003));
    assert_eq!(table.take(&c, range, free), Some(5001));
    assert_eq!(table.take(&d, range, free), None, "the range is spent");
    table.release(&a);
    assert_eq!(table.take(&d, range, free), Some(5002));
}

#[test]
fn broad_grants_leave_protected_paths_out() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    for dir in ["ssl/certs", "ssl/private", "aigrid", "apt"] {
        fs::create_dir_all(etc.join(dir)).unwrap();
    }
    fs::write(etc.join("hosts"), "").unwrap();
    fs::write(etc.join("shadow"), "").unwrap();
    let etc = fs::canonicalize(&etc).unwrap();
    let protected = vec![
        etc.join("shadow"),
        etc.join("ssl/private"),
        etc.join("aigrid"),
    ];
    let granted = carve(&etc, &protected);
    assert_eq!(
        granted,
        [etc.join("apt"), etc.join("hosts"), etc.join("ssl/certs")]
    );
    assert!(carve(&etc.join("aigrid"), &protected).is_empty());
    assert!(carve(&etc.join("missing"), &protected).is_empty());
    assert_eq!(carve(&etc.join("apt"), &protected), [etc.join("apt")]);
}

#[test]
fn a_plan_grants_the_task_its_own_dirs_and_never_the_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let data = fs::canonicalize(root.path()).unwrap().join("data");
    let layout = Layout::new(&data.join("allocs/a-1"), "local");
    fs::create_dir_all(&layout.local).unwrap();
    let config = SandboxConfig {
        // A misconfigured store directory that holds the agent's data dir.
        model_reads: vec![data.parent().unwrap().to_owned()],
        ..SandboxConfig::default()
    };
    let protected = protected_paths(&config, &data);
    let grants = Grants {
        exec: vec!["/bin/sh".into()],
        read: config.model_reads.clone(),
        shared: vec![data.join("model-cache")],
    };
    let plan = plan(&layout, None, &grants, false, &protected);
    assert_eq!(
        plan.read_write,
        [
            layout.local.clone(),
            layout.tmp.clone(),
            data.join("model-cache")
        ]
    );
    assert!(plan.read_only.contains(&layout.secrets));
    let everything: Vec<&PathBuf> = plan
        .read_write
        .iter()
        .chain(&plan.read_exec)
        .chain(&plan.read_only)
        .collect();
    for path in &everything {
        let inside_own = path.starts_with(&layout.alloc_dir) || **path == data.join("model-cache");
        assert!(
            inside_own || !(data.starts_with(path) || path.starts_with(&data)),
            "{} exposes the data dir",
            path.display()
        );
        assert!(!path.starts_with("/etc/shadow") && !path.starts_with("/etc/ssh"));
    }
    assert!(plan.read_exec.iter().any(|p| p.starts_with("/usr")));
    assert_eq!(plan.umask, Some(0o007));
    assert!(plan.devices.contains(&PathBuf::from("/dev/null")));
}

#[test]
fn secrets_are_files_of_their_owner_alone() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("secrets");
    let env = [
        ("TOKEN".to_owned(), "s3cret".to_owned()),
        ("../escape".to_owned(), "x".to_owned()),
    ]
    .into_iter()
    .collect();
    let skipped = write_secrets(&dir, &env, None).unwrap();
    assert_eq!(skipped, ["../escape"]);
    assert_eq!(fs::read_to_string(dir.join("TOKEN")).unwrap(), "s3cret");
    assert_eq!(
        fs::metadata(dir.join("TOKEN")).unwrap().mode() & 0o777,
        0o400
    );
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o500);
    assert!(!root.path().join("escape").exists());
    // A new run writes them afresh; a variable gone is gone.
    let skipped = write_secrets(&dir, &Default::default(), None).unwrap();
    assert!(skipped.is_empty());
    assert!(!dir.join("TOKEN").exists());
    remove_secrets(&dir).unwrap();
    assert!(!dir.exists());
    remove_secrets(&dir).unwrap();
}

#[test]
fn shared_dirs_let_the_group_in_and_others_out() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    fs::create_dir_all(dir.join("chunks")).unwrap();
    fs::write(dir.join("chunks/c1"), "x").unwrap();
    let gid = nix::unistd::getegid().as_raw();
    // Not yet the group's: emptied, then handed over.
    let other = if gid == 0 { 1 } else { 0 };
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&dir, None, Some(other)).unwrap();
        make_shared(&dir, gid).unwrap();
        assert!(!dir.join("chunks").exists(), "a cache of before is emptied");
    } else {
        make_shared(&dir, gid).unwrap();
    }
    let meta = fs::metadata(&dir).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o7777), (gid, 0o2770));
    // Already the group's: what its tasks cached stays.
    fs::create_dir_all(dir.join("chunks")).unwrap();
    fs::write(dir.join("chunks/c2"), "y").unwrap();
    make_shared(&dir, gid).unwrap();
    assert!(dir.join("chunks/c2").exists());
}

#[test]
fn the_landlock_probe_answers() {
    // Either a version or why there is none: never a panic, never zero.
    match landlock_abi() {
        Ok(abi) => assert!(abi >= 1),
        Err(why) => assert!(why.contains("Landlock"), "{why}"),
    }
}
