//! The state rules, written once over any storage with conditional writes.
//!
//! Per agreement, two objects: `<agreement>.state` (the document, see [`crate::codec`]) and
//! `<agreement>.lease` (JSON: holder, token, expiry). Every write is conditional on what was read —
//! "only if it is still absent" or "only if it is still this version" — so of two runs racing,
//! exactly one wins and the other learns it: a commit conflict, or a lease held.

use crate::codec;
use crate::{Lease, StateError, StateStore, check_name};
use async_trait::async_trait;
use idsync_model::AgreementState;
use idsync_model::state::STATE_FORMAT;
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
#[derive(Debug)]
pub struct BlobStore<B> {
    blobs: B,
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
        BlobStore { blobs }
    }

    /// The backend.
    pub fn blobs(&self) -> &B {
        &self.blobs
    }

    async fn read_state(
        &self,
        agreement: &str,
    ) -> Result<Option<(AgreementState, Tag)>, StateError> {
        let key = state_key(agreement);
        match self.blobs.get(&key).await? {
            None => Ok(None),
            Some((bytes, tag)) => {
                let st = codec::decode(&bytes, &self.blobs.location(&key))?;
                if st.agreement != agreement {
                    return Err(StateError::WrongAgreement {
                        path: self.blobs.location(&key),
                        agreement: agreement.to_owned(),
                        holds: st.agreement,
                    });
                }
                Ok(Some((st, tag)))
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
        Ok(self.read_state(agreement).await?.map(|(s, _)| s))
    }

    async fn commit(&self, state: &AgreementState) -> Result<u64, StateError> {
        check_name(&state.agreement)?;
        let key = state_key(&state.agreement);
        // Reading first also means a corrupted document is reported, never overwritten.
        let current = match self.blobs.get(&key).await? {
            None => None,
            Some((bytes, tag)) => Some((
                codec::decode_version(&bytes, &self.blobs.location(&key))?,
                tag,
            )),
        };
        let found = current.as_ref().map_or(0, |(v, _)| *v);
        if found != state.version {
            return Err(StateError::Conflict {
                agreement: state.agreement.clone(),
                expected: state.version,
                found,
            });
        }
        let mut next = state.clone();
        next.version = found + 1;
        next.format = STATE_FORMAT;
        let bytes = codec::encode(&next, &self.blobs.location(&key))?;
        let cond = current.map_or(Cond::Absent, |(_, tag)| Cond::Match(tag));
        if self.blobs.put(&key, bytes, cond).await? {
            return Ok(next.version);
        }
        // Another run committed between our read and our write.
        let found = match self.blobs.get(&key).await? {
            None => 0,
            Some((bytes, _)) => codec::decode_version(&bytes, &self.blobs.location(&key))?,
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
        self.blobs.delete(&state_key(agreement)).await
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
            .create(&format!("changes/{agreement}/{day}/{name}.jsonl"), lines)
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
            // changes/<agreement>/<day>/<name>.jsonl
            let day = key.split('/').nth(2).unwrap_or_default();
            if !key.ends_with(".jsonl") || since_day.is_some_and(|s| day < s) {
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
