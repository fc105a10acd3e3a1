//! The LDAP / Active Directory source.
//!
//! A full read searches the users and the groups, each in pages (the paged-results control, RFC
//! 2696), resolves the groups' member DNs (or `memberUid` login names) to the entries' stable ids
//! (`entryUUID`; Active Directory's `objectGUID` as a GUID string), and draws the scope from that
//! directory as for any source ([`idsync_engine::scope::select`]).
//!
//! Incremental reads use RFC 4533 content synchronisation in refreshOnly mode (OpenLDAP's
//! `syncprov` overlay): the full read first asks for a cookie, each later read sends it back and
//! gets the entries added or changed since (renames keep their entryUUID), the deleted ones as
//! UUIDs, or, when the server has no session log to answer from, a present phase that lists what
//! is still there. A server without `syncprov` is read in full on every run, and the plan says why.
//!
//! Active Directory has no RFC 4533. Its incremental reads poll `uSNChanged` above the
//! `highestCommittedUSN` the last read started from, on the same domain controller (its
//! `invocationId` is kept in the cursor; another one, or a restored one, means a full read):
//! the users and groups changed under the bases, the ids of user and group objects changed
//! anywhere in the naming context (moved out of a base, or no longer matching a filter), and
//! tombstones through the show-deleted control. This needs only read rights, where the DirSync
//! control needs "Replicating Directory Changes" on the whole domain and returns changed
//! attributes only (a second read per entry anyway). Groups are read in ranges of 1,500 members.
//!
//! The changes go to the engine's fold, which asks this source ([`Lookup`]) only for what the
//! snapshot lacks.
//!
//! Facts and sources: docs/apis/ldap.md.

pub mod config;
pub mod escape;
pub mod wire;

use self::config::{Flavour, LdapSourceConfig};
use self::escape::{any_of, dn_key};
use self::wire::{Entry, State, SyncInfo};
use async_trait::async_trait;
use base64::Engine as _;
use idsync_engine::fold::{DirectoryLookup, Lookup};
use idsync_engine::scope::{self, Scope};
use idsync_engine::{Changes, Read, Source, SourceError, SourceErrorKind};
use idsync_model::{Change, Group, Kind, Member, ReadMode, ServicePrincipal, Snapshot, User};
use ldap3::controls::{RawControl, RefreshMode, SyncRequest};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope as LdapScope};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The cursor of the users' search in the agreement state.
pub const USERS_CURSOR: &str = "ldap.users";
/// The cursor of the groups' search.
pub const GROUPS_CURSOR: &str = "ldap.groups";

/// Values per filter when entries are read by id or DN.
const BATCH: usize = 50;

/// The cursor of an Active Directory change read: the domain controller's `invocationId` and
/// the `highestCommittedUSN` read before the last successful read (`<guid>/<usn>`).
pub const AD_CURSOR: &str = "ldap.ad.usn";

/// Active Directory's default MaxValRange: values of one attribute returned at once.
const RANGE: u64 = 1500;

/// The show-deleted control (MS-ADTS 3.1.1.3.4.1.14, LDAP_SERVER_SHOW_DELETED_OID): tombstones
/// are returned, with their objectGUID.
const SHOW_DELETED: &str = "1.2.840.113556.1.4.417";

/// The well-known GUID of a naming context's Deleted Objects container
/// (MS-ADTS 6.1.1.4, GUID_DELETED_OBJECTS_CONTAINER_W).
const DELETED_OBJECTS_WKGUID: &str = "18e2ea80684f11d2b9aa00c04f79f805";

/// The root DSE attribute listing the controls a server supports.
const SUPPORTED_CONTROL: &str = "supportedControl";
/// Active Directory's capability OID (MS-ADTS 3.1.1.3.4.3: LDAP_CAP_ACTIVE_DIRECTORY_OID).
const AD_CAPABILITY: &str = "1.2.840.113556.1.4.800";

/// Attributes never kept for templates: secrets and binary blobs.
fn hidden(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    // Active Directory's back links (msDS-...BL) change with their forward link, not the entry.
    if n.starts_with("msds-") && n.ends_with("bl") {
        return true;
    }
    n.contains("password")
        || n.contains("pwd")
        || matches!(
            n.as_str(),
            "objectguid"
                | "objectsid"
                | "jpegphoto"
                | "thumbnailphoto"
                | "usercertificate"
                | "msexchmailboxsecuritydescriptor"
                | "ntsecuritydescriptor"
                // Values that change without the entry's uSNChanged (or entryCSN): back links,
                // a DN link that follows its target's rename, attributes kept per domain
                // controller. An incremental read would keep stale copies of them.
                | "memberof"
                | "directreports"
                | "managedobjects"
                | "manager"
                | "lastlogon"
                | "lastlogoff"
                | "logoncount"
                | "badpwdcount"
                | "badpasswordtime"
        )
}

/// An LDAP source.
#[derive(Debug)]
pub struct LdapSource {
    cfg: LdapSourceConfig,
    counts: Arc<Counts>,
}

/// What the source asked the directory for since it was made (a benchmark's and a test's
/// measure of what a read costs).
#[derive(Debug, Default)]
pub struct Counts {
    /// Connections opened (each with a bind when a bind DN is set).
    pub connections: AtomicU64,
    /// Search requests sent; a paged search counts each page it asked for.
    pub searches: AtomicU64,
    /// Entries the searches returned (content synchronisation: also entries only marked present).
    pub entries: AtomicU64,
}

/// A copy of [`Counts`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountsNow {
    /// Connections opened.
    pub connections: u64,
    /// Search requests sent.
    pub searches: u64,
    /// Entries returned.
    pub entries: u64,
}

impl std::ops::Sub for CountsNow {
    type Output = CountsNow;
    fn sub(self, o: CountsNow) -> CountsNow {
        CountsNow {
            connections: self.connections - o.connections,
            searches: self.searches - o.searches,
            entries: self.entries - o.entries,
        }
    }
}

/// What the flavour decides.
#[derive(Clone, Debug)]
struct Dialect {
    flavour: Flavour,
    id_attr: &'static str,
    dn_attr: &'static str,
    user_filter: String,
    group_filter: String,
    username: String,
    /// Whether the server offers RFC 4533 content synchronisation.
    sync: bool,
}

/// One connection, bound.
struct Conn {
    ldap: Ldap,
    counts: Arc<Counts>,
    cfg: LdapSourceConfig,
    d: Dialect,
}

fn err(kind: SourceErrorKind, m: impl Into<String>) -> SourceError {
    SourceError::of(kind, m)
}

/// A failed LDAP operation as a source error naming the server and what to do.
fn ldap_error(cfg: &LdapSourceConfig, what: &str, e: LdapError) -> SourceError {
    match e {
        LdapError::LdapResult { result } => result_error(cfg, what, result.rc, &result.text),
        LdapError::Timeout { .. } => err(
            SourceErrorKind::Unavailable,
            format!(
                "{what}: {} did not answer within {} s (raise timeout)",
                cfg.server_endpoint,
                cfg.timeout.as_secs()
            ),
        ),
        other => err(
            SourceErrorKind::Unavailable,
            format!(
                "{what}: the connection to {} failed: {other}{}",
                cfg.server_endpoint,
                if what == "binding" {
                    " (the server closed it or did not answer in LDAP: check that server_endpoint names an LDAP server, and that ldap:// or ldaps:// matches its port, e.g. 389 or 636)"
                } else {
                    " (the server closed it in the middle of the answer)"
                }
            ),
        ),
    }
}

/// An LDAP result code (RFC 4511 appendix A) as a source error.
fn result_error(cfg: &LdapSourceConfig, what: &str, rc: u32, text: &str) -> SourceError {
    let text = if text.is_empty() {
        String::new()
    } else {
        format!(" ({text})")
    };
    let (kind, why) = match rc {
        3 => (
            SourceErrorKind::Unavailable,
            "the server's time limit was exceeded: raise the bind DN's time limit, or narrow the filter".to_owned(),
        ),
        4 => (
            SourceErrorKind::Invalid,
            "the server's size limit was exceeded: raise the bind DN's size limit (OpenLDAP: `limits dn.exact=\"...\" size.prtotal=unlimited`; Active Directory: the MaxResultSetSize LDAP policy, or a page_size at most its MaxPageSize), or narrow the filter".to_owned(),
        ),
        10 => (
            SourceErrorKind::Invalid,
            "the server answered with a referral, which idsync does not chase: point server_endpoint at the server that holds this base DN".to_owned(),
        ),
        12 => (
            SourceErrorKind::Invalid,
            "the server refused a critical control idsync sent (Active Directory's change read: show deleted objects; OpenLDAP's: content synchronisation, the syncprov overlay)".to_owned(),
        ),
        32 => (
            SourceErrorKind::NotFound,
            "the base DN does not exist on this server: check user_base_dn and group_base_dn".to_owned(),
        ),
        34 => (SourceErrorKind::Invalid, "a DN is malformed".to_owned()),
        48 | 49 => (
            SourceErrorKind::Unauthorized,
            format!(
                "the bind as {} was refused: wrong bind_dn or password (LDAP_BIND_PASSWORD), or the account is locked",
                cfg.bind_dn.as_deref().unwrap_or("anonymous")
            ),
        ),
        50 => (
            SourceErrorKind::Forbidden,
            "the bind DN may not read this: grant it read access to the users and groups".to_owned(),
        ),
        51..=53 => (
            SourceErrorKind::Unavailable,
            "the server is busy or unavailable".to_owned(),
        ),
        80 => (SourceErrorKind::Unavailable, "the server failed".to_owned()),
        _ => (SourceErrorKind::Protocol, "the server refused it".to_owned()),
    };
    err(
        kind,
        format!(
            "{what} on {}: LDAP result {rc}{text}: {why}",
            cfg.server_endpoint
        ),
    )
}

/// A rustls configuration trusting the system's roots and `ca_bundle`.
fn tls_config(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, SourceError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let pem = std::fs::read(path).map_err(|e| {
        err(
            SourceErrorKind::Invalid,
            format!("cannot read the CA bundle {}: {e}", path.display()),
        )
    })?;
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| {
            err(
                SourceErrorKind::Invalid,
                format!(
                    "the CA bundle {} is not PEM certificates: {e}",
                    path.display()
                ),
            )
        })?;
        roots.add(c).map_err(|e| {
            err(
                SourceErrorKind::Invalid,
                format!("the CA bundle {}: {e}", path.display()),
            )
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(err(
            SourceErrorKind::Invalid,
            format!("the CA bundle {} holds no PEM certificate", path.display()),
        ));
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// What one search returned.
#[derive(Default)]
struct Found {
    entries: Vec<Entry>,
    referrals: Vec<String>,
}

/// What a content synchronisation search returned.
#[derive(Default, Debug)]
struct Synced {
    /// Added or changed entries, with their UUIDs.
    changed: Vec<(String, Entry)>,
    /// UUIDs deleted.
    deleted: BTreeSet<String>,
    /// UUIDs present (unchanged) in a present phase.
    present: BTreeSet<String>,
    /// Whether a present phase ran: what it did not list is gone.
    present_phase: bool,
    /// The new cookie.
    cookie: Option<Vec<u8>>,
}

impl Synced {
    /// The UUIDs gone: those deleted, and after a present phase those of `known` it neither
    /// listed as present nor sent as changed.
    fn gone<'a>(&self, known: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
        let mut out = self.deleted.clone();
        if self.present_phase {
            let changed: BTreeSet<&String> = self.changed.iter().map(|(u, _)| u).collect();
            out.extend(
                known
                    .filter(|id| !self.present.contains(*id) && !changed.contains(id))
                    .cloned(),
            );
        }
        out
    }
}

/// How a sync search ended when it did not give changes.
enum SyncEnd {
    /// The server no longer knows the cookie (e-syncRefreshRequired, 4096).
    RefreshRequired,
    /// The server has no content synchronisation (no syncprov).
    Unsupported(String),
}

impl SyncEnd {
    /// A change read that could not be made: the run reads in full, and says why.
    fn expired(self) -> Changes {
        Changes::Expired(match self {
            SyncEnd::RefreshRequired => {
                "the directory no longer knows the sync cookie (e-syncRefreshRequired)".into()
            }
            SyncEnd::Unsupported(why) => format!("content synchronisation was refused ({why})"),
        })
    }
}

/// Where an Active Directory domain controller stands: USNs count that controller's own
/// changes, so they are compared only while its `invocationId` is the same.
struct AdPosition {
    invocation: String,
    usn: u64,
    /// The naming context this server holds that contains both bases (none: they are not in
    /// one, e.g. a Global Catalog or another domain's base).
    naming_context: Option<String>,
    /// How long tombstones are kept, in seconds (`tombstoneLifetime`, in days; 60 when unset).
    tombstone_lifetime: u64,
    /// When the position was read (unix seconds, this machine's clock).
    at: u64,
}

impl AdPosition {
    fn cursor(&self) -> String {
        format!("{}/{}/{}", self.invocation, self.usn, self.at)
    }
}

/// An [`AD_CURSOR`] value as (invocationId, USN, unix seconds).
fn parse_ad_cursor(s: &str) -> Option<(String, u64, u64)> {
    let mut parts = s.split('/');
    let (inv, usn, at) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || inv.len() != 36 {
        return None;
    }
    Some((inv.to_owned(), usn.parse().ok()?, at.parse().ok()?))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a filter names a back link (`memberOf`) or the in-chain rule over one: a change of
/// membership does not change the user's uSNChanged, so a change read cannot see who newly
/// matches or no longer does.
fn names_back_link(filter: &str) -> bool {
    let f = filter.to_ascii_lowercase();
    f.contains("memberof") || f.contains("1.2.840.113556.1.4.1941")
}

/// Whether `dn` is `base` or below it.
fn under(dn: &str, base: &str) -> bool {
    let (d, b) = (dn_key(dn), dn_key(base));
    b.is_empty() || d == b || d.ends_with(&format!(",{b}"))
}

/// What a change read found, before it is folded: entries added or changed, ids gone.
#[derive(Default)]
struct Delta {
    users: Vec<Entry>,
    users_gone: BTreeSet<String>,
    groups: Vec<Entry>,
    groups_gone: BTreeSet<String>,
}

impl Conn {
    async fn open(cfg: &LdapSourceConfig, counts: Arc<Counts>) -> Result<Conn, SourceError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(cfg.timeout)
            .set_starttls(cfg.start_tls);
        if let Some(ca) = &cfg.ca_bundle {
            settings = settings.set_config(tls_config(ca)?);
        }
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &cfg.server_endpoint)
            .await
            .map_err(|e| match e {
                LdapError::Timeout { .. } => err(
                    SourceErrorKind::Unavailable,
                    format!(
                        "connecting to {}: no answer within {} s",
                        cfg.server_endpoint,
                        cfg.timeout.as_secs()
                    ),
                ),
                other => {
                    let text = other.to_string();
                    let hint = if text.contains("certificate") {
                        if cfg.ca_bundle.is_some() {
                            ": the server's certificate does not verify against ca_bundle (is it the CA that issued it, and does the certificate name this host?)"
                        } else {
                            ": the server's certificate is not trusted by this machine: set ca_bundle to the PEM file of the CA that issued it"
                        }
                    } else {
                        ""
                    };
                    err(
                        SourceErrorKind::Unavailable,
                        format!("connecting to {}: {text}{hint}", cfg.server_endpoint),
                    )
                }
            })?;
        ldap3::drive!(conn);
        if let Some(dn) = &cfg.bind_dn {
            let pw = cfg
                .bind_password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            let r = ldap
                .with_timeout(cfg.timeout)
                .simple_bind(dn, &pw)
                .await
                .map_err(|e| ldap_error(cfg, "binding", e))?;
            if r.rc != 0 {
                return Err(result_error(cfg, "binding", r.rc, &r.text));
            }
        }
        counts.connections.fetch_add(1, Relaxed);
        let mut c = Conn {
            ldap,
            counts,
            cfg: cfg.clone(),
            d: Dialect {
                flavour: cfg.flavour,
                id_attr: "entryUUID",
                dn_attr: "entryDN",
                user_filter: String::new(),
                group_filter: String::new(),
                username: String::new(),
                sync: false,
            },
        };
        c.dialect().await?;
        Ok(c)
    }

    /// Reads the root DSE: the flavour (when auto) and whether content synchronisation is there.
    async fn dialect(&mut self) -> Result<(), SourceError> {
        let dse = self
            .search_once(
                "",
                LdapScope::Base,
                "(objectClass=*)",
                &[SUPPORTED_CONTROL, "supportedCapabilities"],
            )
            .await?;
        let root = dse.entries.into_iter().next().unwrap_or_default();
        let controls = root.texts(SUPPORTED_CONTROL);
        let ad = root
            .texts("supportedCapabilities")
            .iter()
            .any(|c| c == AD_CAPABILITY);
        let flavour = match self.cfg.flavour {
            Flavour::Auto if ad => Flavour::ActiveDirectory,
            Flavour::Auto => Flavour::OpenLdap,
            f => f,
        };
        let c = &self.cfg;
        self.d = if flavour == Flavour::ActiveDirectory {
            Dialect {
                flavour,
                id_attr: "objectGUID",
                dn_attr: "distinguishedName",
                user_filter: c
                    .user_filter
                    .clone()
                    .unwrap_or_else(|| "(&(objectCategory=person)(objectClass=user))".into()),
                group_filter: c
                    .group_filter
                    .clone()
                    .unwrap_or_else(|| "(objectClass=group)".into()),
                username: c
                    .username_attribute
                    .clone()
                    .unwrap_or_else(|| "sAMAccountName".into()),
                sync: false,
            }
        } else {
            Dialect {
                flavour,
                id_attr: "entryUUID",
                dn_attr: "entryDN",
                user_filter: c
                    .user_filter
                    .clone()
                    .unwrap_or_else(|| "(objectClass=inetOrgPerson)".into()),
                group_filter: c.group_filter.clone().unwrap_or_else(|| {
                    "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))"
                        .into()
                }),
                username: c
                    .username_attribute
                    .clone()
                    .unwrap_or_else(|| "uid".into()),
                sync: controls.iter().any(|o| o == wire::SYNC_REQUEST),
            }
        };
        Ok(())
    }

    /// One search without paging (the root DSE, a base object, a handful by id).
    async fn search_once(
        &mut self,
        base: &str,
        scope: LdapScope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Found, SourceError> {
        self.search(base, scope, filter, attrs, false).await
    }

    /// A search, in pages when `paged`; every entry read, referrals reported.
    async fn search(
        &mut self,
        base: &str,
        scope: LdapScope,
        filter: &str,
        attrs: &[&str],
        paged: bool,
    ) -> Result<Found, SourceError> {
        self.search_with(base, scope, filter, attrs, paged, Vec::new())
            .await
    }

    /// A search with these request controls (kept on every page).
    async fn search_with(
        &mut self,
        base: &str,
        scope: LdapScope,
        filter: &str,
        attrs: &[&str],
        paged: bool,
        controls: Vec<RawControl>,
    ) -> Result<Found, SourceError> {
        let what = format!("searching {base:?} for {filter}");
        let cfg = self.cfg.clone();
        let attrs: Vec<String> = attrs.iter().map(|a| (*a).to_owned()).collect();
        let mut ldap = self.ldap.clone();
        ldap.with_timeout(cfg.timeout);
        let mut found = Found::default();
        let mut cookie: Vec<u8> = Vec::new();
        let mut seen_dns: std::collections::HashSet<String> = Default::default();
        let mut empty_pages = 0;
        loop {
            let before = found.entries.len();
            let mut ctrls = controls.clone();
            if paged {
                ctrls.push(RawControl {
                    ctype: wire::PAGED_RESULTS.to_owned(),
                    crit: false,
                    val: Some(wire::paged_request(cfg.page_size, &cookie)),
                });
            }
            let mut ldap = ldap.clone();
            if !ctrls.is_empty() {
                ldap.with_controls(ctrls);
            }
            self.counts.searches.fetch_add(1, Relaxed);
            let mut stream = ldap
                .streaming_search(base, scope, filter, attrs.clone())
                .await
                .map_err(|e| ldap_error(&cfg, &what, e))?;
            loop {
                let next = stream.next().await.map_err(|e| ldap_error(&cfg, &what, e));
                let item = match next {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = stream.finish().await;
                        return Err(e);
                    }
                };
                if let Some(urls) = wire::referral(&item.0) {
                    found.referrals.extend(urls);
                } else if wire::intermediate(&item.0).is_some() {
                    continue;
                } else if let Some(e) = wire::entry(&item.0) {
                    self.counts.entries.fetch_add(1, Relaxed);
                    if !seen_dns.insert(e.dn.clone()) {
                        let _ = stream.finish().await;
                        return Err(err(
                            SourceErrorKind::Protocol,
                            format!(
                                "{what}: {} sent {} twice in one search: stopped, instead of reading the same pages again",
                                cfg.server_endpoint, e.dn
                            ),
                        ));
                    }
                    found.entries.push(e);
                    idsync_engine::progress::add(idsync_engine::progress::Phase::Read, 1);
                } else {
                    let _ = stream.finish().await;
                    return Err(err(
                        SourceErrorKind::Protocol,
                        format!(
                            "{what}: {} sent a message that is not a search entry",
                            cfg.server_endpoint
                        ),
                    ));
                }
            }
            let res = stream.finish().await;
            match res.rc {
                0 => {}
                10 => {
                    found.referrals.extend(res.refs.iter().cloned());
                    return Ok(found);
                }
                rc => return Err(result_error(&cfg, &what, rc, &res.text)),
            }
            if !paged {
                return Ok(found);
            }
            // The next page, while the server sends a cookie (RFC 2696 section 3).
            let next = res
                .ctrls
                .iter()
                .find(|c| c.1.ctype == wire::PAGED_RESULTS)
                .and_then(|c| c.1.val.as_deref());
            cookie = match next {
                None => return Ok(found),
                Some(v) => wire::paged_cookie(v).ok_or_else(|| {
                    err(
                        SourceErrorKind::Protocol,
                        format!(
                            "{what}: {} sent a paged-results control it could not read",
                            cfg.server_endpoint
                        ),
                    )
                })?,
            };
            if cookie.is_empty() {
                return Ok(found);
            }
            // A server that pages for ever (empty pages with a cookie, or the same entries
            // again: Samba reuses one cookie for every page, so the cookie itself proves
            // nothing) is stopped.
            empty_pages = if found.entries.len() == before {
                empty_pages + 1
            } else {
                0
            };
            if empty_pages >= 3 {
                return Err(err(
                    SourceErrorKind::Protocol,
                    format!(
                        "{what}: {} sent page after page with nothing on it and more to come: stopped",
                        cfg.server_endpoint
                    ),
                ));
            }
        }
    }

    /// The attributes a user search asks for.
    fn user_attrs(&self) -> Vec<String> {
        let mut a = vec!["*".to_owned(), self.d.id_attr.to_owned()];
        if let Some(d) = &self.cfg.disabled_attribute {
            a.push(d.clone());
        }
        a
    }

    /// The attributes a group search asks for.
    fn group_attrs(&self, members: bool) -> Vec<String> {
        let mut a = vec![
            self.d.id_attr.to_owned(),
            self.cfg.group_name_attribute.clone(),
            "description".to_owned(),
            "objectClass".to_owned(),
        ];
        if members {
            if self.d.flavour == Flavour::ActiveDirectory {
                // The groups holding a group new to the snapshot are found through it.
                a.push("memberOf".to_owned());
                // Asked in ranges from the start, as AD answers a group over MaxValRange (1,500)
                // members anyway; the rest follows in complete_ranges.
                a.push(format!(
                    "{};range=0-{}",
                    self.cfg.member_attribute,
                    RANGE - 1
                ));
            } else {
                a.push(self.cfg.member_attribute.clone());
            }
        }
        a
    }

    /// Searches in pages with owned attribute names.
    async fn paged(
        &mut self,
        base: &str,
        filter: &str,
        attrs: &[String],
    ) -> Result<Found, SourceError> {
        let a: Vec<&str> = attrs.iter().map(String::as_str).collect();
        self.search(base, LdapScope::Subtree, filter, &a, true)
            .await
    }

    /// Active Directory returns at most MaxValRange members at once (`member;range=0-1499`):
    /// the rest, range by range.
    async fn complete_ranges(&mut self, e: &mut Entry) -> Result<(), SourceError> {
        let attr = self.cfg.member_attribute.to_ascii_lowercase();
        let prefix = format!("{attr};range=");
        let (group, endpoint) = (e.dn.clone(), self.cfg.server_endpoint.clone());
        let cut = |m: String| {
            err(
                SourceErrorKind::Protocol,
                format!(
                    "reading the members of {group} in ranges from {endpoint}: {m}; a group read in part would lose members, so nothing is read"
                ),
            )
        };
        let mut last: Option<u64> = None;
        loop {
            let Some(key) = e.attrs.keys().find(|k| k.starts_with(&prefix)).cloned() else {
                return match last {
                    None => Ok(()),
                    Some(n) => Err(cut(format!("the range after {n} did not come"))),
                };
            };
            let vals = e.attrs.remove(&key).unwrap_or_default();
            e.attrs.entry(attr.clone()).or_default().extend(vals);
            let range = key[prefix.len()..].to_owned();
            let Some((_, end)) = range.split_once('-') else {
                return Err(cut(format!("it sent the range {range:?}")));
            };
            if end == "*" {
                return Ok(());
            }
            let end = end
                .parse::<u64>()
                .map_err(|_| cut(format!("it sent the range {range:?}")))?;
            // Each range must end further on, or the reading would go round for ever.
            if last.is_some_and(|l| end <= l) {
                return Err(cut(format!(
                    "it sent the range {range:?} after one ending at {}",
                    last.unwrap_or_default()
                )));
            }
            last = Some(end);
            let want = format!("{};range={}-*", self.cfg.member_attribute, end + 1);
            let dn = e.dn.clone();
            let more = self
                .search_once(&dn, LdapScope::Base, "(objectClass=*)", &[want.as_str()])
                .await?;
            for (k, v) in more
                .entries
                .into_iter()
                .next()
                .map(|m| m.attrs)
                .unwrap_or_default()
            {
                if k.starts_with(&prefix) {
                    e.attrs.insert(k, v);
                }
            }
        }
    }

    /// A content synchronisation search (refreshOnly) from `cookie`.
    async fn sync(
        &mut self,
        base: &str,
        filter: &str,
        attrs: &[String],
        cookie: Option<&[u8]>,
    ) -> Result<Result<Synced, SyncEnd>, SourceError> {
        let what = format!("reading the changes under {base:?}");
        let cfg = self.cfg.clone();
        let mut ldap = self.ldap.clone();
        ldap.with_timeout(cfg.timeout);
        // ldap3 encodes the request (RFC 4533 section 2.2); critical, so a server without
        // content synchronisation refuses the search instead of returning everything.
        let mut request = RawControl::from(SyncRequest {
            mode: RefreshMode::RefreshOnly,
            cookie: cookie.map(<[u8]>::to_vec),
            reload_hint: false,
        });
        request.crit = true;
        ldap.with_controls(vec![request]);
        self.counts.searches.fetch_add(1, Relaxed);
        let mut stream = ldap
            .streaming_search(base, LdapScope::Subtree, filter, attrs.to_vec())
            .await
            .map_err(|e| ldap_error(&cfg, &what, e))?;
        let mut out = Synced::default();
        let bad = |m: &str| {
            err(
                SourceErrorKind::Protocol,
                format!("{what}: {} sent {m}", cfg.server_endpoint),
            )
        };
        loop {
            let item = match stream.next().await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    let _ = stream.finish().await;
                    return Err(ldap_error(&cfg, &what, e));
                }
            };
            if let Some((name, value)) = wire::intermediate(&item.0) {
                if name.as_deref() != Some(wire::SYNC_INFO) {
                    continue;
                }
                let info = value
                    .as_deref()
                    .and_then(wire::sync_info)
                    .ok_or_else(|| bad("a syncInfo message it could not read"))?;
                match info {
                    SyncInfo::NewCookie(c) => out.cookie = Some(c),
                    SyncInfo::Phase {
                        present, cookie, ..
                    } => {
                        if present {
                            out.present_phase = true;
                        }
                        if cookie.is_some() {
                            out.cookie = cookie;
                        }
                    }
                    SyncInfo::IdSet {
                        cookie,
                        refresh_deletes,
                        uuids,
                    } => {
                        if refresh_deletes {
                            out.deleted.extend(uuids);
                        } else {
                            out.present_phase = true;
                            out.present.extend(uuids);
                        }
                        if cookie.is_some() {
                            out.cookie = cookie;
                        }
                    }
                }
                continue;
            }
            if wire::referral(&item.0).is_some() {
                continue;
            }
            let entry = wire::entry(&item.0).ok_or_else(|| bad("an entry it could not read"))?;
            self.counts.entries.fetch_add(1, Relaxed);
            let state = item
                .1
                .iter()
                .find(|c| c.1.ctype == wire::SYNC_STATE)
                .and_then(|c| c.1.val.as_deref())
                .and_then(wire::sync_state)
                .ok_or_else(|| bad("an entry without a readable syncState control"))?;
            let (state, uuid, cookie) = state;
            if cookie.is_some() {
                out.cookie = cookie;
            }
            match state {
                State::Add | State::Modify => out.changed.push((uuid, entry)),
                State::Delete => {
                    out.deleted.insert(uuid);
                }
                State::Present => {
                    out.present_phase = true;
                    out.present.insert(uuid);
                }
            }
        }
        let res = stream.finish().await;
        match res.rc {
            0 => {}
            4096 => return Ok(Err(SyncEnd::RefreshRequired)),
            2 | 12 | 53 => {
                return Ok(Err(SyncEnd::Unsupported(format!(
                    "LDAP result {}{}",
                    res.rc,
                    if res.text.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", res.text)
                    }
                ))));
            }
            rc => return Err(result_error(&cfg, &what, rc, &res.text)),
        }
        if let Some(done) = res
            .ctrls
            .iter()
            .find(|c| c.1.ctype == wire::SYNC_DONE)
            .and_then(|c| c.1.val.as_deref())
        {
            let (cookie, refresh_deletes) =
                wire::sync_done(done).ok_or_else(|| bad("a syncDone control it could not read"))?;
            if cookie.is_some() {
                out.cookie = cookie;
            }
            // refreshDeletes FALSE after a present phase: what was not listed is gone.
            if !refresh_deletes && !out.present.is_empty() {
                out.present_phase = true;
            }
        }
        Ok(Ok(out))
    }

    /// The domain controller's invocationId and highestCommittedUSN, and the default naming
    /// context, from the root DSE and the controller's NTDS Settings object.
    async fn ad_position(&mut self) -> Result<AdPosition, SourceError> {
        let endpoint = self.cfg.server_endpoint.clone();
        let bad = |m: &str| {
            err(
                SourceErrorKind::Protocol,
                format!("{endpoint}: {m}: it does not look like Active Directory"),
            )
        };
        let dse = self
            .search_once(
                "",
                LdapScope::Base,
                "(objectClass=*)",
                &[
                    "highestCommittedUSN",
                    "dsServiceName",
                    "namingContexts",
                    "configurationNamingContext",
                ],
            )
            .await?;
        let root = dse.entries.into_iter().next().unwrap_or_default();
        let usn = root
            .text("highestCommittedUSN")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| bad("the root DSE has no highestCommittedUSN"))?;
        let service = root
            .text("dsServiceName")
            .ok_or_else(|| bad("the root DSE has no dsServiceName"))?;
        let (ubase, gbase) = (&self.cfg.user_base_dn, &self.cfg.group_base_dn);
        let naming_context = root
            .texts("namingContexts")
            .into_iter()
            .filter(|nc| !nc.is_empty() && under(ubase, nc) && under(gbase, nc))
            .max_by_key(String::len);
        let tombstone_days = match root.text("configurationNamingContext") {
            Some(config) => self
                .search_once(
                    &format!("CN=Directory Service,CN=Windows NT,CN=Services,{config}"),
                    LdapScope::Base,
                    "(objectClass=*)",
                    &["tombstoneLifetime"],
                )
                .await
                .ok()
                .and_then(|f| f.entries.into_iter().next())
                .and_then(|e| e.text("tombstoneLifetime"))
                .and_then(|v| v.trim().parse::<u64>().ok()),
            None => None,
        };
        let ntds = self
            .search_once(
                &service,
                LdapScope::Base,
                "(objectClass=*)",
                &["invocationId"],
            )
            .await?;
        let invocation = ntds
            .entries
            .first()
            .and_then(|e| e.values("invocationId").first().cloned())
            .and_then(|b| wire::guid_text(&b))
            .ok_or_else(|| bad("the domain controller's NTDS Settings have no invocationId"))?;
        Ok(AdPosition {
            invocation,
            usn,
            naming_context,
            // [MS-ADTS] "Tombstone Lifetime and Deleted-Object Lifetime": 60 days when unset;
            // below 2 days, 2 (Windows Server 2008 R2 on; the shorter is the safe reading).
            tombstone_lifetime: match tombstone_days {
                Some(d) if d >= 2 => d,
                Some(_) => 2,
                None => 60,
            } * 86_400,
            at: unix_now(),
        })
    }

    /// Whether the bind account sees a tombstone in the Deleted Objects container (asked for
    /// one: a live domain nearly always holds some). By default Active Directory lets only
    /// administrators list the container; Samba shows it but not what is in it.
    async fn sees_tombstones(&mut self, naming_context: &str) -> bool {
        let base = format!("<WKGUID={DELETED_OBJECTS_WKGUID},{naming_context}>");
        let mut ldap = self.ldap.clone();
        ldap.with_timeout(self.cfg.timeout)
            .with_controls(vec![show_deleted()])
            .with_search_options(ldap3::SearchOptions::new().sizelimit(1));
        self.counts.searches.fetch_add(1, Relaxed);
        let Ok(mut stream) = ldap
            .streaming_search(
                &base,
                LdapScope::OneLevel,
                "(isDeleted=TRUE)",
                vec!["objectGUID"],
            )
            .await
        else {
            return false;
        };
        let mut seen = false;
        while let Ok(Some(item)) = stream.next().await {
            if wire::entry(&item.0).is_some() {
                self.counts.entries.fetch_add(1, Relaxed);
                seen = true;
            }
        }
        let _ = stream.finish().await;
        seen
    }

    /// Active Directory's changes since `usn` (exclusive), by uSNChanged (MS-ADTS 3.1.1.1.9;
    /// Microsoft's "Polling for Changes Using uSNChanged"), or why this read cannot be trusted:
    ///
    /// 1. the ids of user and group objects changed anywhere in the naming context, and of
    ///    tombstones (the show-deleted control keeps their objectGUID);
    /// 2. then the users and groups changed under the bases, with their attributes. uSNChanged
    ///    only grows, so whatever step 1 saw that is still under a base and in its filter is
    ///    seen again here; the snapshot's users and groups that step 1 saw and step 2 did not
    ///    were deleted, moved out of a base, or no longer match a filter;
    /// 3. the groups under the base that hold an entry new to the snapshot (moved in, matching
    ///    the filter again): their uSNChanged did not move, so they are read through the entry's
    ///    memberOf.
    async fn ad_delta(
        &mut self,
        usn: u64,
        naming_context: &str,
        base: &Snapshot,
    ) -> Result<Result<Delta, String>, SourceError> {
        let since = format!("(uSNChanged>={})", usn + 1);
        let (ubase, gbase) = (
            self.cfg.user_base_dn.clone(),
            self.cfg.group_base_dn.clone(),
        );
        // Referrals from the naming context's root (to the configuration partition, say) are
        // expected: only the objects found here matter.
        let wide_filter = format!("(&(|(objectClass=user)(objectClass=group)){since})");
        let mut touched = BTreeSet::new();
        for e in self
            .paged(naming_context, &wide_filter, &["objectGUID".to_owned()])
            .await?
            .entries
        {
            touched.extend(self.id_of(&e));
        }
        let dead = self
            .search_with(
                naming_context,
                LdapScope::Subtree,
                &format!("(&(isDeleted=TRUE){since})"),
                &["objectGUID"],
                true,
                vec![show_deleted()],
            )
            .await?;
        touched.extend(dead.entries.iter().filter_map(|e| self.id_of(e)));

        let uf = format!("(&{}{since})", self.d.user_filter);
        let gf = format!("(&{}{since})", self.d.group_filter);
        let users = self.paged(&ubase, &uf, &self.user_attrs()).await?;
        let mut groups = self.paged(&gbase, &gf, &self.group_attrs(true)).await?;
        if let Some(r) = users.referrals.iter().chain(&groups.referrals).next() {
            // Part of a base is elsewhere: what was not seen cannot be taken for gone.
            return Ok(Err(format!(
                "the server referred the change read to {r}, which idsync does not follow"
            )));
        }
        let (users, mut group_entries) = (users.entries, std::mem::take(&mut groups.entries));

        let known = |id: &String| base.users.contains_key(id) || base.groups.contains_key(id);
        let mut seen = BTreeSet::new();
        let mut holders = BTreeSet::new();
        for e in users.iter().chain(&group_entries) {
            let Some(id) = self.id_of(e) else { continue };
            if !known(&id) {
                holders.extend(
                    e.texts("memberOf")
                        .iter()
                        .filter(|g| under(g, &gbase))
                        .map(|g| dn_key(g)),
                );
            }
            seen.insert(id);
        }
        for e in &group_entries {
            holders.remove(&dn_key(&e.dn));
        }
        if !holders.is_empty() {
            let dns: Vec<String> = holders.into_iter().collect();
            let (class, attrs) = (self.d.group_filter.clone(), self.group_attrs(true));
            let key = |c: &Conn, values: &[String]| any_of(c.d.dn_attr, values);
            group_entries.extend(self.batched(&gbase, &class, &dns, key, &attrs).await?);
        }
        let gone = |held: &dyn Fn(&String) -> bool| -> BTreeSet<String> {
            touched
                .iter()
                .filter(|id| held(id) && !seen.contains(*id))
                .cloned()
                .collect()
        };
        let users_gone = gone(&|id| base.users.contains_key(id));
        let groups_gone = gone(&|id| base.groups.contains_key(id));
        Ok(Ok(Delta {
            users,
            users_gone,
            groups: group_entries,
            groups_gone,
        }))
    }

    /// The entry's stable id.
    fn id_of(&self, e: &Entry) -> Option<String> {
        if self.d.flavour == Flavour::ActiveDirectory {
            e.values("objectGUID")
                .first()
                .and_then(|b| wire::guid_text(b))
        } else {
            e.text("entryUUID").map(|s| s.to_ascii_lowercase())
        }
    }

    /// A filter value for an id (AD: the GUID's bytes, escaped).
    fn id_filter(&self, ids: &[String]) -> String {
        if self.d.flavour == Flavour::ActiveDirectory {
            let parts: String = ids
                .iter()
                .filter_map(|id| guid_bytes(id))
                .map(|b| {
                    let v: String = b.iter().map(|x| format!("\\{x:02x}")).collect();
                    format!("(objectGUID={v})")
                })
                .collect();
            format!("(|{parts})")
        } else {
            any_of("entryUUID", ids)
        }
    }

    /// A user entry as a user, or why it is left out.
    fn user(&self, e: &Entry) -> Result<User, String> {
        let id = self
            .id_of(e)
            .ok_or_else(|| format!("{} has no {}: left out", e.dn, self.d.id_attr))?;
        let user_name = e
            .text(&self.d.username)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| format!("{} has no {}: left out", e.dn, self.d.username))?;
        let display_name = self
            .cfg
            .display_name_attribute
            .as_deref()
            .and_then(|a| e.text(a))
            .or_else(|| e.text("displayName"))
            .or_else(|| e.text("cn"))
            .unwrap_or_else(|| user_name.clone());
        let active = if self.d.flavour == Flavour::ActiveDirectory {
            e.text("userAccountControl")
                .and_then(|v| v.trim().parse::<i64>().ok())
                .is_none_or(|uac| uac & 2 == 0)
        } else {
            match &self.cfg.disabled_attribute {
                Some(a) => {
                    let vals = e.texts(a);
                    match &self.cfg.disabled_value {
                        Some(want) => !vals.iter().any(|v| v.eq_ignore_ascii_case(want)),
                        None => vals.is_empty(),
                    }
                }
                None => true,
            }
        };
        let mut attributes = BTreeMap::new();
        for (lower, vals) in &e.attrs {
            if hidden(lower) || lower.contains(';') {
                continue;
            }
            if let Some(v) = vals.first().and_then(|v| String::from_utf8(v.clone()).ok()) {
                let name = e.names.get(lower).cloned().unwrap_or_else(|| lower.clone());
                attributes.insert(name, v);
            }
        }
        attributes.insert("dn".into(), e.dn.clone());
        Ok(User {
            id,
            user_name,
            display_name,
            emails: e.texts(&self.cfg.mail_attribute),
            active,
            user_type: Default::default(),
            external_id: None,
            attributes,
        })
    }

    /// A group entry as a group without members.
    fn group_head(&self, e: &Entry) -> Result<Group, String> {
        let id = self
            .id_of(e)
            .ok_or_else(|| format!("{} has no {}: left out", e.dn, self.d.id_attr))?;
        let name = e
            .text(&self.cfg.group_name_attribute)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "{} has no {}: left out",
                    e.dn, self.cfg.group_name_attribute
                )
            })?;
        Ok(Group {
            id,
            display_name: name,
            description: e.text("description"),
            security_enabled: true,
            mail_enabled: false,
            members: Default::default(),
        })
    }

    /// The member references of a group entry: DNs (normalised), or login names for memberUid.
    fn member_refs(&self, e: &Entry) -> Vec<String> {
        let uid = self.cfg.member_attribute.eq_ignore_ascii_case("memberUid");
        e.texts(&self.cfg.member_attribute)
            .into_iter()
            .map(|v| {
                if uid {
                    v.trim().to_lowercase()
                } else {
                    dn_key(strip_unique_id(&v))
                }
            })
            .collect()
    }

    /// Entries under `base` that match `class` and whose `key` filter (built for up to BATCH
    /// values at a time) matches one of `values`.
    async fn batched(
        &mut self,
        base: &str,
        class: &str,
        values: &[String],
        key: impl Fn(&Conn, &[String]) -> String,
        attrs: &[String],
    ) -> Result<Vec<Entry>, SourceError> {
        let mut out = Vec::new();
        for chunk in values.chunks(BATCH) {
            let f = format!("(&{class}{})", key(self, chunk));
            out.extend(self.paged(base, &f, attrs).await?.entries);
        }
        Ok(out)
    }

    /// These users, read by id.
    async fn users_by_id(&mut self, ids: &[String]) -> Result<Vec<User>, SourceError> {
        let (base, class, attrs) = (
            self.cfg.user_base_dn.clone(),
            self.d.user_filter.clone(),
            self.user_attrs(),
        );
        let found = self
            .batched(&base, &class, ids, |c, ids| c.id_filter(ids), &attrs)
            .await?;
        Ok(found.iter().filter_map(|e| self.user(e).ok()).collect())
    }

    /// These groups' entries, read by id (with their members when `members`).
    async fn group_entries_by_id(
        &mut self,
        ids: &[String],
        members: bool,
    ) -> Result<Vec<Entry>, SourceError> {
        let (base, class, attrs) = (
            self.cfg.group_base_dn.clone(),
            self.d.group_filter.clone(),
            self.group_attrs(members),
        );
        self.batched(&base, &class, ids, |c, ids| c.id_filter(ids), &attrs)
            .await
    }

    /// Group entries as groups with their members: member values resolved through `index`, and,
    /// with `look_up`, those it does not know searched for under the users' and the groups'
    /// bases (users found go to `found`). Returns the groups, the entries left out (with why) and
    /// how many member values named nothing.
    async fn groups_of(
        &mut self,
        entries: Vec<Entry>,
        index: &mut Index,
        found: &mut BTreeMap<String, User>,
        look_up: bool,
    ) -> Result<(Vec<Group>, Vec<String>, usize), SourceError> {
        let mut heads = Vec::new();
        let mut left_out = Vec::new();
        for mut e in entries {
            if self.d.flavour == Flavour::ActiveDirectory {
                self.complete_ranges(&mut e).await?;
            }
            match self.group_head(&e) {
                Ok(g) => {
                    index
                        .refs
                        .insert(dn_key(&e.dn), Member::group(g.id.clone()));
                    heads.push((g, self.member_refs(&e)));
                }
                Err(n) => left_out.push(n),
            }
        }
        if look_up {
            let unknown: Vec<String> = heads
                .iter()
                .flat_map(|(_, r)| r)
                .filter(|r| !index.refs.contains_key(*r))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            self.resolve(&unknown, index, found).await?;
        }
        let mut outside = 0;
        let groups = heads
            .into_iter()
            .map(|(mut g, refs)| {
                for r in refs {
                    match index.refs.get(&r) {
                        Some(m) => {
                            g.members.insert(m.clone());
                        }
                        None => outside += 1,
                    }
                }
                g
            })
            .collect();
        Ok((groups, left_out, outside))
    }

    /// Searches the users' and the groups' bases for member values (DNs, or login names for
    /// memberUid) and adds what it finds to `index` (users also to `found`).
    async fn resolve(
        &mut self,
        unknown: &[String],
        index: &mut Index,
        found: &mut BTreeMap<String, User>,
    ) -> Result<(), SourceError> {
        if unknown.is_empty() {
            return Ok(());
        }
        let uid = self.cfg.member_attribute.eq_ignore_ascii_case("memberUid");
        let key_attr = if uid {
            self.d.username.clone()
        } else {
            self.d.dn_attr.to_owned()
        };
        let (ubase, uclass, uattrs) = (
            self.cfg.user_base_dn.clone(),
            self.d.user_filter.clone(),
            self.user_attrs(),
        );
        let key = |_: &Conn, values: &[String]| any_of(&key_attr, values);
        for e in self.batched(&ubase, &uclass, unknown, key, &uattrs).await? {
            if let Ok(u) = self.user(&e) {
                index.add_user(&u);
                found.insert(u.id.clone(), u);
            }
        }
        if uid {
            return Ok(());
        }
        let (gbase, gclass, gattrs) = (
            self.cfg.group_base_dn.clone(),
            self.d.group_filter.clone(),
            self.group_attrs(false),
        );
        for e in self.batched(&gbase, &gclass, unknown, key, &gattrs).await? {
            if let Ok(g) = self.group_head(&e) {
                index.refs.insert(dn_key(&e.dn), Member::group(g.id));
            }
        }
        Ok(())
    }
}

/// `uniqueMember` values may end with `#'0101'B` (an optional unique identifier): the DN is
/// before it.
fn strip_unique_id(v: &str) -> &str {
    match v.rfind('#') {
        Some(i) if v[i + 1..].starts_with('\'') && v.ends_with("'B") => &v[..i],
        _ => v,
    }
}

/// The show-deleted request control (it has no value).
fn show_deleted() -> RawControl {
    RawControl {
        ctype: SHOW_DELETED.to_owned(),
        crit: true,
        val: None,
    }
}

/// A GUID string as the 16 bytes AD stores.
fn guid_bytes(id: &str) -> Option<[u8; 16]> {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// Member references (normalised DNs, or lower-cased login names) to members.
#[derive(Default)]
struct Index {
    refs: BTreeMap<String, Member>,
}

impl Index {
    /// A user's DN and login name.
    fn add_user(&mut self, u: &User) {
        if let Some(dn) = u.attributes.get("dn") {
            self.refs.insert(dn_key(dn), Member::user(u.id.clone()));
        }
        self.refs
            .insert(u.user_name.to_lowercase(), Member::user(u.id.clone()));
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// The filter that matches nothing: a sync search with it returns only a cookie.
const NOTHING: &str = "(!(objectClass=*))";

impl LdapSource {
    /// A source for `cfg` (it connects on each read).
    pub fn new(cfg: LdapSourceConfig) -> Self {
        LdapSource {
            cfg,
            counts: Arc::default(),
        }
    }

    /// What this source has asked the directory for so far.
    pub fn counts(&self) -> CountsNow {
        CountsNow {
            connections: self.counts.connections.load(Relaxed),
            searches: self.counts.searches.load(Relaxed),
            entries: self.counts.entries.load(Relaxed),
        }
    }

    /// The whole directory under the bases, as a snapshot, with notes.
    async fn directory(
        &self,
        c: &mut Conn,
        notes: &mut Vec<String>,
    ) -> Result<Snapshot, SourceError> {
        let cfg = self.cfg.clone();
        let users = c
            .paged(&cfg.user_base_dn, &c.d.user_filter.clone(), &c.user_attrs())
            .await?;
        let groups = c
            .paged(
                &cfg.group_base_dn,
                &c.d.group_filter.clone(),
                &c.group_attrs(true),
            )
            .await?;
        for r in users.referrals.iter().chain(&groups.referrals) {
            notes.push(format!("the server referred to {r}: not followed"));
        }
        let mut snap = Snapshot::default();
        let mut index = Index::default();
        for e in &users.entries {
            match c.user(e) {
                Ok(u) => {
                    index.add_user(&u);
                    if let Some(old) = snap.users.insert(u.id.clone(), std::sync::Arc::new(u)) {
                        return Err(err(
                            SourceErrorKind::Protocol,
                            format!("two user entries share the id {}", old.id),
                        ));
                    }
                }
                Err(n) => notes.push(n),
            }
        }
        let (groups, left_out, outside) = c
            .groups_of(groups.entries, &mut index, &mut BTreeMap::new(), false)
            .await?;
        notes.extend(left_out);
        for g in groups {
            if snap.groups.insert(g.id.clone(), g).is_some() {
                return Err(err(
                    SourceErrorKind::Protocol,
                    "two group entries share an id",
                ));
            }
        }
        if outside > 0 {
            notes.push(format!(
                "{outside} member value(s) name no user or group under the base DNs (or outside the filters): left out"
            ));
        }
        Ok(snap)
    }

    /// The cursors to store after a full read, taken before it (so nothing between is missed),
    /// or a note saying why there are none.
    async fn cookies(
        &self,
        c: &mut Conn,
        notes: &mut Vec<String>,
    ) -> Result<Result<BTreeMap<String, String>, String>, SourceError> {
        if c.d.flavour == Flavour::ActiveDirectory {
            if let Some(why) = self.no_change_feed(c) {
                return Ok(Err(why));
            }
            let pos = match c.ad_position().await {
                Ok(p) => p,
                Err(e) => {
                    return Ok(Err(format!(
                        "the domain controller's position (highestCommittedUSN, invocationId) could not be read, so every run reads in full: {}",
                        e.message
                    )));
                }
            };
            let Some(nc) = pos.naming_context.clone() else {
                return Ok(Err(format!(
                    "{} holds no naming context with both user_base_dn and group_base_dn in it (a Global Catalog, or bases in two domains?): every run reads in full",
                    self.cfg.server_endpoint
                )));
            };
            if !c.sees_tombstones(&nc).await {
                notes.push(format!(
                    "{} shows {} no deleted object (a tombstone) in the Deleted Objects container: either nothing was ever deleted, or the account may not read them. Then incremental runs do not see deleted users and groups, and the next full read (idsync sync --full-sync) removes them. To let them, grant the account List Contents and Read Property on the container (dsacls \"CN=Deleted Objects,{nc}\" /takeownership, then /G ACCOUNT:LCRP)",
                    self.cfg.server_endpoint,
                    self.cfg.bind_dn.as_deref().unwrap_or("the anonymous bind"),
                ));
            }
            return Ok(Ok(BTreeMap::from([(AD_CURSOR.to_owned(), pos.cursor())])));
        }
        if !c.d.sync {
            return Ok(Err(format!(
                "{} does not offer content synchronisation (RFC 4533): every run reads the directory in full. To read only changes, enable OpenLDAP's syncprov overlay on the database (`overlay syncprov`, with `syncprov-sessionlog` so deletions are sent as such)",
                self.cfg.server_endpoint
            )));
        }
        let mut out = BTreeMap::new();
        for (key, base) in [
            (USERS_CURSOR, self.cfg.user_base_dn.clone()),
            (GROUPS_CURSOR, self.cfg.group_base_dn.clone()),
        ] {
            match c.sync(&base, NOTHING, &[], None).await? {
                Ok(s) => match s.cookie {
                    Some(k) => {
                        out.insert(key.to_owned(), b64(&k));
                    }
                    None => {
                        return Ok(Err(format!(
                            "{} sent no sync cookie: every run reads the directory in full",
                            self.cfg.server_endpoint
                        )));
                    }
                },
                Err(SyncEnd::Unsupported(why)) => {
                    return Ok(Err(format!(
                        "content synchronisation was refused under {base:?} ({why}): every run reads the directory in full. Enable OpenLDAP's syncprov overlay on the database that holds it"
                    )));
                }
                Err(SyncEnd::RefreshRequired) => {
                    return Ok(Err(
                        "the server asked for a full refresh before any cookie: every run reads in full".into(),
                    ));
                }
            }
        }
        Ok(Ok(out))
    }
}

#[async_trait]
impl Source for LdapSource {
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError> {
        let mut c = Conn::open(&self.cfg, self.counts.clone()).await?;
        let mut notes = Vec::new();
        let cursors = match self.cookies(&mut c, &mut notes).await? {
            Ok(c) => c,
            Err(note) => {
                notes.push(note);
                BTreeMap::new()
            }
        };
        let dir = self.directory(&mut c, &mut notes).await?;
        let sel = scope::select(&dir, scope);
        notes.extend(sel.notes);
        Ok(Read {
            snapshot: sel.snapshot.into(),
            cursors,
            mode: ReadMode::Full,
            depth: sel.depth,
            notes,
            unchanged: false,
        })
    }

    async fn read_changes(
        &self,
        scope: &Scope,
        base: &std::sync::Arc<Snapshot>,
        cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        if let Some(since) = cursors.get(AD_CURSOR) {
            return self.read_ad_changes(scope, base, cursors, since).await;
        }
        let (Some(uc), Some(gc)) = (
            cursors.get(USERS_CURSOR).and_then(|s| unb64(s)),
            cursors.get(GROUPS_CURSOR).and_then(|s| unb64(s)),
        ) else {
            return Ok(Changes::Unsupported);
        };
        let mut c = Conn::open(&self.cfg, self.counts.clone()).await?;
        if c.d.flavour == Flavour::ActiveDirectory || !c.d.sync {
            return Ok(Changes::Expired(format!(
                "{} no longer offers content synchronisation (the syncprov overlay)",
                self.cfg.server_endpoint
            )));
        }
        let user_attrs = c.user_attrs();
        let group_attrs = c.group_attrs(true);
        let ubase = self.cfg.user_base_dn.clone();
        let gbase = self.cfg.group_base_dn.clone();
        let uf = c.d.user_filter.clone();
        let gf = c.d.group_filter.clone();
        let users = match c.sync(&ubase, &uf, &user_attrs, Some(&uc)).await? {
            Ok(s) => s,
            Err(end) => return Ok(end.expired()),
        };
        let groups = match c.sync(&gbase, &gf, &group_attrs, Some(&gc)).await? {
            Ok(s) => s,
            Err(end) => return Ok(end.expired()),
        };
        let changed: BTreeSet<&String> = users.changed.iter().map(|(u, _)| u).collect();
        let delta = Delta {
            users_gone: users
                .gone(base.users.keys())
                .into_iter()
                .filter(|id| base.users.contains_key(id) || changed.contains(id))
                .collect(),
            users: users.changed.iter().map(|(_, e)| e.clone()).collect(),
            groups_gone: groups
                .gone(base.groups.keys())
                .into_iter()
                .filter(|id| base.groups.contains_key(id))
                .collect(),
            groups: groups.changed.into_iter().map(|(_, e)| e).collect(),
        };
        let mut next = cursors.clone();
        if let Some(k) = &users.cookie {
            next.insert(USERS_CURSOR.into(), b64(k));
        }
        if let Some(k) = &groups.cookie {
            next.insert(GROUPS_CURSOR.into(), b64(k));
        }
        self.fold_delta(c, scope, base, delta, next).await
    }
}

impl LdapSource {
    /// Active Directory's change read: from the USN in the cursor, on the same domain controller.
    async fn read_ad_changes(
        &self,
        scope: &Scope,
        base: &std::sync::Arc<Snapshot>,
        cursors: &BTreeMap<String, String>,
        since: &str,
    ) -> Result<Changes, SourceError> {
        let Some((invocation, usn, at)) = parse_ad_cursor(since) else {
            return Ok(Changes::Expired(
                "the stored Active Directory cursor is not <invocationId>/<USN>/<time>".into(),
            ));
        };
        let mut c = Conn::open(&self.cfg, self.counts.clone()).await?;
        if c.d.flavour != Flavour::ActiveDirectory {
            return Ok(Changes::Expired(format!(
                "{} is no longer read as Active Directory",
                self.cfg.server_endpoint
            )));
        }
        if let Some(why) = self.no_change_feed(&c) {
            return Ok(Changes::Expired(why));
        }
        let now = c.ad_position().await?;
        let endpoint = &self.cfg.server_endpoint;
        if now.invocation != invocation {
            return Ok(Changes::Expired(format!(
                "the domain controller behind {endpoint} is not the one of the last read (its invocationId changed: another controller, or one restored from a backup), and USNs count one controller's changes"
            )));
        }
        if now.usn < usn {
            return Ok(Changes::Expired(format!(
                "the highestCommittedUSN of {endpoint} went back from {usn} to {}",
                now.usn
            )));
        }
        if now.at.saturating_sub(at) >= now.tombstone_lifetime {
            return Ok(Changes::Expired(format!(
                "the last read of {endpoint} is older than its tombstone lifetime ({} days): deletions since may be gone from the directory",
                now.tombstone_lifetime / 86_400
            )));
        }
        let Some(nc) = now.naming_context.clone() else {
            return Ok(Changes::Expired(format!(
                "{endpoint} holds no naming context with both user_base_dn and group_base_dn in it (a Global Catalog, or bases in two domains?): point server_endpoint at a domain controller of the bases' domain to read changes"
            )));
        };
        let mut next = cursors.clone();
        next.insert(AD_CURSOR.into(), now.cursor());
        let delta = if now.usn == usn {
            // Nothing was written on this controller since.
            Delta::default()
        } else {
            match c.ad_delta(usn, &nc, base).await? {
                Ok(d) => d,
                Err(why) => return Ok(Changes::Expired(why)),
            }
        };
        self.fold_delta(c, scope, base, delta, next).await
    }

    /// Why this configuration cannot be read by changes on Active Directory, if it cannot.
    fn no_change_feed(&self, c: &Conn) -> Option<String> {
        for (key, f) in [
            ("user_filter", &c.d.user_filter),
            ("group_filter", &c.d.group_filter),
        ] {
            if names_back_link(f) {
                return Some(format!(
                    "{key} names memberOf (a back link): joining or leaving a group does not change the entry's uSNChanged, so only a full read sees who matches; every run reads in full (filter on the group's member side, e.g. with [scope], to read changes)"
                ));
            }
        }
        None
    }

    /// Folds what a change read found into `base`: changed users first (so groups resolve
    /// renamed and new members), then groups with their members resolved to ids.
    async fn fold_delta(
        &self,
        mut c: Conn,
        scope: &Scope,
        base: &std::sync::Arc<Snapshot>,
        delta: Delta,
        next: BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        let mut notes = Vec::new();
        let mut changes: Vec<Change> = Vec::new();
        // What the snapshot knows: user DNs and login names.
        let mut index = Index::default();
        for u in base.users.values() {
            index.add_user(u);
        }
        let mut found: BTreeMap<String, User> = BTreeMap::new();
        for e in &delta.users {
            match c.user(e) {
                Ok(u) => {
                    index.add_user(&u);
                    found.insert(u.id.clone(), u.clone());
                    changes.push(Change::UpsertUser(u));
                }
                Err(n) => notes.push(n),
            }
        }
        for id in delta.users_gone {
            changes.push(Change::Remove(Member::user(id)));
        }
        let (changed, left_out, _) = c
            .groups_of(delta.groups, &mut index, &mut found, true)
            .await?;
        notes.extend(left_out);
        for g in changed {
            changes.push(Change::UpsertGroup {
                id: g.id.clone(),
                display_name: g.display_name,
                description: g.description,
            });
            changes.push(Change::ReplaceMembers {
                group: g.id,
                members: g.members.into_iter().collect(),
            });
        }
        for id in delta.groups_gone {
            changes.push(Change::Remove(Member::group(id)));
        }
        let lookup = LdapLookup {
            conn: tokio::sync::Mutex::new(c),
            found,
        };
        let sel = idsync_engine::fold(base, &changes, scope, &lookup).await?;
        notes.extend(sel.notes);
        Ok(Changes::Read(Read {
            snapshot: sel.snapshot,
            cursors: next,
            mode: ReadMode::Incremental,
            depth: sel.depth,
            notes,
            unchanged: sel.unchanged,
        }))
    }
}

/// What the fold asks for, read from the directory by id.
struct LdapLookup {
    conn: tokio::sync::Mutex<Conn>,
    /// Users read during this change read (they need no second search).
    found: BTreeMap<String, User>,
}

#[async_trait]
impl Lookup for LdapLookup {
    async fn users(&self, ids: &[String]) -> Result<Vec<User>, SourceError> {
        let (mut out, missing): (Vec<User>, Vec<String>) = (
            ids.iter()
                .filter_map(|id| self.found.get(id).cloned())
                .collect(),
            ids.iter()
                .filter(|id| !self.found.contains_key(*id))
                .cloned()
                .collect(),
        );
        out.extend(self.conn.lock().await.users_by_id(&missing).await?);
        Ok(out)
    }

    async fn service_principals(
        &self,
        _ids: &[String],
    ) -> Result<Vec<ServicePrincipal>, SourceError> {
        Ok(Vec::new())
    }

    async fn groups(&self, ids: &[String], _scope: &Scope) -> Result<Vec<Group>, SourceError> {
        let mut c = self.conn.lock().await;
        let entries = c.group_entries_by_id(ids, false).await?;
        Ok(entries
            .iter()
            .filter_map(|e| c.group_head(e).ok())
            .collect())
    }

    /// Reads the groups reachable from `groups` within the search depth (and their members the
    /// snapshot lacks) into a directory of their own, level by level, then lets the engine's
    /// [`DirectoryLookup`] expand from it: the scope rules stay the engine's.
    async fn expand(
        &self,
        groups: Vec<Group>,
        level: u32,
        scope: &Scope,
        snap: &mut Snapshot,
        depth: &mut BTreeMap<String, u32>,
    ) -> Result<(), SourceError> {
        let mut c = self.conn.lock().await;
        let mut index = Index::default();
        let mut found = self.found.clone();
        for u in snap.users.values().map(|u| &**u).chain(found.values()) {
            index.add_user(u);
        }
        let mut pool = Snapshot::default();
        let mut frontier: Vec<String> = groups.iter().map(|g| g.id.clone()).collect();
        let mut at = level;
        while !frontier.is_empty() {
            let entries = c.group_entries_by_id(&frontier, true).await?;
            let (read, _, _) = c.groups_of(entries, &mut index, &mut found, true).await?;
            let mut next = Vec::new();
            for g in read {
                for m in g.members.groups() {
                    if at < scope.search_depth
                        && !snap.groups.contains_key(&*m.id)
                        && !pool.groups.contains_key(&*m.id)
                        && !frontier.iter().any(|f| *f == m.id)
                    {
                        next.push(m.id.to_string());
                    }
                }
                pool.groups.insert(g.id.clone(), g);
            }
            next.sort();
            next.dedup();
            frontier = next;
            at += 1;
        }
        // The users the pool's groups name: read in this run, or by id.
        let named: BTreeSet<String> = pool
            .groups
            .values()
            .flat_map(|g| &g.members)
            .filter(|m| m.kind == Kind::User && !snap.users.contains_key(&*m.id))
            .map(|m| m.id.to_string())
            .collect();
        let missing: Vec<String> = named
            .iter()
            .filter(|id| !found.contains_key(*id))
            .cloned()
            .collect();
        for u in c.users_by_id(&missing).await? {
            found.insert(u.id.clone(), u);
        }
        for id in named {
            if let Some(u) = found.remove(&id) {
                pool.users.insert(id, std::sync::Arc::new(u));
            }
        }
        DirectoryLookup(&pool)
            .expand(groups, level, scope, snap, depth)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_member_ids_are_stripped() {
        assert_eq!(strip_unique_id("cn=a,dc=x#'0101'B"), "cn=a,dc=x");
        assert_eq!(strip_unique_id("cn=a\\#1,dc=x"), "cn=a\\#1,dc=x");
    }

    #[test]
    fn guid_strings_and_bytes_round_trip() {
        let s = "01234567-89ab-cdef-0123-456789abcdef";
        assert_eq!(wire::guid_text(&guid_bytes(s).unwrap()).unwrap(), s);
        assert_eq!(guid_bytes("nope"), None);
    }

    #[test]
    fn secrets_and_blobs_are_never_template_attributes() {
        for a in ["userPassword", "unicodePwd", "objectGUID", "jpegPhoto"] {
            assert!(hidden(a), "{a}");
        }
        assert!(!hidden("employeeNumber"));
    }
}
