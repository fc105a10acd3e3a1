//! The state rules, written once over any storage with conditional writes.
//!
//! Per agreement: `<agreement>.state` (the head, see [`crate::codec`]), the layer objects it
//! names (`<agreement>.state-<version>-<nonce>.base` and `.delta`, see [`crate::layers`]) and
//! `<agreement>.lease` (JSON: holder, token, expiry). Every write of the head and the lease is
//! conditional on what was read — "only if it is still absent" or "only if it is still this
//! version" — so of two runs racing, exactly one wins and the other learns it: a commit
//! conflict, or a lease held. Layers are written once, under names unique to their writer, before
//! the head that names them.

use crate::codec::{self, Stored};
use crate::layers::{self, Content, LayerKind, LayerRef};
use crate::{Lease, StateError, StateStore, check_name};
use async_trait::async_trait;
use idsync_model::AgreementState;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An opaque version of a stored object: an ETag, a generation, a content hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag(pub String);

/// The condition of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Only if the object does not exist.
    Absent,
    /// Only if the object is still at this version.
    Match(Tag),
}

/// A flat namespace of small objects with conditional writes.
#[async_trait]
pub trait Blobs: Send + Sync {
    /// The object and its version, or `None`.
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Tag)>, StateError>;
    /// Writes `bytes` if `cond` holds: `Ok(true)`; `Ok(false)` when another writer got there
    /// first.
    async fn put(&self, key: &str, bytes: Vec<u8>, cond: Cond) -> Result<bool, StateError>;
    /// Removes the object (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), StateError>;
    /// The keys of every object (this level only: not those under nested prefixes).
    async fn list(&self) -> Result<Vec<String>, StateError>;
    /// Writes a new object at a key that may be nested (`changes/a/2026-12-05/x.jsonl`) and is
    /// unique to its writer: the change log's records, never rewritten.
    /// By default a write conditional on absence; a folder also makes the nested folders.
    async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        if self.put(key, bytes, Cond::Absent).await? {
            Ok(())
        } else {
            Err(StateError::Backend {
                action: "write",
                location: self.location(key),
                detail: "the object exists already".into(),
            })
        }
    }
    /// The keys of every object under `prefix` (`changes/a/`), nested ones included, sorted.
    async fn list_under(&self, prefix: &str) -> Result<Vec<String>, StateError>;
    /// Where an object is, for messages (no credentials).
    fn location(&self, key: &str) -> String;
    /// Where the store is, for messages (no credentials).
    fn describe(&self) -> String;
}

/// The state rules over a [`Blobs`] backend.
pub struct BlobStore<B> {
    blobs: B,
    /// Per agreement, what the layers of the version this store last loaded or committed hold:
    /// what the next commit compares the state with, to write what changed.
    memo: Mutex<HashMap<String, Memo>>,
}

impl<B: std::fmt::Debug> std::fmt::Debug for BlobStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("blobs", &self.blobs)
            .finish_non_exhaustive()
    }
}

/// The big fields of an agreement's stored version `version`, which `layers` hold.
struct Memo {
    version: u64,
    layers: Vec<LayerRef>,
    content: Content,
}

/// What a commit writes besides the head.
struct Written {
    /// The layers the new head names.
    layers: Vec<LayerRef>,
    /// The new layer object, if any: its key and bytes.
    object: Option<(String, Vec<u8>)>,
    /// What the new layers hold.
    content: Content,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token that tells two acquisitions apart: process, time and a per-process counter.
fn token() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{t:x}-{n:x}", std::process::id())
}

/// `YYYY-MM-DD`.
fn is_day(d: &str) -> bool {
    d.len() == 10
        && d.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

fn state_key(agreement: &str) -> String {
    format!("{agreement}.state")
}

fn lease_key(agreement: &str) -> String {
    format!("{agreement}.lease")
}

impl<B: Blobs> BlobStore<B> {
    /// The rules over `blobs`.
    pub fn new(blobs: B) -> Self {
        BlobStore {
            blobs,
            memo: Mutex::new(HashMap::new()),
        }
    }

    fn memos(&self) -> std::sync::MutexGuard<'_, HashMap<String, Memo>> {
        // A panic while the lock was held leaves a map of whole entries: each is replaced at once.
        self.memo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets what this store remembers of the layers it loaded and committed, as a new
    /// process would start (the next commit of each agreement writes a new base).
    pub fn forget(&self) {
        self.memos().clear();
    }

    /// The layers of `agreement` a head of `version` names, read and applied in order; `Ok(Err(key))`
    /// when one is missing (removed by a commit since the head was read).
    async fn read_layers(
        &self,
        agreement: &str,
        version: u64,
        refs: &[LayerRef],
        head: &str,
    ) -> Result<Result<Content, String>, StateError> {
        layers::check_refs(agreement, refs).map_err(|e| codec::corrupt(head, e))?;
        let mut content: Option<Content> = None;
        for r in refs {
            let location = self.blobs.location(&r.key);
            let Some((bytes, _)) = self.blobs.get(&r.key).await? else {
                return Ok(Err(r.key.clone()));
            };
            // Said of the head, which is what to restore or move away: a layer alone is nothing.
            let of_head = |e: StateError| match e {
                StateError::Corrupt { detail, .. } => {
                    codec::corrupt(head, format!("its layer {location}: {detail}"))
                }
                e => e,
            };
            match content.as_mut() {
                None => {
                    content = Some(
                        layers::decode_base(&bytes, agreement, version, &location)
                            .map_err(of_head)?,
                    );
                }
                Some(c) => layers::apply(
                    c,
                    layers::decode_delta(&bytes, agreement, version, &location).map_err(of_head)?,
                )
                .map_err(|e| codec::corrupt(head, format!("its layer {location}: {e}")))?,
            }
        }
        match content {
            Some(c) => Ok(Ok(c)),
            None => Err(codec::corrupt(head, "a head that names no layers".into())),
        }
    }

    /// What a commit of `state` as `version` writes besides the head, given the layers stored
    /// now (`None`: a whole document, or nothing) and what this store remembers of them.
    fn layers_for(
        &self,
        state: &AgreementState,
        version: u64,
        stored: Option<&Vec<LayerRef>>,
        memo: Option<Memo>,
    ) -> Result<Written, StateError> {
        let a = &state.agreement;
        let new_base = || -> Result<Written, StateError> {
            let key = layers::layer_key(a, version, LayerKind::Base);
            let bytes = layers::encode_base(state, version, &self.blobs.location(&key))?;
            Ok(Written {
                layers: vec![LayerRef {
                    key: key.clone(),
                    kind: LayerKind::Base,
                    bytes: bytes.len() as u64,
                }],
                object: Some((key, bytes)),
                content: Content::of(state),
            })
        };
        // What this store remembers is of no use unless it is of the layers stored now.
        let Some(mut m) = memo.filter(|m| Some(&m.layers) == stored) else {
            return new_base();
        };
        // A state grown by enough to call for a base is not compared entry by entry first (the
        // first sync's commit, against its journal's empty picture).
        let total = layers::entries(state);
        if layers::calls_for_a_base(total.saturating_sub(m.content.entries()), total) {
            return new_base();
        }
        let delta = layers::diff(&m.content, state);
        if delta.is_empty() {
            return Ok(Written {
                layers: m.layers,
                object: None,
                content: Content::of(state),
            });
        }
        if layers::calls_for_a_base(delta.entries(), total) {
            drop(delta);
            return new_base();
        }
        let key = layers::layer_key(a, version, LayerKind::Delta);
        let bytes = layers::encode_delta(a, version, &delta, &self.blobs.location(&key))?;
        drop(delta);
        if layers::compact(&m.layers, bytes.len() as u64) {
            drop(bytes);
            return new_base();
        }
        // What the layers now hold is the state's big fields, which share their maps and
        // snapshot with the state: one copy, not a second one patched with the delta.
        m.content = Content::of(state);
        m.layers.push(LayerRef {
            key: key.clone(),
            kind: LayerKind::Delta,
            bytes: bytes.len() as u64,
        });
        Ok(Written {
            layers: m.layers,
            object: Some((key, bytes)),
            content: m.content,
        })
    }

    /// Removes the layers of `agreement` no head names any more: those of the head a commit
    /// replaced, and (after a new base) any left by a run that stopped between writing a layer
    /// and its head, written at `read` or before (a run that read an older head can no longer
    /// commit). Failures are logged: what is left is removed by a later commit.
    async fn sweep(&self, agreement: &str, read: u64, old: &[LayerRef], kept: &[LayerRef]) {
        let mut doomed: Vec<String> = old
            .iter()
            .filter(|l| !kept.contains(l) && layers::layer_of(agreement, &l.key).is_some())
            .map(|l| l.key.clone())
            .collect();
        if kept.len() == 1 && old.first() != kept.first() {
            match self.blobs.list().await {
                Ok(keys) => doomed.extend(keys.into_iter().filter(|k| {
                    layers::layer_of(agreement, k).is_some_and(|(v, _)| v <= read)
                        && !kept.iter().any(|l| &l.key == k)
                })),
                Err(e) => {
                    tracing::warn!(error = %e, "could not list the state's objects to remove stray layers")
                }
            }
        }
        doomed.sort();
        doomed.dedup();
        for key in doomed {
            if let Err(e) = self.blobs.delete(&key).await {
                tracing::warn!(error = %e, key = %key, "could not remove a layer the state no longer names");
            }
        }
    }

    /// The backend.
    pub fn blobs(&self) -> &B {
        &self.blobs
    }

    async fn read_state(&self, agreement: &str) -> Result<Option<AgreementState>, StateError> {
        let key = state_key(agreement);
        let location = self.blobs.location(&key);
        let wrong = |holds: String| StateError::WrongAgreement {
            path: location.clone(),
            agreement: agreement.to_owned(),
            holds,
        };
        let mut tries = 0;
        loop {
            let Some((bytes, tag)) = self.blobs.get(&key).await? else {
                return Ok(None);
            };
            let (mut st, refs) = match codec::decode_stored(&bytes, &location)? {
                Stored::Whole(st) => {
                    if st.agreement != agreement {
                        return Err(wrong(st.agreement));
                    }
                    self.memos().remove(agreement);
                    return Ok(Some(st));
                }
                Stored::Head { state, layers } => (state, layers),
            };
            if st.agreement != agreement {
                return Err(wrong(st.agreement));
            }
            match self
                .read_layers(agreement, st.version, &refs, &location)
                .await?
            {
                Ok(content) => {
                    st.links.clone_from(&content.links);
                    st.owned.clone_from(&content.owned);
                    st.last_applied.clone_from(&content.snapshot);
                    self.memos().insert(
                        agreement.to_owned(),
                        Memo {
                            version: st.version,
                            layers: refs,
                            content,
                        },
                    );
                    return Ok(Some(st));
                }
                Err(missing) => {
                    // A commit since the head was read may have replaced it and removed its
                    // layers, or a reset removed it: read the head again. The same head naming
                    // a missing layer is damage.
                    tries += 1;
                    match self.blobs.get(&key).await? {
                        None => return Ok(None),
                        Some((_, now)) if now == tag => {
                            return Err(codec::corrupt(
                                &location,
                                format!(
                                    "it names the layer {}, which is missing",
                                    self.blobs.location(&missing)
                                ),
                            ));
                        }
                        Some(_) if tries >= 5 => {
                            return Err(StateError::Backend {
                                action: "load",
                                location,
                                detail: "other runs committed five times while this one read the \
                                         state; run again"
                                    .into(),
                            });
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }

    /// The lease as stored (an unreadable one counts as absent: it is replaced, never trusted).
    async fn read_lease(&self, agreement: &str) -> Result<Option<(Lease, Tag)>, StateError> {
        Ok(self
            .blobs
            .get(&lease_key(agreement))
            .await?
            .and_then(|(b, tag)| serde_json::from_slice::<Lease>(&b).ok().map(|l| (l, tag))))
    }

    async fn write_lease(&self, lease: &Lease, cond: Cond) -> Result<bool, StateError> {
        let bytes = serde_json::to_vec(lease).unwrap_or_default();
        self.blobs
            .put(&lease_key(&lease.agreement), bytes, cond)
            .await
    }
}

#[async_trait]
impl<B: Blobs> StateStore for BlobStore<B> {
    async fn load(&self, agreement: &str) -> Result<Option<AgreementState>, StateError> {
        check_name(agreement)?;
        self.read_state(agreement).await
    }

    async fn commit(&self, state: &AgreementState) -> Result<u64, StateError> {
        check_name(&state.agreement)?;
        let a = &state.agreement;
        let key = state_key(a);
        let location = self.blobs.location(&key);
        // Reading first also means a corrupted document is reported, never overwritten.
        let current = match self.blobs.get(&key).await? {
            None => None,
            Some((bytes, tag)) => Some((codec::decode_head(&bytes, &location)?, tag)),
        };
        let found = current.as_ref().map_or(0, |((v, _), _)| *v);
        if found != state.version {
            return Err(StateError::Conflict {
                agreement: a.clone(),
                expected: state.version,
                found,
            });
        }
        let version = found + 1;
        let stored = current.as_ref().and_then(|((_, l), _)| l.as_ref());
        // A head naming objects that are not this agreement's layers is damage: never replaced,
        // and nothing it names is removed.
        if let Some(refs) = stored {
            layers::check_refs(a, refs).map_err(|e| codec::corrupt(&location, e))?;
        }
        // Taken out while the commit runs: put back only once the head names what it describes.
        let memo = self
            .memos()
            .remove(a)
            .filter(|m| m.version == found && current.is_some());
        let mut written = self.layers_for(state, version, stored, memo)?;
        let mut new_layer: Option<(String, usize)> = None;
        if let Some((k, bytes)) = written.object.take() {
            let len = bytes.len();
            if !self.blobs.put(&k, bytes, Cond::Absent).await? {
                return Err(StateError::Backend {
                    action: "write",
                    location: self.blobs.location(&k),
                    detail:
                        "a new layer's name is taken (two writers drew the same nonce); run again"
                            .into(),
                });
            }
            new_layer = Some((k, len));
        }
        let head = codec::encode_head(state, version, &written.layers, &location)?;
        let cond = current
            .as_ref()
            .map_or(Cond::Absent, |(_, tag)| Cond::Match(tag.clone()));
        let head_bytes = head.len();
        if self.blobs.put(&key, head, cond).await? {
            match &new_layer {
                Some((k, layer_bytes)) => tracing::debug!(
                    agreement = %a, version, head_bytes, layer = %k, layer_bytes,
                    layers = written.layers.len(), "committed the state's head and a new layer"
                ),
                None => tracing::debug!(
                    agreement = %a, version, head_bytes, layers = written.layers.len(),
                    "committed the state's head alone (no principal changed)"
                ),
            }
            if let Some(old) = stored {
                self.sweep(a, found, old, &written.layers).await;
            }
            self.memos().insert(
                a.clone(),
                Memo {
                    version,
                    layers: written.layers,
                    content: written.content,
                },
            );
            return Ok(version);
        }
        // Another run committed between our read and our write: the layer is nobody's.
        if let Some((k, _)) = &new_layer
            && let Err(e) = self.blobs.delete(k).await
        {
            tracing::warn!(error = %e, key = %k, "could not remove the layer of a commit that lost");
        }
        let found = match self.blobs.get(&key).await? {
            None => 0,
            Some((bytes, _)) => codec::decode_version(&bytes, &location)?,
        };
        Err(StateError::Conflict {
            agreement: state.agreement.clone(),
            expected: state.version,
            found,
        })
    }

    async fn acquire(
        &self,
        agreement: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StateError> {
        check_name(agreement)?;
        let t = now();
        // One read decides: reading twice (once to parse, once to tell an absent lease from an
        // unreadable one) let a run replace a lease another run had just taken in between.
        let cond = match self.blobs.get(&lease_key(agreement)).await? {
            None => Cond::Absent,
            Some((bytes, tag)) => match serde_json::from_slice::<Lease>(&bytes) {
                Ok(l) if l.until > t => {
                    return Err(StateError::LeaseHeld {
                        agreement: agreement.to_owned(),
                        holder: l.holder,
                        until: l.until,
                    });
                }
                Ok(l) => {
                    if l.until > 0 {
                        tracing::warn!(holder = %l.holder, "taking over an expired lease (a run that crashed or was killed)");
                    }
                    Cond::Match(tag)
                }
                // Unreadable: replaced, never trusted.
                Err(_) => Cond::Match(tag),
            },
        };
        let lease = Lease {
            agreement: agreement.to_owned(),
            holder: holder.to_owned(),
            token: token(),
            until: t + ttl.as_secs().max(1),
        };
        if self.write_lease(&lease, cond).await? {
            return Ok(lease);
        }
        // Another run took it between our read and our write.
        let (holder, until) = self.read_lease(agreement).await?.map_or_else(
            || ("another run".to_owned(), t),
            |(l, _)| (l.holder, l.until),
        );
        Err(StateError::LeaseHeld {
            agreement: agreement.to_owned(),
            holder,
            until,
        })
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StateError> {
        let lost = |holder: Option<String>| StateError::LeaseLost {
            agreement: lease.agreement.clone(),
            holder: holder.unwrap_or_else(|| "nobody".to_owned()),
        };
        match self.read_lease(&lease.agreement).await? {
            Some((l, tag)) if l.token == lease.token => {
                let renewed = Lease {
                    until: now() + ttl.as_secs().max(1),
                    ..l
                };
                if self.write_lease(&renewed, Cond::Match(tag)).await? {
                    Ok(renewed)
                } else {
                    let holder = self
                        .read_lease(&lease.agreement)
                        .await?
                        .map(|(l, _)| l.holder);
                    Err(lost(holder))
                }
            }
            other => Err(lost(other.map(|(l, _)| l.holder))),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), StateError> {
        // Released = expired at time 0, written only if it is still ours.
        if let Some((l, tag)) = self.read_lease(&lease.agreement).await?
            && l.token == lease.token
        {
            let released = Lease { until: 0, ..l };
            self.write_lease(&released, Cond::Match(tag)).await?;
        }
        Ok(())
    }

    async fn unlock(&self, agreement: &str) -> Result<Option<Lease>, StateError> {
        check_name(agreement)?;
        let Some((l, tag)) = self.read_lease(agreement).await? else {
            return Ok(None);
        };
        if l.until <= now() {
            return Ok(None);
        }
        // A new token: the holder, should it still run, can no longer renew it.
        let ended = Lease {
            until: 0,
            token: token(),
            ..l.clone()
        };
        if self.write_lease(&ended, Cond::Match(tag)).await? {
            return Ok(Some(l));
        }
        // Taken, renewed or released meanwhile: say what holds now.
        match self.read_lease(agreement).await? {
            Some((now, _)) if now.until > self::now() => Err(StateError::LeaseHeld {
                agreement: agreement.to_owned(),
                holder: now.holder,
                until: now.until,
            }),
            _ => Ok(None),
        }
    }

    async fn delete(&self, agreement: &str) -> Result<(), StateError> {
        check_name(agreement)?;
        let key = state_key(agreement);
        // The layers written up to the head's version go; a later one may be a first commit
        // racing this reset (a lease taken over), whose head would name it. A head that cannot
        // be read takes all of them (no commit replaces it).
        let up_to = match self.blobs.get(&key).await? {
            None => 0,
            Some((bytes, _)) => {
                codec::decode_head(&bytes, &self.blobs.location(&key)).map_or(u64::MAX, |(v, _)| v)
            }
        };
        // The head first: a reader never finds a head whose layers are gone for good.
        self.blobs.delete(&key).await?;
        self.memos().remove(agreement);
        for k in self.blobs.list().await? {
            if layers::layer_of(agreement, &k).is_some_and(|(v, _)| v <= up_to) {
                self.blobs.delete(&k).await?;
            }
        }
        Ok(())
    }

    async fn append_changes(
        &self,
        agreement: &str,
        day: &str,
        name: &str,
        lines: Vec<u8>,
    ) -> Result<(), StateError> {
        check_name(agreement)?;
        check_name(name)?;
        if !is_day(day) {
            return Err(StateError::Backend {
                action: "write",
                location: self.blobs.describe(),
                detail: format!("{day:?} is not a day (YYYY-MM-DD)"),
            });
        }
        self.blobs
            .create(&format!("changes/{agreement}/{day}/{name}.jsonl.gz"), lines)
            .await
    }

    async fn changes(
        &self,
        agreement: Option<&str>,
        since_day: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let prefix = match agreement {
            Some(a) => {
                check_name(a)?;
                format!("changes/{a}/")
            }
            None => "changes/".to_owned(),
        };
        let mut out = Vec::new();
        for key in self.blobs.list_under(&prefix).await? {
            // changes/<agreement>/<day>/<name>.jsonl.gz (`.jsonl`: written before the log was
            // compressed)
            let day = key.split('/').nth(2).unwrap_or_default();
            if !(key.ends_with(".jsonl.gz") || key.ends_with(".jsonl"))
                || since_day.is_some_and(|s| day < s)
            {
                continue;
            }
            if let Some((bytes, _)) = self.blobs.get(&key).await? {
                out.push((key, bytes));
            }
        }
        Ok(out)
    }

    async fn list(&self) -> Result<Vec<String>, StateError> {
        let mut out: Vec<String> = self
            .blobs
            .list()
            .await?
            .iter()
            .filter_map(|k| k.strip_suffix(".state").map(str::to_owned))
            .filter(|n| check_name(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    fn describe(&self) -> String {
        self.blobs.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBlobs;

    /// Memory whose head disappears when the first layer is read: a reset between a load's two
    /// reads.
    #[derive(Debug, Default)]
    struct ResetMidLoad(MemoryBlobs);

    #[async_trait]
    impl Blobs for ResetMidLoad {
        async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Tag)>, StateError> {
            if layers::layer_of("a", key).is_some() {
                self.0.delete("a.state").await?;
                for k in self.0.list().await? {
                    if layers::layer_of("a", &k).is_some() {
                        self.0.delete(&k).await?;
                    }
                }
            }
            self.0.get(key).await
        }
        async fn put(&self, key: &str, bytes: Vec<u8>, cond: Cond) -> Result<bool, StateError> {
            self.0.put(key, bytes, cond).await
        }
        async fn delete(&self, key: &str) -> Result<(), StateError> {
            self.0.delete(key).await
        }
        async fn list(&self) -> Result<Vec<String>, StateError> {
            self.0.list().await
        }
        async fn list_under(&self, prefix: &str) -> Result<Vec<String>, StateError> {
            self.0.list_under(prefix).await
        }
        fn location(&self, key: &str) -> String {
            self.0.location(key)
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
    }

    fn with_link(a: &str) -> AgreementState {
        let mut st = AgreementState::new(a);
        st.links.users.insert("u".into(), "t".into());
        st
    }

    #[tokio::test]
    async fn a_load_that_a_reset_overtakes_finds_no_state() {
        let s = BlobStore::new(ResetMidLoad::default());
        s.commit(&with_link("a")).await.unwrap();
        assert_eq!(s.load("a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_head_naming_what_is_not_its_layers_is_never_replaced_and_nothing_is_removed() {
        let s = crate::MemoryStore::in_memory();
        s.commit(&with_link("b")).await.unwrap();
        let mut st = with_link("a");
        st.version = s.commit(&st).await.unwrap();
        // A head edited by hand to name another agreement's objects.
        let forged = codec::encode_head(
            &st,
            st.version,
            &[LayerRef {
                key: "b.state".into(),
                kind: LayerKind::Base,
                bytes: 1,
            }],
            "a.state",
        )
        .unwrap();
        let (_, tag) = s.blobs().get("a.state").await.unwrap().unwrap();
        assert!(
            s.blobs()
                .put("a.state", forged, Cond::Match(tag))
                .await
                .unwrap()
        );
        s.forget();
        let e = s.commit(&st).await.unwrap_err();
        assert!(
            matches!(&e, StateError::Corrupt { detail, .. } if detail.contains("\"b.state\"")),
            "{e}"
        );
        let e = s.load("a").await.unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert_eq!(s.load("b").await.unwrap().unwrap().version, 1, "b is whole");
    }

    #[tokio::test]
    async fn a_reset_leaves_the_layer_of_a_first_commit_racing_it() {
        let s = crate::MemoryStore::in_memory();
        let mut st = with_link("a");
        for _ in 0..3 {
            st.links
                .users
                .insert(format!("u{}", st.version), "t".into());
            st.version = s.commit(&st).await.unwrap();
        }
        let racing = layers::layer_key("a", st.version + 1, LayerKind::Base);
        s.blobs()
            .put(&racing, b"{}".to_vec(), Cond::Absent)
            .await
            .unwrap();
        s.delete("a").await.unwrap();
        let left: Vec<String> = s
            .blobs()
            .list()
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.starts_with("a."))
            .collect();
        assert_eq!(left, [racing]);
    }

    #[tokio::test]
    async fn a_commit_that_changes_most_of_a_large_state_writes_a_base_and_loads_back() {
        let s = crate::MemoryStore::in_memory();
        async fn kinds(s: &crate::MemoryStore) -> Vec<LayerKind> {
            let (bytes, _) = s.blobs().get("a.state").await.unwrap().unwrap();
            let (_, refs) = codec::decode_head(&bytes, "a.state").unwrap();
            refs.unwrap().iter().map(|l| l.kind).collect()
        }
        // A first sync: the journal's commit of an empty state, then every link at once.
        let mut st = AgreementState::new("a");
        st.version = s.commit(&st).await.unwrap();
        for i in 0..(layers::DELTA_ENTRIES_FOR_A_BASE + 1) {
            st.links.users.insert(format!("u{i}"), format!("t{i}"));
        }
        st.version = s.commit(&st).await.unwrap();
        assert_eq!(kinds(&s).await, [LayerKind::Base]);
        // One more link after that is a delta, and what the store remembers of the layers (the
        // state's own maps, shared) is what it then writes the next delta against.
        st.links.users.insert("v".into(), "w".into());
        st.version = s.commit(&st).await.unwrap();
        assert_eq!(kinds(&s).await, [LayerKind::Base, LayerKind::Delta]);
        st.links.users.remove("u0");
        st.version = s.commit(&st).await.unwrap();
        assert_eq!(
            kinds(&s).await,
            [LayerKind::Base, LayerKind::Delta, LayerKind::Delta]
        );
        s.forget();
        assert_eq!(s.load("a").await.unwrap().unwrap(), st);
    }

    #[tokio::test]
    async fn a_layer_from_a_newer_build_is_refused_not_read_in_part() {
        let s = crate::MemoryStore::in_memory();
        let mut st = with_link("a");
        // Big enough that one more link is a delta, not a new base.
        for i in 0..300 {
            st.links
                .users
                .insert(format!("user-{i}"), format!("target-{i}"));
        }
        st.version = s.commit(&st).await.unwrap();
        st.links.users.insert("v".into(), "w".into());
        st.version = s.commit(&st).await.unwrap();
        let (bytes, _) = s.blobs().get("a.state").await.unwrap().unwrap();
        let (_, refs) = codec::decode_head(&bytes, "a.state").unwrap();
        let delta = &refs.unwrap()[1];
        assert_eq!(delta.kind, LayerKind::Delta);
        let newer = br#"{"agreement": "a", "version": 2, "delta": {"renames": {}}}"#;
        s.blobs().delete(&delta.key).await.unwrap();
        s.blobs()
            .put(&delta.key, newer.to_vec(), Cond::Absent)
            .await
            .unwrap();
        let e = s.load("a").await.unwrap_err();
        match e {
            StateError::Corrupt { path, detail } => {
                assert_eq!(path, "memory:a.state", "said of the head");
                assert!(
                    detail.contains(&delta.key) && detail.contains("renames"),
                    "{detail}"
                );
            }
            e => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_state_of_head_format_2_is_read_and_committed_on() {
        use idsync_model::{Group, Snapshot, User};
        let s = crate::MemoryStore::in_memory();
        let mut st = with_link("a");
        let mut snap = Snapshot::default();
        for id in ["u1", "u2"] {
            let u: User = serde_json::from_value(serde_json::json!({
                "id": id, "userName": format!("{id}@example.com"), "displayName": "Zoë \"Z\""
            }))
            .unwrap();
            snap.users.insert(id.into(), std::sync::Arc::new(u));
        }
        let g: Group = serde_json::from_value(serde_json::json!({
            "id": "g1", "displayName": "G",
            "members": [{"type": "user", "id": "u2"}, {"type": "group", "id": "elsewhere"}]
        }))
        .unwrap();
        snap.groups.insert("g1".into(), g);
        st.last_applied = Some(std::sync::Arc::new(snap));
        st.version = s.commit(&st).await.unwrap();
        // What this build wrote: a head of format 3 and a base with the compact snapshot.
        let (bytes, _) = s.blobs().get("a.state").await.unwrap().unwrap();
        let mut head: serde_json::Value = codec::from_gzip(&bytes, "a.state").unwrap();
        assert_eq!(head["format"], 3);
        let key = head["layers"][0]["key"].as_str().unwrap().to_owned();
        let (bytes, _) = s.blobs().get(&key).await.unwrap().unwrap();
        let mut base: serde_json::Value = codec::from_gzip(&bytes, &key).unwrap();
        assert_eq!(
            base["snapshot"]["groups"][0]["members"],
            serde_json::json!({"u": [1], "other": [{"type": "group", "id": "elsewhere"}]})
        );
        // Rewritten as a build of head format 2 wrote them: every member whole, under
        // `lastApplied`.
        head["format"] = 2.into();
        let older = base.as_object_mut().unwrap();
        older.remove("snapshot");
        older.insert(
            "lastApplied".into(),
            serde_json::to_value(st.last_applied.as_deref()).unwrap(),
        );
        assert_eq!(older["lastApplied"]["groups"][0]["members"][0]["id"], "u2");
        for (k, v) in [("a.state", head), (key.as_str(), base)] {
            s.blobs().delete(k).await.unwrap();
            s.blobs()
                .put(k, serde_json::to_vec(&v).unwrap(), Cond::Absent)
                .await
                .unwrap();
        }
        s.forget();
        let loaded = s.load("a").await.unwrap().unwrap();
        assert_eq!(loaded, st);
        // A commit on it: a delta over the older base, under a head of format 3.
        let mut next = loaded;
        next.links.users.insert("v".into(), "w".into());
        next.version = s.commit(&next).await.unwrap();
        let (bytes, _) = s.blobs().get("a.state").await.unwrap().unwrap();
        let head: serde_json::Value = codec::from_gzip(&bytes, "a.state").unwrap();
        assert_eq!(head["format"], 3);
        s.forget();
        assert_eq!(s.load("a").await.unwrap().unwrap(), next);
    }

    #[test]
    fn a_head_without_a_version_is_refused() {
        let e = codec::decode_head(
            br#"{"format": 2, "layers": [{"key": "a.state-1-ab.base", "kind": "base", "bytes": 1}]}"#,
            "a.state",
        )
        .unwrap_err();
        assert!(e.to_string().contains("without a version"), "{e}");
    }
}
