//! The source side of a run: one read per starting point.

use crate::Reporter;
use idsync_engine::{Changes, Read, Scope, Source, SourceError};
use idsync_model::AgreementState;
use std::collections::BTreeMap;

/// Reads the source once per distinct starting point: agreements at the same cursor share a read,
/// or its failure (a source that failed for one agreement is not read again for the next).
#[derive(Default)]
pub struct ReadCache {
    reads: BTreeMap<String, Result<Read, SourceError>>,
}

/// The cursor under which a read records the scope it was made under ([`Scope::fingerprint`]).
pub(crate) const SCOPE_CURSOR: &str = "idsync.scope";

impl ReadCache {
    /// A full read, or an incremental one from the state's cursors and last applied snapshot
    /// (an expired cursor or a source without a change feed falls back to a full read).
    pub async fn read(
        &mut self,
        source: &dyn Source,
        scope: &Scope,
        state: &AgreementState,
        full: bool,
        reporter: &mut dyn Reporter,
    ) -> Result<Read, SourceError> {
        // Cursors that do not say their scope (stored by an earlier build) are read past once:
        // the scope may have changed in the same deployment, and would never be noticed after.
        let scope_fp = scope.fingerprint();
        let rescoped = !state.cursors.is_empty()
            && state
                .cursors
                .get(SCOPE_CURSOR)
                .is_none_or(|fp| *fp != scope_fp);
        let incremental =
            !full && !rescoped && !state.cursors.is_empty() && state.last_applied.is_some();
        if rescoped && !full {
            reporter.note(if state.cursors.contains_key(SCOPE_CURSOR) {
                "the scope changed since the last run (groups, filter or search depth); \
                 reading the whole scope"
            } else {
                "the stored cursors do not say which scope they were read under (an earlier \
                 build stored them); reading the whole scope once"
            });
        }
        let key = if incremental {
            serde_json::to_string(&state.cursors).unwrap_or_default()
        } else {
            format!("full {scope_fp}")
        };
        if let Some(r) = self.reads.get(&key) {
            return r.clone();
        }
        let read = async {
            let _step = idsync_engine::progress::begin(
                idsync_engine::progress::Phase::Read,
                "reading the source",
                None,
            );
            Ok(match (incremental, &state.last_applied) {
                (true, Some(base)) => match source.read_changes(scope, base, &state.cursors).await?
                {
                    Changes::Read(r) => r,
                    Changes::Unsupported => source.read_full(scope).await?,
                    Changes::Expired(why) => {
                        reporter.note(&format!("{why}; reading the whole scope instead"));
                        source.read_full(scope).await?
                    }
                },
                _ => source.read_full(scope).await?,
            })
        }
        .await
        .map(|mut read: Read| {
            if !read.cursors.is_empty() {
                read.cursors.insert(SCOPE_CURSOR.to_owned(), scope_fp);
            }
            read
        });
        self.reads.insert(key, read.clone());
        read
    }
}
