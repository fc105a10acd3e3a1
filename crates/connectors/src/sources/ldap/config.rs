//! `[source] kind = "ldap"`: an LDAP directory or Active Directory. The connection settings carry
//! lakeFS's own names (`server_endpoint`, `bind_dn`, `bind_password`, `user_base_dn`,
//! `user_filter`, `username_attribute`), so a lakeFS operator can copy them.

use crate::registry::{Check, EnvForm, EnvVar, KindOf, SourceConfig, SourceSettings};
use idsync_engine::{Source, SourceError};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The settings of `[source] kind = "ldap"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `ldap://host:389` or `ldaps://host:636` (`LDAP_SERVER_ENDPOINT`).
    server_endpoint: Option<String>,
    /// The DN to bind as (Active Directory also takes `user@corp.example` or `CORP\\user`); none
    /// for an anonymous bind (`LDAP_BIND_DN`).
    bind_dn: Option<String>,
    /// Its password; keep it out of the file (`LDAP_BIND_PASSWORD`, or `LDAP_BIND_PASSWORD_FILE`).
    bind_password: Option<Secret>,
    /// Where users are searched (the whole subtree).
    user_base_dn: Option<String>,
    /// Which entries are users [default: `(objectClass=inetOrgPerson)`; Active Directory:
    /// `(&(objectCategory=person)(objectClass=user))`].
    user_filter: Option<String>,
    /// The attribute that holds the login name [default: `uid`; Active Directory:
    /// `sAMAccountName`].
    username_attribute: Option<String>,
    /// Where groups are searched [default: `user_base_dn`].
    group_base_dn: Option<String>,
    /// Which entries are groups [default: `(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))`;
    /// Active Directory: `(objectClass=group)`].
    group_filter: Option<String>,
    /// The attribute that holds a group's name [default: `cn`].
    group_name_attribute: Option<String>,
    /// `member`, `uniqueMember` (both hold DNs) or `memberUid` (login names, posix groups)
    /// [default: `member`].
    member_attribute: Option<String>,
    /// The attribute that holds mail addresses [default: `mail`].
    mail_attribute: Option<String>,
    /// The attribute that holds the display name [default: `displayName`, else `cn`].
    display_name_attribute: Option<String>,
    /// OpenLDAP: an attribute whose presence marks a user disabled (`pwdAccountLockedTime`,
    /// `nsAccountLock`); Active Directory uses `userAccountControl` bit 2 [default: none].
    disabled_attribute: Option<String>,
    /// With `disabled_attribute`: the value that means disabled (any value when unset, compared
    /// case-insensitively).
    disabled_value: Option<String>,
    /// Upgrade `ldap://` with StartTLS before binding [default: false].
    start_tls: Option<bool>,
    /// Extra CA certificates (PEM) to trust; the certificate is always verified.
    ca_bundle: Option<String>,
    /// Entries per page of a search (the paged-results control) [default: 500].
    page_size: Option<u32>,
    /// Seconds to wait for the connection and for each operation [default: 30].
    timeout: Option<u64>,
    /// `auto` (read the root DSE), `openldap` or `active_directory` [default: auto].
    flavour: Option<String>,
    /// Allow a simple bind over plain `ldap://` to a host other than this machine (the password
    /// in clear text on the network) [default: false].
    allow_insecure: Option<bool>,
}

const ENV: &[EnvVar] = &[
    EnvVar {
        names: &["LDAP_SERVER_ENDPOINT"],
        setting: "server_endpoint",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["LDAP_BIND_DN"],
        setting: "bind_dn",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["LDAP_BIND_PASSWORD"],
        setting: "bind_password",
        form: EnvForm::Secret,
    },
];

/// The `ldap` source kind.
pub static KIND: KindOf<Settings> = KindOf::new("ldap", ENV);

/// Which server it is, as far as idsync cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Read the root DSE.
    Auto,
    /// OpenLDAP or another RFC 4533 directory: `entryUUID`, content synchronisation.
    OpenLdap,
    /// Active Directory or Samba AD: `objectGUID`, `userAccountControl`, range retrieval.
    ActiveDirectory,
}

/// A configured LDAP source.
#[derive(Clone, Debug)]
pub struct LdapSourceConfig {
    /// The server's URL.
    pub server_endpoint: String,
    /// The bind DN (none: anonymous).
    pub bind_dn: Option<String>,
    /// The bind password.
    pub bind_password: Option<Secret>,
    /// The users' base DN.
    pub user_base_dn: String,
    /// The users' filter, if set.
    pub user_filter: Option<String>,
    /// The login name's attribute, if set.
    pub username_attribute: Option<String>,
    /// The groups' base DN.
    pub group_base_dn: String,
    /// The groups' filter, if set.
    pub group_filter: Option<String>,
    /// The group name's attribute.
    pub group_name_attribute: String,
    /// The membership attribute.
    pub member_attribute: String,
    /// The mail attribute.
    pub mail_attribute: String,
    /// The display name's attribute, if set.
    pub display_name_attribute: Option<String>,
    /// The attribute that marks a user disabled (OpenLDAP).
    pub disabled_attribute: Option<String>,
    /// The value of it that does.
    pub disabled_value: Option<String>,
    /// StartTLS.
    pub start_tls: bool,
    /// Extra CA certificates.
    pub ca_bundle: Option<PathBuf>,
    /// Page size.
    pub page_size: u32,
    /// Connection and operation timeout.
    pub timeout: Duration,
    /// The flavour asked for.
    pub flavour: Flavour,
}

/// Whether `host` is this machine.
fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl SourceSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn SourceConfig>> {
        let s = self;
        let endpoint = c.required(
            "server_endpoint",
            s.server_endpoint.as_ref(),
            "the directory's URL, ldap://host:389 or ldaps://host:636 (or LDAP_SERVER_ENDPOINT)",
        );
        if let Some(e) = endpoint {
            match reqwest::Url::parse(e) {
                Ok(u) if matches!(u.scheme(), "ldap" | "ldaps") && u.host_str().is_some() => {
                    let plain = u.scheme() == "ldap" && !s.start_tls.unwrap_or(false);
                    let host = u.host_str().unwrap_or_default();
                    if plain
                        && !loopback(host)
                        && s.bind_password.as_ref().is_some_and(|p| !p.is_empty())
                        && !s.allow_insecure.unwrap_or(false)
                    {
                        c.problem(
                            "server_endpoint",
                            format!("a simple bind over plain ldap:// to {host} would send the password in clear text: use ldaps://, set start_tls = true, or allow_insecure = true"),
                        );
                    }
                    if u.scheme() == "ldaps" && s.start_tls.unwrap_or(false) {
                        c.problem(
                            "start_tls",
                            "StartTLS is for ldap://; an ldaps:// connection is TLS already",
                        );
                    }
                }
                _ => c.problem(
                    "server_endpoint",
                    format!("{e:?} is not an LDAP URL: write ldap://host:389 or ldaps://host:636"),
                ),
            }
        }
        if s.bind_dn.is_some() && s.bind_password.as_ref().is_none_or(|p| p.is_empty()) {
            c.problem(
                "bind_password",
                "missing for bind_dn: set LDAP_BIND_PASSWORD (or LDAP_BIND_PASSWORD_FILE); keep it out of the file",
            );
        }
        let user_base = c.required(
            "user_base_dn",
            s.user_base_dn.as_ref(),
            "where users are searched, e.g. ou=people,dc=example,dc=com",
        );
        for (key, dn) in [
            ("user_base_dn", user_base),
            ("group_base_dn", s.group_base_dn.as_ref()),
            ("bind_dn", s.bind_dn.as_ref()),
        ] {
            // Active Directory also binds with a user principal name (user@corp.example) or a
            // down-level logon name (CORP\user) ([MS-ADTS] 5.1.1.1.1).
            let ad_name = key == "bind_dn"
                && dn.is_some_and(|d| !d.contains('=') && (d.contains('@') || d.contains('\\')));
            if let Some(dn) = dn
                && !ad_name
                && let Err(e) = super::escape::normalize_dn(dn)
            {
                c.problem(key, e.0);
            }
        }
        for (key, f) in [
            ("user_filter", s.user_filter.as_ref()),
            ("group_filter", s.group_filter.as_ref()),
        ] {
            if let Some(f) = f
                && ldap3::parse_filter(f).is_err()
            {
                c.problem(
                    key,
                    format!(
                        "{f:?} is not an LDAP filter (RFC 4515): write e.g. (objectClass=person)"
                    ),
                );
            }
        }
        let member = s
            .member_attribute
            .clone()
            .unwrap_or_else(|| "member".into());
        if !["member", "uniquemember", "memberuid"].contains(&member.to_ascii_lowercase().as_str())
        {
            c.problem(
                "member_attribute",
                format!("{member:?}: one of member, uniqueMember, memberUid"),
            );
        }
        let flavour = match s.flavour.as_deref() {
            None | Some("auto") => Flavour::Auto,
            Some("openldap") => Flavour::OpenLdap,
            Some("active_directory") => Flavour::ActiveDirectory,
            Some(other) => {
                c.problem(
                    "flavour",
                    format!("{other:?}: one of auto, openldap, active_directory"),
                );
                Flavour::Auto
            }
        };
        if s.page_size == Some(0) {
            c.problem("page_size", "must be at least 1");
        }
        if s.timeout == Some(0) {
            c.problem("timeout", "must be at least 1 second");
        }
        if s.disabled_value.is_some() && s.disabled_attribute.is_none() {
            c.problem(
                "disabled_value",
                "needs disabled_attribute: the attribute whose value it is",
            );
        }
        let endpoint = endpoint?;
        let user_base = user_base?;
        if c.failed() {
            return None;
        }
        Some(Box::new(LdapSourceConfig {
            server_endpoint: endpoint.clone(),
            bind_dn: s.bind_dn.clone(),
            bind_password: s.bind_password.clone(),
            user_base_dn: user_base.clone(),
            user_filter: s.user_filter.clone(),
            username_attribute: s.username_attribute.clone(),
            group_base_dn: s.group_base_dn.clone().unwrap_or_else(|| user_base.clone()),
            group_filter: s.group_filter.clone(),
            group_name_attribute: s
                .group_name_attribute
                .clone()
                .unwrap_or_else(|| "cn".into()),
            member_attribute: member,
            mail_attribute: s.mail_attribute.clone().unwrap_or_else(|| "mail".into()),
            display_name_attribute: s.display_name_attribute.clone(),
            disabled_attribute: s.disabled_attribute.clone(),
            disabled_value: s.disabled_value.clone(),
            start_tls: s.start_tls.unwrap_or(false),
            ca_bundle: s.ca_bundle.as_deref().map(|p| c.resolve(p)),
            page_size: s.page_size.unwrap_or(500),
            timeout: Duration::from_secs(s.timeout.unwrap_or(30)),
            flavour,
        }))
    }
}

impl SourceConfig for LdapSourceConfig {
    fn kind(&self) -> &'static str {
        "ldap"
    }
    fn describe(&self) -> String {
        format!("ldap {} ({})", self.server_endpoint, self.user_base_dn)
    }
    fn build(&self, _workers: usize) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(super::LdapSource::new(self.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::check;
    use serde_json::json;

    fn keys(e: &[crate::registry::Problem]) -> Vec<&str> {
        e.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn lakefs_settings_are_accepted_as_lakefs_writes_them() {
        let ok = check::source(
            &KIND,
            json!({
                "server_endpoint": "ldaps://ldap.corp.example:636",
                "bind_dn": "cn=idsync,ou=svc,dc=corp,dc=example",
                "bind_password": "pw",
                "user_base_dn": "ou=people,dc=corp,dc=example",
                "user_filter": "(objectClass=inetOrgPerson)",
                "username_attribute": "uid",
            }),
            &[],
        )
        .unwrap();
        assert_eq!(
            ok.describe(),
            "ldap ldaps://ldap.corp.example:636 (ou=people,dc=corp,dc=example)"
        );
        assert!(!format!("{ok:?}").contains("\"pw\""), "{ok:?}");
    }

    #[test]
    fn active_directory_bind_names_are_taken_and_other_non_dns_refused() {
        for (name, ok) in [
            ("svc-idsync@corp.example", true),
            ("CORP\\svc-idsync", true),
            ("CN=svc,OU=x,DC=corp,DC=example", true),
            ("svc-idsync", false),
        ] {
            let v = json!({
                "server_endpoint": "ldaps://dc1.corp.example",
                "bind_dn": name,
                "bind_password": "pw",
                "user_base_dn": "DC=corp,DC=example",
            });
            let r = check::source(&KIND, v, &[]);
            assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
        }
    }

    #[test]
    fn a_password_over_plain_ldap_to_another_host_is_refused() {
        let base = json!({
            "server_endpoint": "ldap://ldap.corp.example",
            "bind_dn": "cn=idsync,dc=x",
            "bind_password": "pw",
            "user_base_dn": "dc=x",
        });
        let e = check::source(&KIND, base.clone(), &[]).unwrap_err();
        assert_eq!(keys(&e), ["server_endpoint"]);
        assert!(e[0].message.contains("start_tls"), "{e:?}");
        for extra in [json!({"start_tls": true}), json!({"allow_insecure": true})] {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            check::source(&KIND, v, &[]).unwrap();
        }
        let mut local = base.clone();
        local["server_endpoint"] = json!("ldap://127.0.0.1:3890");
        check::source(&KIND, local, &[]).unwrap();
    }

    #[test]
    fn bad_settings_are_each_named() {
        let e = check::source(
            &KIND,
            json!({
                "server_endpoint": "http://x",
                "bind_dn": "not a dn",
                "user_base_dn": "ou=people,dc",
                "user_filter": "objectClass=person)(",
                "member_attribute": "members",
                "flavour": "novell",
                "page_size": 0,
                "disabled_value": "TRUE",
                "url": "x",
            }),
            &[],
        )
        .unwrap_err();
        assert_eq!(keys(&e), ["url"], "unknown keys are reported first: {e:?}");
        let e = check::source(
            &KIND,
            json!({
                "server_endpoint": "http://x",
                "bind_dn": "not a dn",
                "user_base_dn": "ou=people,dc",
                "user_filter": "objectClass=person)(",
                "member_attribute": "members",
                "flavour": "novell",
                "page_size": 0,
                "disabled_value": "TRUE",
            }),
            &[],
        )
        .unwrap_err();
        let mut k = keys(&e);
        k.sort();
        assert_eq!(
            k,
            [
                "bind_dn",
                "bind_password",
                "disabled_value",
                "flavour",
                "member_attribute",
                "page_size",
                "server_endpoint",
                "user_base_dn",
                "user_filter"
            ]
        );
    }
}
