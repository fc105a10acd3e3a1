//! Kanidm as a target, through its sync-account API (`docs/apis/kanidm-sync.md`), as Kanidm's own
//! LDAP and FreeIPA sync tools use it.
//!
//! A sync token may write and never read: `GET /scim/v1/Sync` answers only the agreement's cookie.
//! So this target cannot be observed ([`Target::readable`] is false). The runner asks it where
//! Kanidm stands against the cookie idsync recorded ([`Target::resume`]) and seeds it with idsync's
//! picture of what Kanidm holds ([`Target::seed`]); the operations of the plan are executed against
//! that copy, and [`Target::flush`] sends every principal they touched, in full (Kanidm purges and
//! sets every sync-owned attribute of an entry it is sent), in one `POST /scim/v1/Sync`: one
//! transaction on Kanidm's side, so a conflict changes nothing.
//!
//! - Where idsync left it ([`Sight::Same`]): only what changed is sent, with `Delete(uuids)` for
//!   what the plan deprovisions. Nothing changed: nothing is sent, and the cookie stays.
//! - Moved by something else ([`Sight::Moved`]): the picture is not trusted; the runner seeds only
//!   what idsync owns, by name, so every principal idsync wants is sent in full.
//! - Asking for a refresh ([`Sight::Refresh`], a first run or `kanidm system sync force-refresh`):
//!   every entry idsync holds is sent, and Kanidm deletes the agreement's entries not among them.
//!
//! A request larger than `max_request_bytes` (Kanidm refuses bodies over 32 MiB) is sent in
//! parts, each its own transaction, chained by cookies: people first, then groups (groups that
//! hold groups after them), deletions with the first part. A refresh too large for one request
//! lists every entry first in its smallest form (names only; Kanidm deletes what a refresh leaves
//! out), then sends in full what that left out (mail, descriptions, members): until those parts
//! arrive, Kanidm holds those attributes empty. Should a part fail, the parts before it stay applied and idsync's cookie no longer
//! matches Kanidm's, so the next run sends every principal it wants again.
//!
//! An entry's UUID is derived from the source's stable id ([`entry_uuid`]): Entra object ids,
//! Active Directory objectGUIDs and OpenLDAP entryUUIDs are UUIDs already; anything else gets a
//! name-based UUID.

pub mod config;
pub mod wire;

use crate::http::{Auth, ErrorKind, Http, HttpConfig, HttpError};
use crate::targets::Hints;
use async_trait::async_trait;
use idsync_engine::{Ending, Outcome, Seeding, Sight, Target, TargetError, TargetErrorKind};
use idsync_model::{Attr, Capabilities, Kind, Observed, Op, Principal, Secret};
use reqwest::Method;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use wire::{Retain, SyncState};

/// Kanidm refuses a sync request body larger than this (`DEFAULT_SCIM_SYNC_BYTES`,
/// `server/core/src/https/v1_scim.rs`).
pub const KANIDM_MAX_BYTES: usize = 32 * 1024 * 1024;

/// How to reach a Kanidm server's sync-account API.
#[derive(Clone, Debug)]
pub struct KanidmConfig {
    /// The server's origin, e.g. `https://idm.example.com`.
    pub url: String,
    /// The sync account's token (`kanidm system sync generate-token`).
    pub token: Secret,
    /// The HTTP client's settings.
    pub http: HttpConfig,
    /// The largest request body to send; larger imports go in parts.
    pub max_request_bytes: usize,
    /// Kanidm attribute names never sent (yielded to Kanidm with `set-yield-attributes`).
    pub yield_attributes: BTreeSet<String>,
    /// For finalise and terminate: a session token of an account that may manage sync accounts,
    /// and the sync account's name or UUID.
    pub admin: Option<(Secret, String)>,
}

/// What Kanidm can hold through a sync account: people and groups (no service principals; its
/// service accounts cannot be synced), groups in groups, names changed in place (an entry is its
/// UUID), names compared in lower case. It has no deactivation through sync.
pub fn capabilities() -> Capabilities {
    Capabilities {
        nested_groups: true,
        service_principals: false,
        service_principal_members: false,
        renamable: [Kind::User, Kind::Group].into(),
        deactivate: false,
        case_insensitive_keys: true,
        attributes: [
            Attr::Key,
            Attr::DisplayName,
            Attr::Emails,
            Attr::ExternalId,
            Attr::Description,
        ]
        .into(),
        group_policies: false,
        // Members are sent as the group's whole list, inside the one request.
        max_members_per_write: 1_000_000,
    }
}

/// The Kanidm entry UUID for a source principal: its id when that is a UUID already (Entra object
/// ids, Active Directory objectGUIDs, OpenLDAP entryUUIDs; braces and case do not matter), else a
/// name-based UUID: the first 16 bytes of SHA-256 over `idsync:kanidm:` and the id, with the
/// version 8 and variant bits set (RFC 9562 §5.8 and its Appendix B.2). The same id always gives
/// the same UUID, so an entry keeps its UUID across runs, renames and lost state.
pub fn entry_uuid(source_id: &str) -> String {
    if let Some(u) = parse_uuid(source_id) {
        return u;
    }
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("idsync:kanidm:{source_id}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A UUID in any of its usual spellings, hyphenated and in lower case; `None` otherwise.
fn parse_uuid(s: &str) -> Option<String> {
    let t = s.trim();
    let t = t
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(t);
    let hex: String = match t.len() {
        36 => {
            let dashes = t
                .char_indices()
                .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
            if !dashes {
                return None;
            }
            t.chars().filter(|c| *c != '-').collect()
        }
        32 => t.to_owned(),
        _ => return None,
    };
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(format_uuid(&b))
}

/// Why Kanidm would refuse `name` as an entry's name, if it would. Kanidm 1.7.4 takes, once ASCII
/// upper case is lowered, a letter followed by letters, digits, `.`, `_` and `-`, 64 characters at
/// most, and not `root` (`docs/apis/kanidm-sync.md`); anything else fails the whole request with
/// 400 `{"schemaviolation":{"invalidattributesyntax":"name"}}`, without saying which entry. idsync
/// checks first, so only the principal at fault fails.
pub fn name_problem(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    let first = n.chars().next();
    if first.is_none() {
        return Some("it is empty");
    }
    if !first.is_some_and(|c| c.is_ascii_lowercase()) {
        return Some("it does not begin with a letter");
    }
    if let Some(c) = n
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Some(match c {
            '@' => {
                "it holds an `@` (Kanidm names hold none: `{userName|localpart}` maps a login to its local part)"
            }
            ' ' => "it holds a space (`{displayName|slug}` makes one `-`)",
            c if !c.is_ascii() => {
                "it holds a letter outside ASCII (`{displayName|slug}` folds accents)"
            }
            _ => "it holds a character other than letters, digits, `.`, `_` and `-`",
        });
    }
    if n.len() > 64 {
        return Some("it is longer than 64 characters");
    }
    if n == "root" {
        return Some("`root` is reserved");
    }
    None
}

/// One entry as idsync pictures it in Kanidm.
#[derive(Clone, Debug)]
struct Held {
    principal: Principal,
    /// The source id, when an operation named it (the external id falls back to it).
    source: Option<String>,
    /// Member UUIDs (groups).
    members: BTreeSet<String>,
}

/// The picture of Kanidm the plan's operations are executed against, and what they changed.
#[derive(Debug, Default)]
struct Copy {
    /// Where Kanidm stood when the run began; `None` before [`Target::resume`].
    sight: Option<Sight>,
    /// The cookie Kanidm holds (`None`: it expects a refresh).
    cookie: Option<String>,
    /// Seeded in this process.
    seeded: bool,
    /// Every entry idsync holds, by UUID.
    held: HashMap<String, Held>,
    /// Entries to send.
    dirty: BTreeSet<String>,
    /// Entries the plan created (their names are new to Kanidm).
    created: BTreeSet<String>,
    /// Entries whose name the plan changed.
    renamed: BTreeSet<String>,
    /// Entries to delete.
    deleted: BTreeSet<String>,
    /// Idsync attributes never sent.
    yielded: BTreeSet<Attr>,
    /// A full run that may remove what idsync does not hold: `Retain` instead of `Delete`.
    retain_held: bool,
    /// The cookie the last successful flush left, for the state.
    recorded: Option<String>,
    /// Cookies made by this process (they must differ from one another).
    made: u64,
}

/// A Kanidm sync account as a target.
#[derive(Debug)]
pub struct KanidmTarget {
    cfg: KanidmConfig,
    http: Http,
    auth: Auth,
    copy: Mutex<Copy>,
    /// Sync requests sent and their bytes, for reports and benchmarks.
    sent: Mutex<(u64, u64, u64)>,
}

const HINTS: Hints = Hints {
    unauthorized: " Kanidm did not take the sync token: it is missing, mistyped, or was revoked (`kanidm system sync destroy-token`); make a new one with `kanidm system sync generate-token` and set KANIDM_SYNC_TOKEN.",
    forbidden: " Kanidm refused the token for the sync API: KANIDM_SYNC_TOKEN must be the sync account's token (`kanidm system sync generate-token`), not a person's session.",
    not_implemented: "",
};

fn err(kind: TargetErrorKind, message: impl Into<String>) -> TargetError {
    TargetError::new(kind, message)
}

fn bad_name(kind: Kind, name: &str, why: &str) -> TargetError {
    err(
        TargetErrorKind::Invalid,
        format!(
            "{kind} {name:?} cannot be a Kanidm name: {why}. Kanidm takes a letter followed by letters, digits, `.`, `_` and `-`, 64 characters at most. Map it to another name in the agreement's mapping, or leave it out of the scope; the other principals go on"
        ),
    )
}

impl KanidmTarget {
    /// A target for this server; nothing is sent until the runner resumes it.
    pub fn new(cfg: KanidmConfig) -> Result<Self, TargetError> {
        let http = Http::new(cfg.http.clone())
            .map_err(|e| crate::targets::target_error(e, &Hints::default()))?;
        let auth = Auth::Bearer(cfg.token.clone());
        Ok(KanidmTarget {
            cfg,
            http,
            auth,
            copy: Mutex::new(Copy::default()),
            sent: Mutex::new((0, 0, 0)),
        })
    }

    /// Sync requests sent so far: how many, their bytes in all, and the largest.
    pub fn sync_requests(&self) -> (u64, u64, u64) {
        *self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Copy> {
        self.copy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn endpoint(&self) -> String {
        format!("{}/scim/v1/Sync", self.cfg.url.trim_end_matches('/'))
    }

    /// What Kanidm answered, as a target error with what to do about it.
    fn refused(&self, e: HttpError) -> TargetError {
        let code = e.code.as_deref().unwrap_or_default();
        if code == "serdejsonerror" {
            return err(
                TargetErrorKind::Forbidden,
                format!(
                    "{}{}",
                    e.message,
                    " Kanidm could not read the token as a sync token: KANIDM_SYNC_TOKEN must be the sync account's token (`kanidm system sync generate-token`), not a person's session."
                ),
            );
        }
        if code == "invalidsyncstate" {
            return err(
                TargetErrorKind::Invalid,
                format!(
                    "{} Kanidm's sync state moved while idsync was writing (a `kanidm system sync force-refresh`, or another sync tool on the same account): Kanidm applied nothing of this request. Run again: the next run sees where Kanidm stands and sends what it needs.",
                    e.message
                ),
            );
        }
        if code == "schemaviolation/invalidattributesyntax" {
            return err(
                TargetErrorKind::Invalid,
                format!(
                    "{} Kanidm refused an attribute's value ({}), and applied nothing of this request.",
                    e.message,
                    if e.message.ends_with(": name") {
                        "a name: a letter followed by letters, digits, `.`, `_` and `-`, 64 characters at most"
                    } else {
                        "its syntax"
                    }
                ),
            );
        }
        if code == "invalidentrystate" {
            let yielded = if self.cfg.yield_attributes.is_empty() {
                "none".to_owned()
            } else {
                self.cfg
                    .yield_attributes
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return err(
                TargetErrorKind::Invalid,
                format!(
                    "{} Kanidm refused an entry and applied nothing of this request. Most often an attribute it does not let this sync account write: one yielded to Kanidm (`kanidm system sync set-yield-attributes`) must be in the target's yield_attributes too (now: {yielded}); else an entry UUID that Kanidm holds outside this agreement or in its recycle bin.",
                    e.message
                ),
            );
        }
        if e.status == Some(413) {
            return err(
                TargetErrorKind::Invalid,
                format!(
                    "{} The request was larger than the server takes: lower `max_request_bytes` (now {}) so imports go in smaller parts.",
                    e.message, self.cfg.max_request_bytes
                ),
            );
        }
        crate::targets::target_error(e, &HINTS)
    }

    /// A new cookie, unique to this request.
    fn next_cookie(copy: &mut Copy) -> String {
        use base64::Engine as _;
        copy.made += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "idsync:{nanos:x}:{}:{}",
            std::process::id(),
            copy.made
        ))
    }

    /// Reads where Kanidm stands.
    async fn state(&self) -> Result<SyncState, TargetError> {
        let a = self
            .http
            .send(Method::GET, &self.endpoint(), &self.auth, &[], None, false)
            .await
            .map_err(|e| self.refused(e))?;
        a.json::<SyncState>(&self.cfg.http.service, "GET /scim/v1/Sync")
            .map_err(|e| self.refused(e))
    }

    /// Sends one request. An answer lost on the way (a timeout, a dropped connection) is settled
    /// by reading the cookie: Kanidm holds `to` only if it committed.
    async fn post(&self, body: Vec<u8>, to: &str) -> Result<(), TargetError> {
        let sent = self
            .http
            .send(
                Method::POST,
                &self.endpoint(),
                &self.auth,
                &[],
                Some(("application/json", body)),
                false,
            )
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Protocol)
                    && e.code.is_none() =>
            {
                match self.state().await {
                    Ok(SyncState::Active { cookie }) if cookie == to => Ok(()),
                    _ if e.status.is_none() => Err(err(
                        TargetErrorKind::Unavailable,
                        format!(
                            "{} Kanidm had not committed the request when asked afterwards; it may still be applying it (a large import takes Kanidm minutes; the target's `timeout` is {} s). The next run sees whether it did, and sends what it needs.",
                            e.message,
                            self.cfg.http.timeout.as_secs()
                        ),
                    )),
                    _ => Err(self.refused(e)),
                }
            }
            Err(e) => Err(self.refused(e)),
        }
    }

    /// The message of a conflict: which entries may hold it and what to do.
    fn conflict(&self, e: TargetError, copy: &Copy) -> TargetError {
        let mut names: Vec<String> = copy
            .created
            .iter()
            .chain(copy.renamed.iter())
            .filter_map(|u| copy.held.get(u))
            .map(|h| format!("{} {:?}", h.principal.kind, h.principal.key))
            .collect();
        names.sort();
        names.dedup();
        let total = names.len();
        names.truncate(10);
        let more = if total > names.len() {
            format!(" and {} more", total - names.len())
        } else {
            String::new()
        };
        let which = if names.is_empty() {
            String::new()
        } else {
            format!(
                " The names and external ids this import gives for the first time: {}{more}.",
                names.join(", ")
            )
        };
        err(
            TargetErrorKind::AlreadyExists,
            format!(
                "{} Kanidm refused the import: an entry it holds outside this agreement already has a name or external id the import gives (attribute uniqueness), and it rolled the whole import back: nothing changed.{which} Resolve it, then run again: exclude the principal from the scope, or map it to another name in the agreement's mapping, or rename or remove the Kanidm entry that holds the name.",
                e.message
            ),
        )
    }

    /// Kanidm's entry for one held principal, as JSON bytes; `full` false gives its smallest form
    /// (names only: a person without mail, a group without description and members).
    fn entry(&self, uuid: &str, h: &Held, yielded: &BTreeSet<Attr>, full: bool) -> Vec<u8> {
        let p = &h.principal;
        let keep = |a: Attr, name: &str| {
            !yielded.contains(&a) && !self.cfg.yield_attributes.contains(name)
        };
        // Kanidm refuses an entry without one (400 `emptyrequest`), even in a refresh's listing.
        let external_id = Some(
            p.external_id
                .clone()
                .or_else(|| h.source.clone())
                .unwrap_or_else(|| uuid.to_owned()),
        );
        let e = match p.kind {
            Kind::Group => wire::Entry {
                schemas: vec![wire::schema("group")],
                id: uuid.to_owned(),
                external_id,
                name: keep(Attr::Key, "name").then(|| p.key.clone()),
                displayname: None,
                description: p
                    .description
                    .clone()
                    .filter(|_| full && keep(Attr::Description, "description")),
                mail: Vec::new(),
                member: (full && !self.cfg.yield_attributes.contains("member")).then(|| {
                    h.members
                        .iter()
                        .map(|m| wire::Member {
                            external_id: m.clone(),
                        })
                        .collect()
                }),
            },
            _ => wire::Entry {
                schemas: vec![wire::schema("account"), wire::schema("person")],
                id: uuid.to_owned(),
                external_id,
                name: keep(Attr::Key, "name").then(|| p.key.clone()),
                // Kanidm requires a display name of every person.
                displayname: keep(Attr::DisplayName, "displayname")
                    .then(|| p.display_name.clone().unwrap_or_else(|| p.key.clone())),
                description: None,
                mail: if full && keep(Attr::Emails, "mail") {
                    p.emails
                        .iter()
                        .enumerate()
                        .map(|(i, m)| wire::Mail {
                            value: m.clone(),
                            primary: i == 0,
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                member: None,
            },
        };
        serde_json::to_vec(&e).unwrap_or_default()
    }

    /// The requests that carry what the operations changed, in order.
    fn requests_for(&self, copy: &mut Copy) -> Result<Vec<wire::Part>, TargetError> {
        let sight = copy.sight.unwrap_or(Sight::Moved);
        let refresh = sight == Sight::Refresh;
        let send: Vec<String> = if refresh {
            let mut all: Vec<String> = copy.held.keys().cloned().collect();
            all.sort();
            all
        } else {
            copy.dirty
                .iter()
                .filter(|u| copy.held.contains_key(*u))
                .cloned()
                .collect()
        };
        let deleted: Vec<String> = if refresh {
            Vec::new()
        } else {
            copy.deleted.iter().cloned().collect()
        };
        if sight == Sight::Same && send.is_empty() && deleted.is_empty() {
            return Ok(Vec::new());
        }
        // People first, then groups, a group after the groups it holds (where there is no cycle).
        let (people, groups): (Vec<&String>, Vec<&String>) = send
            .iter()
            .partition(|u| copy.held[*u].principal.kind != Kind::Group);
        let groups = nesting_order(&groups, &copy.held);
        let retain = if copy.retain_held && !refresh {
            // A full run under `deprovision = "delete"`: whatever the agreement holds in Kanidm
            // beyond what idsync holds goes, forgotten leftovers included.
            let mut all: Vec<String> = copy.held.keys().cloned().collect();
            all.sort();
            Retain::Retain(all)
        } else if deleted.is_empty() {
            Retain::Ignore
        } else {
            Retain::Delete(deleted)
        };
        let yielded = copy.yielded.clone();
        let whole: Vec<Vec<u8>> = people
            .iter()
            .map(|u| self.entry(u, &copy.held[*u], &yielded, true))
            .chain(
                groups
                    .iter()
                    .map(|u| self.entry(u, &copy.held[*u], &yielded, true)),
            )
            .collect();
        let limit = self.cfg.max_request_bytes;
        let overhead = wire::OVERHEAD + retain.size();
        let total: usize = whole.iter().map(|e| e.len() + 1).sum::<usize>() + overhead;
        if total <= limit {
            return Ok(vec![wire::Part {
                entries: whole,
                retain,
            }]);
        }
        if refresh {
            // One request must list every entry, lest Kanidm delete it: every entry in its
            // smallest form first, then in full those it leaves something out of.
            let order: Vec<&String> = people.iter().chain(groups.iter()).copied().collect();
            let first: Vec<Vec<u8>> = order
                .iter()
                .map(|u| self.entry(u, &copy.held[*u], &yielded, false))
                .collect();
            let listed: usize = first.iter().map(|e| e.len() + 1).sum::<usize>() + overhead;
            if listed > limit {
                return Err(err(
                    TargetErrorKind::Invalid,
                    format!(
                        "Kanidm asks for a refresh, which must list every entry in one request (Kanidm deletes the agreement's entries a refresh leaves out), and the {} entries take {listed} bytes even in their smallest form (names only): more than max_request_bytes ({limit}; Kanidm refuses bodies over {KANIDM_MAX_BYTES}). Nothing was sent. Narrow the scope, or split it into several agreements, each with a sync account of its own",
                        whole.len()
                    ),
                ));
            }
            let rest: Vec<Vec<u8>> = whole
                .into_iter()
                .zip(&first)
                .filter(|(full, small)| full != *small)
                .map(|(full, _)| full)
                .collect();
            let mut parts = vec![wire::Part {
                entries: first,
                retain: Retain::Ignore,
            }];
            parts.extend(pack(rest, limit, wire::OVERHEAD)?);
            return Ok(parts);
        }
        let mut parts = pack(whole, limit, overhead)?;
        match parts.first_mut() {
            Some(first) => first.retain = retain,
            None => parts.push(wire::Part {
                entries: Vec::new(),
                retain,
            }),
        }
        // A group sent before a group it holds was created (a cycle across parts) would have lost
        // that member (Kanidm skips references it cannot resolve): such groups go again, last.
        let mut part_of: HashMap<&str, usize> = HashMap::new();
        let order: Vec<&String> = people
            .iter()
            .copied()
            .chain(groups.iter().copied())
            .collect();
        let mut i = 0;
        for (n, part) in parts.iter().enumerate() {
            for _ in &part.entries {
                part_of.insert(order[i].as_str(), n);
                i += 1;
            }
        }
        let again: Vec<Vec<u8>> = groups
            .iter()
            .filter(|g| {
                copy.held[**g].members.iter().any(|m| {
                    copy.created.contains(m) && part_of.get(m.as_str()) > part_of.get(g.as_str())
                })
            })
            .map(|g| self.entry(g, &copy.held[*g], &yielded, true))
            .collect();
        if !again.is_empty() {
            parts.extend(pack(again, limit, wire::OVERHEAD)?);
        }
        Ok(parts)
    }
}

/// Groups ordered so that a group comes after the groups it holds (depth first; a cycle is broken
/// where it closes).
fn nesting_order<'a>(groups: &[&'a String], held: &HashMap<String, Held>) -> Vec<&'a String> {
    let set: BTreeMap<&str, &'a String> = groups.iter().map(|g| (g.as_str(), *g)).collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        if done.contains(g.as_str()) {
            continue;
        }
        // Iterative depth-first search: (group, its members still to visit).
        let mut stack: Vec<(&'a String, Vec<&'a String>)> = Vec::new();
        done.insert(g.as_str());
        stack.push((g, children(g, &set, held)));
        while let Some((node, rest)) = stack.last_mut() {
            if let Some(next) = rest.pop() {
                if done.insert(next.as_str()) {
                    let c = children(next, &set, held);
                    stack.push((next, c));
                }
            } else {
                out.push(*node);
                stack.pop();
            }
        }
    }
    out
}

fn children<'a>(
    g: &str,
    set: &BTreeMap<&str, &'a String>,
    held: &HashMap<String, Held>,
) -> Vec<&'a String> {
    held.get(g)
        .map(|h| {
            h.members
                .iter()
                .filter_map(|m| set.get(m.as_str()).copied())
                .collect()
        })
        .unwrap_or_default()
}

/// Entries in parts of at most `limit` bytes each.
fn pack(
    entries: Vec<Vec<u8>>,
    limit: usize,
    overhead: usize,
) -> Result<Vec<wire::Part>, TargetError> {
    let mut parts = Vec::new();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut size = overhead;
    for e in entries {
        if e.len() + 1 + overhead > limit {
            return Err(err(
                TargetErrorKind::Invalid,
                format!(
                    "one entry takes {} bytes, more than max_request_bytes ({limit}) allows a request",
                    e.len()
                ),
            ));
        }
        if size + e.len() + 1 > limit && !cur.is_empty() {
            parts.push(wire::Part {
                entries: std::mem::take(&mut cur),
                retain: Retain::Ignore,
            });
            size = overhead;
        }
        size += e.len() + 1;
        cur.push(e);
    }
    if !cur.is_empty() {
        parts.push(wire::Part {
            entries: cur,
            retain: Retain::Ignore,
        });
    }
    Ok(parts)
}

#[async_trait]
impl Target for KanidmTarget {
    fn requests(&self) -> Option<idsync_engine::Requests> {
        Some(self.http.sent())
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    async fn observe(&self) -> Result<Observed, TargetError> {
        Err(err(
            TargetErrorKind::NotImplemented,
            "a Kanidm sync account can write entries but not read them: idsync plans against its own picture of what it wrote",
        ))
    }

    fn readable(&self) -> bool {
        false
    }

    async fn resume(&self, cursor: Option<&str>) -> Result<Sight, TargetError> {
        let state = self.state().await?;
        let (sight, cookie) = match state {
            SyncState::Refresh => (Sight::Refresh, None),
            SyncState::Active { cookie } => {
                if Some(cookie.as_str()) == cursor {
                    (Sight::Same, Some(cookie))
                } else {
                    (Sight::Moved, Some(cookie))
                }
            }
        };
        let mut c = self.lock();
        c.sight = Some(sight);
        c.cookie = cookie;
        Ok(sight)
    }

    fn seed(&self, picture: &Observed, how: &Seeding) {
        let mut c = self.lock();
        c.held = picture
            .iter()
            .map(|(_, id, p)| {
                (
                    id.to_owned(),
                    Held {
                        principal: p.principal.clone(),
                        source: None,
                        members: BTreeSet::new(),
                    },
                )
            })
            .collect();
        for (g, ms) in &picture.members {
            if let Some(h) = c.held.get_mut(g) {
                h.members = ms.iter().map(|(_, m)| m.to_owned()).collect();
            }
        }
        c.yielded = how.yielded.clone();
        c.retain_held = how.whole && how.prune;
        c.dirty.clear();
        c.created.clear();
        c.renamed.clear();
        c.deleted.clear();
        c.recorded = None;
        c.seeded = true;
    }

    fn seeded(&self) -> bool {
        self.lock().seeded
    }

    fn cursor(&self) -> Option<String> {
        self.lock().recorded.clone()
    }

    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
        let mut c = self.lock();
        if !c.seeded {
            return Err(err(
                TargetErrorKind::Invalid,
                "the Kanidm target was not given idsync's picture before the apply",
            ));
        }
        let missing = |id: &str| {
            err(
                TargetErrorKind::NotFound,
                format!("Kanidm entry {id} is not in idsync's picture"),
            )
        };
        match op {
            Op::Create { principal, source } => {
                if let Some(why) = name_problem(&principal.key) {
                    return Err(bad_name(principal.kind, &principal.key, why));
                }
                let uuid = entry_uuid(&source.id);
                if c.held
                    .get(&uuid)
                    .is_some_and(|h| h.principal.kind != principal.kind)
                {
                    return Err(err(
                        TargetErrorKind::AlreadyExists,
                        format!(
                            "the UUID {uuid} derived from source id {:?} is held by another of idsync's entries",
                            source.id
                        ),
                    ));
                }
                c.deleted.remove(&uuid);
                c.held.insert(
                    uuid.clone(),
                    Held {
                        principal: principal.clone(),
                        source: Some(source.id.clone()),
                        members: BTreeSet::new(),
                    },
                );
                c.dirty.insert(uuid.clone());
                c.created.insert(uuid.clone());
                Ok(Outcome::Created(uuid))
            }
            Op::Update {
                target,
                source,
                changes,
            } => {
                for ch in changes {
                    if let (Attr::Key, idsync_model::AttrValue::Text(Some(k))) = (ch.attr, &ch.to)
                        && let Some(why) = name_problem(k)
                    {
                        return Err(bad_name(target.kind, k, why));
                    }
                }
                let id = target.id.as_deref().unwrap_or_default().to_owned();
                let h = c.held.get_mut(&id).ok_or_else(|| missing(&id))?;
                h.source = Some(source.id.clone());
                for ch in changes {
                    h.principal.set(ch.attr, &ch.to);
                }
                let renamed = changes.iter().any(|ch| ch.attr == Attr::Key);
                c.dirty.insert(id.clone());
                if renamed {
                    c.renamed.insert(id);
                }
                Ok(Outcome::Done)
            }
            Op::AddMembers { group, members } | Op::RemoveMembers { group, members } => {
                let add = matches!(op, Op::AddMembers { .. });
                let id = group.id.as_deref().unwrap_or_default().to_owned();
                let h = c.held.get_mut(&id).ok_or_else(|| missing(&id))?;
                for m in members {
                    if let Some(mid) = &m.id {
                        if add {
                            h.members.insert(mid.clone());
                        } else {
                            h.members.remove(mid);
                        }
                    }
                }
                c.dirty.insert(id);
                Ok(Outcome::Done)
            }
            Op::Delete { target, .. } => {
                let id = target.id.as_deref().unwrap_or_default().to_owned();
                c.held.remove(&id);
                c.dirty.remove(&id);
                c.created.remove(&id);
                // Kanidm removes a deleted entry from the groups that held it (referential
                // integrity); the picture does the same.
                for h in c.held.values_mut() {
                    h.members.remove(&id);
                }
                c.deleted.insert(id);
                Ok(Outcome::Done)
            }
            Op::Adopt { .. } | Op::Forget { .. } => Ok(Outcome::Done),
            Op::Deactivate { .. } => Err(err(
                TargetErrorKind::NotImplemented,
                "Kanidm's sync API cannot deactivate an account; use deprovision = \"delete\" or \"none\"",
            )),
            Op::AttachPolicies { .. } | Op::DetachPolicies { .. } => Err(err(
                TargetErrorKind::NotImplemented,
                "Kanidm groups carry no policies",
            )),
        }
    }

    async fn end(&self, how: Ending) -> Result<bool, TargetError> {
        let verb = match how {
            Ending::Finalise => "finalise",
            Ending::Terminate => "terminate",
        };
        let Some((token, account)) = &self.cfg.admin else {
            return match how {
                // Without it, the deletions go through the sync API; the account stays.
                Ending::Terminate => Ok(false),
                Ending::Finalise => Err(err(
                    TargetErrorKind::Invalid,
                    "finalising is Kanidm's own operation (it lifts the sync account's authority from every entry it imported, then deletes the account; a sync token may not): set KANIDM_ADMIN_TOKEN to a session of an account that manages sync accounts, and `sync_account` to the sync account's name, then finalise again",
                )),
            };
        };
        let url = format!(
            "{}/v1/sync_account/{}/_{verb}",
            self.cfg.url.trim_end_matches('/'),
            crate::http::percent_encode(account, b"-_.")
        );
        let admin = Auth::Bearer(token.clone());
        // A GET in Kanidm's API, but not one to repeat blindly: sent once.
        self.http
            .send(Method::GET, &url, &admin, &[], None, false)
            .await
            .map_err(|e| {
                let hint = match e.status {
                    Some(401) => " KANIDM_ADMIN_TOKEN was refused: log in again and set a fresh session token.",
                    Some(403) => " The account of KANIDM_ADMIN_TOKEN may not manage sync accounts (it needs to be in idm_admins or system_admins).",
                    Some(404) => " Kanidm has no sync account by that name: check `sync_account`.",
                    _ => "",
                };
                err(
                    crate::targets::target_error(e.clone(), &Hints::default()).kind,
                    format!("{}{hint}", e.message),
                )
            })?;
        Ok(true)
    }

    async fn flush(&self) -> Result<(), TargetError> {
        let (parts, mut from, n) = {
            let mut c = self.lock();
            if !c.seeded {
                return Ok(());
            }
            let parts = self.requests_for(&mut c)?;
            let from = match (&c.sight, &c.cookie) {
                (Some(Sight::Refresh), _) | (_, None) => SyncState::Refresh,
                (_, Some(cookie)) => SyncState::Active {
                    cookie: cookie.clone(),
                },
            };
            let n = parts.len();
            (parts, from, n)
        };
        if n == 0 {
            return Ok(());
        }
        for (i, part) in parts.into_iter().enumerate() {
            let to = {
                let mut c = self.lock();
                Self::next_cookie(&mut c)
            };
            let body = part.body(&from, &to);
            {
                let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
                sent.0 += 1;
                sent.1 += body.len() as u64;
                sent.2 = sent.2.max(body.len() as u64);
            }
            tracing::debug!(
                part = i + 1,
                of = n,
                bytes = body.len(),
                entries = part.entries.len(),
                "kanidm sync request"
            );
            if let Err(e) = self.post(body, &to).await {
                let c = self.lock();
                let e = if e.kind == TargetErrorKind::AlreadyExists
                    || e.message.contains("attrunique")
                    || e.message.contains("Attribute uniqueness")
                {
                    self.conflict(e, &c)
                } else {
                    e
                };
                if i == 0 {
                    return Err(e);
                }
                return Err(err(
                    e.kind,
                    format!(
                        "{} This was part {} of {n} of the import: the parts before it are applied and stay, the rest is not; the next run sends every principal idsync wants again.",
                        e.message,
                        i + 1
                    ),
                ));
            }
            let mut c = self.lock();
            c.cookie = Some(to.clone());
            c.sight = Some(Sight::Same);
            c.recorded = Some(to.clone());
            from = SyncState::Active { cookie: to };
        }
        let mut c = self.lock();
        c.dirty.clear();
        c.created.clear();
        c.renamed.clear();
        c.deleted.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_from_source_ids() {
        let entra = "5F1C3A1E-0B7D-4E55-9B41-2F7F64F4A001";
        assert_eq!(entry_uuid(entra), entra.to_lowercase());
        assert_eq!(
            entry_uuid("{5f1c3a1e-0b7d-4e55-9b41-2f7f64f4a001}"),
            entra.to_lowercase()
        );
        assert_eq!(
            entry_uuid("5f1c3a1e0b7d4e559b412f7f64f4a001"),
            entra.to_lowercase()
        );
        let dn = entry_uuid("uid=alice,ou=people,dc=example,dc=com");
        assert_eq!(dn, entry_uuid("uid=alice,ou=people,dc=example,dc=com"));
        assert_ne!(dn, entry_uuid("uid=bob,ou=people,dc=example,dc=com"));
        assert!(parse_uuid(&dn).is_some(), "{dn}");
        // Version 8, RFC 4122 variant.
        assert_eq!(&dn[14..15], "8");
        assert!(matches!(&dn[19..20], "8" | "9" | "a" | "b"), "{dn}");
        // Not a UUID: misplaced dashes, non-hex.
        assert_eq!(parse_uuid("5f1c3a1e0-b7d-4e55-9b41-2f7f64f4a001"), None);
        assert_eq!(parse_uuid("zf1c3a1e-0b7d-4e55-9b41-2f7f64f4a001"), None);
    }

    #[test]
    fn names_as_kanidm_takes_them() {
        for ok in [
            "alice",
            "Alice",
            "alice.smith",
            "a",
            "team_alpha",
            "x.",
            "a--b",
            &"y".repeat(64),
        ] {
            assert_eq!(name_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "alice@corp.example",
            "data eng",
            "data (eng)",
            "chloé",
            "1abc",
            "_x",
            "-lead",
            "root",
            "a+b",
            &"z".repeat(65),
        ] {
            assert!(name_problem(bad).is_some(), "{bad}");
        }
        assert!(name_problem("a@b").unwrap().contains("localpart"));
    }

    #[test]
    fn groups_after_the_groups_they_hold() {
        let mk = |members: &[&str]| Held {
            principal: Principal::new(Kind::Group, "g"),
            source: None,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        let held: HashMap<String, Held> = [
            ("a".to_owned(), mk(&["b", "u"])),
            ("b".to_owned(), mk(&["c"])),
            ("c".to_owned(), mk(&[])),
            ("x".to_owned(), mk(&["y"])),
            ("y".to_owned(), mk(&["x"])),
        ]
        .into();
        let names: Vec<String> = ["a", "b", "c", "x", "y"].map(str::to_owned).to_vec();
        let refs: Vec<&String> = names.iter().collect();
        let order: Vec<&str> = nesting_order(&refs, &held)
            .into_iter()
            .map(String::as_str)
            .collect();
        let pos = |g: &str| order.iter().position(|x| *x == g).unwrap();
        assert_eq!(order.len(), 5, "{order:?}");
        assert!(pos("c") < pos("b") && pos("b") < pos("a"), "{order:?}");
    }

    #[test]
    fn parts_stay_under_the_limit() {
        let entries: Vec<Vec<u8>> = (0..10).map(|_| vec![b'x'; 100]).collect();
        let parts = pack(entries.clone(), 350, 50).unwrap();
        assert_eq!(parts.iter().map(|p| p.entries.len()).sum::<usize>(), 10);
        for p in &parts {
            assert!(p.entries.iter().map(|e| e.len() + 1).sum::<usize>() + 50 <= 350);
        }
        assert!(pack(entries, 120, 50).is_err());
    }
}
