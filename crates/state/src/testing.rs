//! The conformance suite every state backend runs (the local folder in unit tests; S3, Azure Blob
//! and GCS against real or emulated servers in `tests/`): round trip, compare-and-swap with
//! concurrent writers, leases (exclusive, renewed, expired and taken over, released late),
//! corrupted and newer documents refused and kept, the change log's objects, the state's layers
//! (a commit writes what changed; missing layers refused) and the move from whole documents.

use crate::blob::{BlobStore, Blobs, Cond};
use crate::{StateError, StateStore};
use idsync_model::AgreementState;
use std::time::Duration;

fn assert_that(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_owned()) }
}

/// Runs every check against `store`, in agreements named `<prefix>-...` (so a shared bucket can
/// host several runs). Returns the first failure.
pub async fn run<B: Blobs>(store: &BlobStore<B>, prefix: &str) -> Result<(), String> {
    round_trip(store, &format!("{prefix}-rt")).await?;
    compare_and_swap(store, &format!("{prefix}-cas")).await?;
    leases(store, &format!("{prefix}-lease")).await?;
    corrupted(store, &format!("{prefix}-bad")).await?;
    layered(store, &format!("{prefix}-layers")).await?;
    migrated(store, &format!("{prefix}-old")).await?;
    change_log(store, &format!("{prefix}-log")).await?;
    Ok(())
}

/// The change log: records appended as new objects, read back in order, filtered by day and
/// agreement, never overwritten; the state's own listing does not see them.
async fn change_log<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    // Unique per run: a bucket may keep what an earlier run wrote.
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let other = format!("{a}-other");
    s.append_changes(
        a,
        "2026-12-04",
        &format!("235959-{run}"),
        b"{\"n\":1}\n".to_vec(),
    )
    .await
    .map_err(e)?;
    s.append_changes(
        a,
        "2026-12-05",
        &format!("000001-{run}"),
        b"{\"n\":2}\n".to_vec(),
    )
    .await
    .map_err(e)?;
    s.append_changes(
        &other,
        "2026-12-05",
        &format!("000000-{run}"),
        b"{\"n\":3}\n".to_vec(),
    )
    .await
    .map_err(e)?;
    let mine: Vec<Vec<u8>> = s
        .changes(Some(a), None)
        .await
        .map_err(e)?
        .into_iter()
        .filter(|(k, _)| k.contains(&run))
        .map(|(_, b)| b)
        .collect();
    assert_that(
        mine == [b"{\"n\":1}\n".to_vec(), b"{\"n\":2}\n".to_vec()],
        "an agreement's records come back in order, without another agreement's",
    )?;
    let since = s.changes(Some(a), Some("2026-12-05")).await.map_err(e)?;
    assert_that(
        since.iter().filter(|(k, _)| k.contains(&run)).count() == 1,
        "records before the day asked for are left out",
    )?;
    let all = s.changes(None, None).await.map_err(e)?;
    assert_that(
        all.iter().filter(|(k, _)| k.contains(&run)).count() == 3,
        "every agreement's records when none is named",
    )?;
    assert_that(
        s.append_changes(a, "2026-12-05", &format!("000001-{run}"), b"x".to_vec())
            .await
            .is_err(),
        "a record object is never overwritten",
    )?;
    assert_that(
        s.append_changes(a, "12/05/2026", "x", b"x".to_vec())
            .await
            .is_err(),
        "a day is YYYY-MM-DD",
    )?;
    assert_that(
        !s.list()
            .await
            .map_err(e)?
            .iter()
            .any(|n| n.contains("changes")),
        "the state's listing does not show the change log",
    )
}

async fn round_trip<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    assert_that(
        s.load(a).await.map_err(e)?.is_none(),
        "a new agreement has no state",
    )?;
    let mut st = AgreementState::new(a);
    st.cursors.insert("graph.users".into(), "token-1".into());
    assert_that(
        s.commit(&st).await.map_err(e)? == 1,
        "the first commit is version 1",
    )?;
    let back = s
        .load(a)
        .await
        .map_err(e)?
        .ok_or("committed state is loaded")?;
    assert_that(
        back.version == 1 && back.cursors["graph.users"] == "token-1",
        "round trip",
    )?;
    assert_that(
        s.commit(&back).await.map_err(e)? == 2,
        "the second commit is version 2",
    )?;
    assert_that(s.list().await.map_err(e)?.contains(&a.to_owned()), "listed")?;
    s.delete(a).await.map_err(e)?;
    assert_that(s.load(a).await.map_err(e)?.is_none(), "deleted")?;
    s.delete(a).await.map_err(e)?;
    Ok(())
}

async fn compare_and_swap<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    s.commit(&AgreementState::new(a)).await.map_err(e)?;
    let loaded = s.load(a).await.map_err(e)?.ok_or("state")?;
    // Eight writers from the same version, at once: exactly one wins.
    let results = futures::future::join_all((0..8).map(|_| s.commit(&loaded))).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_that(
        wins == 1,
        &format!("exactly one of 8 concurrent commits wins, {wins} did"),
    )?;
    for r in &results {
        if let Err(err) = r {
            assert_that(
                matches!(err, StateError::Conflict { expected: 1, .. }),
                &format!("a losing commit is a conflict: {err}"),
            )?;
        }
    }
    match s.commit(&loaded).await {
        Err(StateError::Conflict {
            expected: 1,
            found: 2,
            ..
        }) => {}
        other => return Err(format!("a stale commit is refused: {other:?}")),
    }
    s.delete(a).await.map_err(e)
}

async fn leases<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    let min = Duration::from_secs(60);
    // Eight runs take a lease no one holds, at once, ten times over: exactly one gets it each
    // time (a second read between deciding and writing once let a run replace a fresh lease).
    for round in 0..10 {
        let name = format!("{a}-race{round}");
        let holders: Vec<String> = (0..8).map(|i| format!("racer-{i}")).collect();
        let results =
            futures::future::join_all(holders.iter().map(|h| s.acquire(&name, h, min))).await;
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_that(
            wins == 1,
            &format!("exactly one of 8 concurrent acquires wins, {wins} did"),
        )?;
        for l in results.into_iter().flatten() {
            s.release(&l).await.map_err(e)?;
        }
        s.delete(&name).await.map_err(e)?;
    }
    let l1 = s.acquire(a, "run-1", min).await.map_err(e)?;
    match s.acquire(a, "run-2", min).await {
        Err(StateError::LeaseHeld { holder, .. }) if holder == "run-1" => {}
        other => return Err(format!("a held lease is refused to another run: {other:?}")),
    }
    let l1 = s.renew(&l1, Duration::from_secs(120)).await.map_err(e)?;
    s.release(&l1).await.map_err(e)?;
    let l2 = s.acquire(a, "run-2", min).await.map_err(e)?;

    // run-2 crashes: its lease, expired, is taken over by run-3.
    let key = format!("{a}.lease");
    let (_, tag) = s
        .blobs()
        .get(&key)
        .await
        .map_err(e)?
        .ok_or("lease object")?;
    let stale = crate::Lease {
        until: 1,
        ..l2.clone()
    };
    let put = s
        .blobs()
        .put(
            &key,
            serde_json::to_vec(&stale).unwrap_or_default(),
            Cond::Match(tag),
        )
        .await
        .map_err(e)?;
    assert_that(put, "a conditional write with the current version succeeds")?;
    let l3 = s.acquire(a, "run-3", min).await.map_err(e)?;
    // The crashed run's late renewal fails, and its late release does not free run-3's lease.
    match s.renew(&l2, min).await {
        Err(StateError::LeaseLost { holder, .. }) if holder == "run-3" => {}
        other => return Err(format!("a taken-over lease cannot be renewed: {other:?}")),
    }
    s.release(&l2).await.map_err(e)?;
    assert_that(
        s.acquire(a, "run-4", min).await.is_err(),
        "a late release leaves the new holder's lease",
    )?;
    s.release(&l3).await.map_err(e)?;

    // A lease left by a process that is gone is ended by hand, and says whose it was; the process,
    // should it come back, can no longer renew it.
    assert_that(
        s.unlock(a).await.map_err(e)?.is_none(),
        "no lease in force: nothing to unlock",
    )?;
    let left = s.acquire(a, "gone-run", min).await.map_err(e)?;
    match s.unlock(a).await.map_err(e)? {
        Some(l) if l.holder == "gone-run" => {}
        other => return Err(format!("unlock says whose lease it ended: {other:?}")),
    }
    assert_that(
        s.renew(&left, min).await.is_err(),
        "an ended lease cannot be renewed by its old holder",
    )?;
    let l5 = s.acquire(a, "run-5", min).await.map_err(e)?;
    s.release(&l5).await.map_err(e)?;

    // Eight runs start at once: exactly one gets the lease.
    let results = futures::future::join_all(
        (0..8).map(|i| async move { s.acquire(a, &format!("racer-{i}"), min).await }),
    )
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_that(
        wins == 1,
        &format!("exactly one of 8 concurrent acquisitions wins, {wins} did"),
    )?;
    for l in results.into_iter().flatten() {
        s.release(&l).await.map_err(e)?;
    }
    Ok(())
}

async fn corrupted<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    let key = format!("{a}.state");
    let garbage = b"{\"format\": 1, \"agreem".to_vec();
    let _ = s.blobs().delete(&key).await;
    s.blobs()
        .put(&key, garbage.clone(), Cond::Absent)
        .await
        .map_err(e)?;
    match s.load(a).await {
        Err(StateError::Corrupt { .. }) => {}
        other => return Err(format!("a corrupted document is refused: {other:?}")),
    }
    assert_that(
        s.commit(&AgreementState::new(a)).await.is_err(),
        "a corrupted document is never overwritten by a commit",
    )?;
    let (kept, tag) = s.blobs().get(&key).await.map_err(e)?.ok_or("document")?;
    assert_that(kept == garbage, "the corrupted document is kept as it was")?;
    s.blobs()
        .put(&key, br#"{"format": 99}"#.to_vec(), Cond::Match(tag))
        .await
        .map_err(e)?;
    match s.load(a).await {
        Err(StateError::NewerFormat { found: 99, .. }) => {}
        other => return Err(format!("a newer format is refused: {other:?}")),
    }
    s.delete(a).await.map_err(e)?;
    // A document copied under another agreement's name is refused for what it is, not taken for
    // a commit race.
    let other = format!("{a}-elsewhere");
    s.commit(&AgreementState::new(other.as_str()))
        .await
        .map_err(e)?;
    let (bytes, _) = s
        .blobs()
        .get(&format!("{other}.state"))
        .await
        .map_err(e)?
        .ok_or("document")?;
    s.blobs().put(&key, bytes, Cond::Absent).await.map_err(e)?;
    match s.load(a).await {
        Err(StateError::WrongAgreement { holds, .. }) if holds == other => {}
        other => {
            return Err(format!(
                "a document of another agreement is refused: {other:?}"
            ));
        }
    }
    s.delete(a).await.map_err(e)?;
    s.delete(&other).await.map_err(e)
}

/// The layer objects of agreement `a` in the store.
async fn layer_keys<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<Vec<String>, String> {
    let mut keys: Vec<String> = s
        .blobs()
        .list()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|k| crate::layers::layer_of(a, k).is_some())
        .collect();
    keys.sort();
    Ok(keys)
}

/// A state with an id map, owned principals and a last applied snapshot of `n` users and a group.
fn big_state(a: &str, n: usize) -> AgreementState {
    use idsync_model::source::{Group, Member, Snapshot, User};
    use idsync_model::state::{Owned, Ownership};
    let mut st = AgreementState::new(a);
    let mut snap = Snapshot::default();
    let mut members = std::collections::BTreeSet::new();
    for i in 0..n {
        let id = format!("u-{i:04}");
        snap.users.insert(
            id.clone(),
            std::sync::Arc::new(User {
                id: id.clone(),
                user_name: format!("user{i}@example.com"),
                display_name: format!("User \"{i}\" Ünïcode"),
                emails: vec![],
                active: true,
                user_type: Default::default(),
                external_id: None,
                attributes: Default::default(),
            }),
        );
        members.insert(Member::user(id.as_str()));
        st.links.users.insert(id.clone(), format!("t-{i}"));
        st.owned.users.insert(
            format!("t-{i}"),
            Owned {
                key: format!("user{i}@example.com"),
                how: Ownership::Created,
                source: None,
            },
        );
    }
    snap.groups.insert(
        "g-1".into(),
        Group {
            id: "g-1".into(),
            display_name: "Everyone".into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: members.into(),
        },
    );
    st.last_applied = Some(std::sync::Arc::new(snap));
    st
}

/// A user renamed (snapshot, owned key) and its link moved: a small change.
fn renamed(st: &mut AgreementState, i: usize, round: usize) {
    let id = format!("u-{i:04}");
    let snap = std::sync::Arc::make_mut(st.last_applied.get_or_insert_with(Default::default));
    if let Some(u) = snap.user_mut(&id) {
        u.user_name = format!("user{i}-r{round}@example.com");
    }
    st.links.users.insert(id, format!("t-{i}-r{round}"));
}

/// A commit writes what changed: the head alone when the id map, owned set and snapshot did not
/// change; a delta beside the base when a few entries did; a new base (and the old layers gone)
/// once the deltas add up. What a fresh process loads is what was committed, every time.
async fn layered<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    let _ = s.delete(a).await;
    let mut st = big_state(a, 120);
    st.version = s.commit(&st).await.map_err(e)?;
    let first = layer_keys(s, a).await?;
    assert_that(first.len() == 1, &format!("one base: {first:?}"))?;
    // Nothing big changed (a journal written before an apply's first write): the head alone.
    st.cursors.insert("graph.users".into(), "token-2".into());
    st.journal = Some(Default::default());
    st.version = s.commit(&st).await.map_err(e)?;
    assert_that(
        layer_keys(s, a).await? == first,
        "a commit that changes no principal writes no layer",
    )?;
    assert_that(
        s.load(a).await.map_err(e)?.as_ref() == Some(&st),
        "the head round-trips",
    )?;
    // A few principals changed (renamed, gone, a group's read incomplete): a delta beside the
    // base.
    renamed(&mut st, 7, 1);
    st.journal = None;
    st.owned.users.remove("t-0");
    let snap = std::sync::Arc::make_mut(st.last_applied.get_or_insert_with(Default::default));
    snap.incomplete_groups.insert("g-1".into());
    snap.users.remove("u-0001");
    snap.groups
        .get_mut("g-1")
        .ok_or("group")?
        .members
        .remove(&idsync_model::source::Member::user("u-0001"));
    st.version = s.commit(&st).await.map_err(e)?;
    let second = layer_keys(s, a).await?;
    assert_that(
        second.len() == 2 && second.contains(&first[0]),
        &format!("a delta beside the base: {second:?}"),
    )?;
    s.forget();
    assert_that(
        s.load(a).await.map_err(e)?.as_ref() == Some(&st),
        "base and delta load as committed",
    )?;
    // Many small changes, each loaded afresh: the layers stay few, the state exact.
    for round in 2..12 {
        renamed(&mut st, round * 3, round);
        if round == 6 {
            std::sync::Arc::make_mut(st.last_applied.get_or_insert_with(Default::default))
                .incomplete_groups
                .clear();
        }
        st.version = s.commit(&st).await.map_err(e)?;
        let keys = layer_keys(s, a).await?;
        assert_that(
            keys.len() <= 1 + crate::layers::MAX_DELTAS,
            &format!("deltas are compacted: {} layers", keys.len()),
        )?;
        if round % 4 == 0 {
            s.forget();
        }
        let back = s.load(a).await.map_err(e)?;
        assert_that(
            back.as_ref() == Some(&st),
            &format!("round {round} loads as committed"),
        )?;
    }
    // A process that remembers nothing writes a new base, and the layers it replaces are removed,
    // with a layer a run left when it stopped before its head.
    let stray = crate::layers::layer_key(a, st.version, crate::layers::LayerKind::Delta);
    s.blobs()
        .put(&stray, b"{}".to_vec(), Cond::Absent)
        .await
        .map_err(e)?;
    s.forget();
    st.version = s.commit(&st).await.map_err(e)?;
    let keys = layer_keys(s, a).await?;
    assert_that(
        keys.len() == 1 && !keys.contains(&stray),
        &format!("one base after a commit from scratch: {keys:?}"),
    )?;
    // A layer the head names that is missing is damage, said as such; nothing is overwritten.
    renamed(&mut st, 5, 99);
    st.version = s.commit(&st).await.map_err(e)?;
    let keys = layer_keys(s, a).await?;
    let delta = keys
        .iter()
        .find(|k| k.ends_with(".delta"))
        .ok_or(format!("a delta: {keys:?}"))?;
    s.blobs().delete(delta).await.map_err(e)?;
    s.forget();
    match s.load(a).await {
        Err(StateError::Corrupt { detail, .. }) if detail.contains("missing") => {}
        other => return Err(format!("a missing layer is refused: {other:?}")),
    }
    // Deleting the agreement removes its layers.
    s.delete(a).await.map_err(e)?;
    assert_that(
        layer_keys(s, a).await?.is_empty(),
        "no layer is left after a delete",
    )?;
    Ok(())
}

/// A whole document, as builds before the layers stored it, is loaded as it is and replaced by a
/// head and a base at its next commit.
async fn migrated<B: Blobs>(s: &BlobStore<B>, a: &str) -> Result<(), String> {
    let e = |e: StateError| e.to_string();
    let _ = s.delete(a).await;
    let key = format!("{a}.state");
    let mut st = big_state(a, 30);
    st.version = 5;
    st.cursors.insert("graph.groups".into(), "token".into());
    let whole = crate::codec::encode(&st, &key).map_err(e)?;
    s.blobs().put(&key, whole, Cond::Absent).await.map_err(e)?;
    assert_that(
        s.load(a).await.map_err(e)?.as_ref() == Some(&st),
        "a whole document loads as it is",
    )?;
    renamed(&mut st, 3, 1);
    st.version = s.commit(&st).await.map_err(e)?;
    assert_that(st.version == 6, "its next commit is the next version")?;
    let (bytes, _) = s.blobs().get(&key).await.map_err(e)?.ok_or("head")?;
    let (_, layers) = crate::codec::decode_head(&bytes, &key).map_err(e)?;
    assert_that(
        layers.is_some_and(|l| l.len() == 1),
        "the document is now a head and one base",
    )?;
    s.forget();
    assert_that(
        s.load(a).await.map_err(e)?.as_ref() == Some(&st),
        "and loads as committed",
    )?;
    s.delete(a).await.map_err(e)
}
