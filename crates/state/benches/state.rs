//! State at issue #6's scale: 100k users, 2k service principals, 10k groups, 1M memberships (the
//! emulators' large tenant as the last-applied snapshot, and an id map and owned set for every
//! principal). Measures encode + save and load + decode through the local store (the time, and the
//! memory each step adds at its peak), and the stored size, for three commits: the first (a
//! base), one that changes no principal (the head alone) and one that changes 100 users (a
//! delta). `cargo bench -p idsync-state --bench state`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_model::{AgreementState, Kind, Owned, Ownership};
use idsync_state::{LocalStore, StateStore};
use std::time::Instant;

fn main() {
    let snap = idsync_emulators::generator::generate(
        &idsync_emulators::generator::Params::preset("large").unwrap(),
    );
    let mut st = AgreementState::new("bench");
    let ids = |k: Kind| -> Vec<String> {
        match k {
            Kind::User => snap.users.keys().cloned().collect(),
            Kind::ServicePrincipal => snap.service_principals.keys().cloned().collect(),
            Kind::Group => snap.groups.keys().cloned().collect(),
        }
    };
    for k in Kind::ALL {
        for (i, id) in ids(k).into_iter().enumerate() {
            let target = format!("{:016x}{:04}", i * 2_654_435_761, i % 9973);
            st.links.get_mut(k).insert(id.clone(), target.clone());
            st.owned.get_mut(k).insert(
                target,
                Owned {
                    key: format!("{k}:{id}@contoso.example"),
                    how: Ownership::Created,
                    source: None,
                },
            );
        }
    }
    let memberships = snap.membership_count();
    st.last_applied = Some(snap.into());
    st.cursors.insert("graph.groups".into(), "x".repeat(400));

    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path().to_str().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The first round writes a base; the second commits the same principals (the journal of an
    // apply, a run with no change: the head alone); the third changes 100 users (a delta).
    for round in 1..=3 {
        if round == 3 {
            let snap = std::sync::Arc::make_mut(st.last_applied.as_mut().unwrap());
            let ids: Vec<String> = snap.users.keys().take(100).cloned().collect();
            for id in ids {
                let u = std::sync::Arc::make_mut(snap.users.get_mut(&id).unwrap());
                u.display_name.push_str(" (renamed)");
                st.links.users.insert(id, "renamed".into());
            }
        }
        let base = reset_peak();
        let t = Instant::now();
        st.version = rt.block_on(store.commit(&st)).unwrap();
        let save = t.elapsed();
        let save_peak = kib("VmHWM:") - base;
        let base = reset_peak();
        let t = Instant::now();
        let back = rt.block_on(store.load("bench")).unwrap().unwrap();
        let load = t.elapsed();
        let load_peak = kib("VmHWM:") - base;
        assert_eq!(back.version, st.version);
        drop(back);
        let size = stored(dir.path());
        println!(
            "round {round}: {} memberships; save {:.2} s (peak +{} MiB), load {:.2} s (peak +{} MiB), stored {:.1} MB",
            memberships,
            save.as_secs_f64(),
            save_peak / 1024,
            load.as_secs_f64(),
            load_peak / 1024,
            size as f64 / 1e6
        );
    }
}

/// The bytes of every object in the folder: the head and its layers.
fn stored(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// A field of /proc/self/status, in KiB (0 where there is none).
fn kib(field: &str) -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resets the process's peak RSS to its RSS now (Linux: `5` to `/proc/self/clear_refs`) and
/// returns that RSS: the peak of the next step, less this, is what the step added.
fn reset_peak() -> i64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    kib("VmRSS:")
}
