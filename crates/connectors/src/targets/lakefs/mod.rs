//! The lakeFS auth API (`/api/v1/auth`) as a target: users, groups, memberships and group policies,
//! as lakeFS Cloud and Enterprise serve them. lakeFS groups hold only users (nested groups are
//! flattened by the engine); users and groups cannot be renamed; users have no attributes idsync can
//! set through the API, so only their existence and memberships are managed. Default policies are
//! attached to the groups idsync creates (`LAKEFS_DEFAULT_POLICIES`).

pub mod config;

use crate::http::{Auth, Http, HttpConfig, HttpError, percent_encode};

use async_trait::async_trait;
use futures::StreamExt;
use idsync_engine::observe::{Interest, Partial};
use idsync_engine::{Outcome, Target, TargetError, TargetErrorKind};
use idsync_model::{
    Capabilities, Kind, MemberIds, Observed, ObservedPrincipal, Op, PRef, Principal, Secret,
};
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeSet;

/// Percent-encodes one path segment (user ids like `waad|...` or LDAP DNs).
fn seg(s: &str) -> String {
    percent_encode(s, b"")
}

/// Where and how to reach lakeFS.
#[derive(Clone, Debug)]
pub struct LakefsConfig {
    /// The lakeFS URL (`https://org.region.lakefscloud.io`); `/api/v1` is added when missing.
    pub endpoint: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// HTTP settings.
    pub http: HttpConfig,
    /// The group every user idsync creates is added to, as lakeFS adds a user it creates at an
    /// LDAP login (its `auth.ldap.default_user_group`).
    pub default_user_group: Option<String>,
}

/// The lakeFS target.
#[derive(Debug)]
pub struct LakefsTarget {
    http: Http,
    base: String,
    auth: Auth,
    workers: usize,
    default_user_group: Option<String>,
    /// The default user group's lakeFS id (or why there is none), found once per run.
    default_group_id: tokio::sync::OnceCell<Result<String, TargetError>>,
}

#[derive(Deserialize)]
struct Pagination {
    has_more: bool,
    next_offset: String,
}

#[derive(Deserialize)]
struct Page<T> {
    pagination: Pagination,
    results: Vec<T>,
}

#[derive(Deserialize)]
struct LUser {
    id: String,
}

#[derive(Deserialize)]
struct LGroup {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
struct LPolicy {
    id: String,
}

fn target_error(e: HttpError) -> TargetError {
    crate::targets::target_error(
        e,
        &crate::targets::Hints {
            unauthorized: " lakeFS rejected the access key pair: check LAKEFS_ACCESS_KEY_ID and LAKEFS_SECRET_ACCESS_KEY, and that this user may manage auth (AuthFullAccess or the auth:* actions).",
            forbidden: "",
            not_implemented: " This lakeFS has no RBAC: open-source lakeFS answers 501 for groups and policies. Groups need lakeFS Cloud or Enterprise.",
        },
    )
}

/// A group as a principal: keyed by its name (its id when it has none), with its policies.
fn group_principal(g: LGroup, policies: Vec<LPolicy>) -> ObservedPrincipal {
    let mut p = Principal::new(Kind::Group, g.name.unwrap_or_else(|| g.id.clone()));
    p.description = g.description;
    ObservedPrincipal {
        id: g.id,
        principal: p,
        policies: policies.into_iter().map(|p| p.id).collect(),
    }
}

fn id_of(r: &PRef) -> Result<&str, TargetError> {
    r.id.as_deref()
        .ok_or_else(|| TargetError::new(TargetErrorKind::Invalid, format!("{r} has no lakeFS id")))
}

impl LakefsTarget {
    /// A target for this lakeFS.
    pub fn new(cfg: LakefsConfig) -> Result<Self, TargetError> {
        let workers = cfg.http.max_concurrency.max(1);
        let http = Http::new(cfg.http).map_err(target_error)?;
        let root = cfg.endpoint.trim_end_matches('/');
        let base = if root.ends_with("/api/v1") {
            root.to_owned()
        } else {
            format!("{root}/api/v1")
        };
        Ok(LakefsTarget {
            http,
            base,
            auth: Auth::Basic(cfg.access_key_id, cfg.secret_access_key),
            workers,
            default_user_group: cfg.default_user_group,
            default_group_id: tokio::sync::OnceCell::new(),
        })
    }

    /// The lakeFS id of the group named `name` (its id, or its name on a lakeFS whose groups
    /// have both), or an error saying it must exist first.
    async fn group_id(&self, name: &str) -> Result<String, TargetError> {
        let groups = self
            .get_all::<LGroup>("/auth/groups", "listing groups")
            .await?;
        groups
            .into_iter()
            .find(|g| g.id == name || g.name.as_deref() == Some(name))
            .map(|g| g.id)
            .ok_or_else(|| {
                TargetError::new(
                    TargetErrorKind::Invalid,
                    format!(
                        "default_user_group {name:?} is not a lakeFS group: create it (as for lakeFS's own auth.ldap.default_user_group), or remove the setting"
                    ),
                )
            })
    }

    async fn get_all<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<Vec<T>, TargetError> {
        let mut out = Vec::new();
        let mut after = String::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let url = format!("{}{path}?amount=1000&after={}", self.base, seg(&after));
            let page: Page<T> = self
                .http
                .persist(
                    |e: &crate::http::HttpError| crate::http::transient(e.kind),
                    || async {
                        let a = self
                            .http
                            .send(Method::GET, &url, &self.auth, &[], None, true)
                            .await?;
                        a.json("lakeFS", what)
                    },
                )
                .await
                .map_err(target_error)?;
            idsync_engine::progress::add(
                idsync_engine::progress::Phase::Observe,
                page.results.len(),
            );
            out.extend(page.results);
            if !page.pagination.has_more {
                return Ok(out);
            }
            // "More" with no way on, or back to a page already read, would end early (and take
            // what is on the pages not read for missing) or loop forever.
            let next = page.pagination.next_offset;
            if next.is_empty() || !seen.insert(next.clone()) {
                return Err(TargetError::new(
                    TargetErrorKind::Protocol,
                    format!(
                        "lakeFS answered {what} with more to read but next_offset {next:?}, which leads nowhere new; nothing is applied from this observation"
                    ),
                ));
            }
            after = next;
        }
    }

    async fn group_details(&self, id: String) -> Result<(Vec<LUser>, Vec<LPolicy>), TargetError> {
        let p = seg(&id);
        let members = self
            .get_all::<LUser>(
                &format!("/auth/groups/{p}/members"),
                "listing group members",
            )
            .await?;
        let policies = self
            .get_all::<LPolicy>(
                &format!("/auth/groups/{p}/policies"),
                "listing group policies",
            )
            .await?;
        Ok((members, policies))
    }

    /// Adds (PUT) or removes (DELETE) members. lakeFS takes one member per request: a group's
    /// members go concurrently (the shared limiter bounds what is in flight), so a large group
    /// does not serialise the apply. Removing a member that is already gone is not an error.
    async fn member_writes(
        &self,
        method: Method,
        group: &PRef,
        members: &[PRef],
    ) -> Result<(), TargetError> {
        let g = seg(id_of(group)?);
        let paths: Vec<String> = members
            .iter()
            .map(|m| Ok(format!("/auth/groups/{g}/members/{}", seg(id_of(m)?))))
            .collect::<Result<_, TargetError>>()?;
        let removing = method == Method::DELETE;
        let results: Vec<Result<(), TargetError>> = futures::stream::iter(paths)
            .map(|path| {
                let method = method.clone();
                async move {
                    match self.call(method, &path, None, true).await {
                        Err(e) if removing && e.kind == TargetErrorKind::NotFound => Ok(()),
                        other => other.map(|_| ()),
                    }
                }
            })
            .buffer_unordered(self.workers.max(1))
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        idempotent: bool,
    ) -> Result<crate::http::Answer, TargetError> {
        let url = format!("{}{path}", self.base);
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.http
            .send(method, &url, &self.auth, &[], body, idempotent)
            .await
            .map_err(target_error)
    }
}

#[async_trait]
impl Target for LakefsTarget {
    fn requests(&self) -> Option<idsync_engine::Requests> {
        Some(self.http.sent())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            nested_groups: false,
            service_principals: false,
            service_principal_members: false,
            renamable: BTreeSet::new(),
            deactivate: false,
            case_insensitive_keys: false,
            attributes: BTreeSet::new(),
            group_policies: true,
            max_members_per_write: 1,
        }
    }

    async fn observe(&self) -> Result<Observed, TargetError> {
        let mut o = Observed::default();
        for u in self
            .get_all::<LUser>("/auth/users", "listing users")
            .await?
        {
            o.insert(ObservedPrincipal {
                id: u.id.clone(),
                principal: Principal::new(Kind::User, u.id),
                policies: BTreeSet::new(),
            });
        }
        let groups = self
            .get_all::<LGroup>("/auth/groups", "listing groups")
            .await?;
        // Members and policies of every group, a few groups at a time, in whatever order they
        // come back.
        let details = futures::stream::iter(groups.into_iter().map(|g| async move {
            let d = self.group_details(g.id.clone()).await;
            (g, d)
        }))
        .buffer_unordered(self.workers)
        .collect::<Vec<_>>()
        .await;
        for (g, d) in details {
            let (members, policies) = d?;
            o.members.insert(
                g.id.clone(),
                members
                    .into_iter()
                    .map(|m| (Kind::User, m.id))
                    .collect::<MemberIds>(),
            );
            o.insert(group_principal(g, policies));
        }
        Ok(o)
    }

    async fn observe_some(&self, want: &Interest) -> Result<Option<Partial>, TargetError> {
        let mut ids = want.ids.clone();
        let mut group_keys = BTreeSet::new();
        for (kind, key) in &want.keys {
            match kind {
                Kind::User => {
                    ids.insert((Kind::User, key.clone()));
                }
                Kind::Group => {
                    group_keys.insert(key.as_str());
                }
                Kind::ServicePrincipal => {}
            }
        }
        // A group's key is its name, which need not be its id: one listing finds them all. A
        // group found by key comes with its members.
        let mut with_members = want.members.clone();
        if !group_keys.is_empty() {
            for g in self
                .get_all::<LGroup>("/auth/groups", "listing groups")
                .await?
            {
                if group_keys.contains(g.name.as_deref().unwrap_or(&g.id)) {
                    with_members.insert(g.id.clone());
                    ids.insert((Kind::Group, g.id));
                }
            }
        }
        let with_members = &with_members;
        let reads = futures::stream::iter(ids.into_iter().map(|(kind, id)| async move {
            let path = match kind {
                Kind::User => format!("/auth/users/{}", seg(&id)),
                Kind::Group => format!("/auth/groups/{}", seg(&id)),
                Kind::ServicePrincipal => return Ok(None),
            };
            let a = match self.call(Method::GET, &path, None, true).await {
                Ok(a) => a,
                Err(e) if e.kind == TargetErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if kind == Kind::User {
                let u: LUser = a.json("lakeFS", "reading a user").map_err(target_error)?;
                let p = ObservedPrincipal {
                    id: u.id.clone(),
                    principal: Principal::new(Kind::User, u.id),
                    policies: BTreeSet::new(),
                };
                return Ok(Some((p, None)));
            }
            // lakeFS answers a group's display name as `id` here (no `name`): keep the id asked.
            let one: LGroup = a.json("lakeFS", "reading a group").map_err(target_error)?;
            let g = LGroup {
                name: Some(one.name.unwrap_or(one.id)),
                id,
                description: one.description,
            };
            if !with_members.contains(&g.id) {
                // Policies only matter with members: they are attached as differences too.
                return Ok(Some((group_principal(g, Vec::new()), None)));
            }
            let (members, policies) = self.group_details(g.id.clone()).await?;
            let members: Vec<String> = members.into_iter().map(|m| m.id).collect();
            Ok::<_, TargetError>(Some((group_principal(g, policies), Some(members))))
        }))
        .buffer_unordered(self.workers)
        .collect::<Vec<_>>()
        .await;
        let mut out = Partial::default();
        for r in reads {
            if let Some((p, members)) = r? {
                if let Some(m) = members {
                    out.members.insert(p.id.clone(), m);
                }
                out.principals.push(p);
            }
        }
        Ok(Some(out))
    }

    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
        match op {
            Op::Create { principal, .. } => match principal.kind {
                Kind::User => {
                    // The default group is found before the user is made: a missing one stops
                    // the create instead of leaving a user outside it.
                    let group = match &self.default_user_group {
                        Some(name) => Some(
                            self.default_group_id
                                .get_or_init(|| self.group_id(name))
                                .await
                                .clone()?,
                        ),
                        None => None,
                    };
                    self.call(
                        Method::POST,
                        "/auth/users",
                        Some(json!({"id": principal.key})),
                        false,
                    )
                    .await?;
                    if let Some(g) = group {
                        let key = seg(&principal.key);
                        let joined = self
                            .call(
                                Method::PUT,
                                &format!("/auth/groups/{}/members/{key}", seg(&g)),
                                None,
                                true,
                            )
                            .await;
                        if let Err(e) = joined {
                            // Undone, so that no user idsync made is left outside the group: the
                            // create fails and is tried again (in this run or the next). Only if
                            // this delete fails too does the user stay outside the group.
                            let undone = self
                                .call(Method::DELETE, &format!("/auth/users/{key}"), None, true)
                                .await;
                            let mut e = e;
                            if undone.is_err() {
                                e.message.push_str(&format!(
                                    "; the user {} was created but could not be removed again: add it to {g:?} by hand",
                                    principal.key
                                ));
                            }
                            return Err(e);
                        }
                    }
                    Ok(Outcome::Created(principal.key.clone()))
                }
                Kind::Group => {
                    let body = json!({"id": principal.key, "description": principal.description});
                    let a = self
                        .call(Method::POST, "/auth/groups", Some(body), false)
                        .await?;
                    let g: LGroup = a.json("lakeFS", "creating a group").map_err(target_error)?;
                    Ok(Outcome::Created(g.id))
                }
                Kind::ServicePrincipal => Err(TargetError::new(
                    TargetErrorKind::Invalid,
                    "lakeFS has no service principals",
                )),
            },
            Op::Delete { target, .. } => {
                let path = match target.kind {
                    Kind::User => format!("/auth/users/{}", seg(id_of(target)?)),
                    Kind::Group => format!("/auth/groups/{}", seg(id_of(target)?)),
                    Kind::ServicePrincipal => return Ok(Outcome::Done),
                };
                match self.call(Method::DELETE, &path, None, true).await {
                    Err(e) if e.kind == TargetErrorKind::NotFound => Ok(Outcome::Done),
                    other => other.map(|_| Outcome::Done),
                }
            }
            Op::AddMembers { group, members } => {
                self.member_writes(Method::PUT, group, members).await?;
                Ok(Outcome::Done)
            }
            Op::RemoveMembers { group, members } => {
                self.member_writes(Method::DELETE, group, members).await?;
                Ok(Outcome::Done)
            }
            Op::AttachPolicies { group, policies } => {
                let g = seg(id_of(group)?);
                for p in policies {
                    self.call(
                        Method::PUT,
                        &format!("/auth/groups/{g}/policies/{}", seg(p)),
                        None,
                        true,
                    )
                    .await?;
                }
                Ok(Outcome::Done)
            }
            Op::DetachPolicies { group, policies } => {
                let g = seg(id_of(group)?);
                for p in policies {
                    match self
                        .call(
                            Method::DELETE,
                            &format!("/auth/groups/{g}/policies/{}", seg(p)),
                            None,
                            true,
                        )
                        .await
                    {
                        Err(e) if e.kind == TargetErrorKind::NotFound => {}
                        other => {
                            other?;
                        }
                    }
                }
                Ok(Outcome::Done)
            }
            Op::Update { target, .. } => Err(TargetError::new(
                TargetErrorKind::Invalid,
                format!("lakeFS cannot change {target}: its API has no update for users or groups"),
            )),
            Op::Deactivate { target } => Err(TargetError::new(
                TargetErrorKind::Invalid,
                format!("lakeFS cannot deactivate {target}; use deprovision = \"delete\""),
            )),
            Op::Adopt { .. } | Op::Forget { .. } => Ok(Outcome::Done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::seg;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("waad|0b6f"), "waad%7C0b6f");
        assert_eq!(
            seg("uid=jane,ou=people,dc=corp"),
            "uid%3Djane%2Cou%3Dpeople%2Cdc%3Dcorp"
        );
        assert_eq!(seg("Équipe Data"), "%C3%89quipe%20Data");
    }
}
