//! The `[mapping]` and `[policy]` sections (top level and per target): templates parsed and
//! checked once, policies spelled out.

use super::{Origin, RawMapping, RawPolicy, Validator};
use idsync_engine::mapping::Mapping;
use idsync_engine::{Deprovision, OnApplyError, OnConflict, Policy, Template};
use idsync_model::{Attr, Kind, PKey};

impl Validator<'_> {
    fn template(
        &mut self,
        key: &str,
        text: Option<&String>,
        default: Option<Template>,
        parse: fn(&str) -> Result<Template, idsync_engine::template::TemplateError>,
    ) -> Option<Template> {
        match text {
            None => default,
            Some(t) if t.is_empty() => None,
            Some(t) => match parse(t) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.err(Origin::File(key), e.to_string());
                    default
                }
            },
        }
    }

    pub(super) fn mapping(&mut self, prefix: &str, raw: &RawMapping, base: &Mapping) -> Mapping {
        let k = |f: &str| format!("{prefix}.{f}");
        let u = Mapping::user_template;
        let s = Mapping::sp_template;
        let g = Mapping::group_template;
        let req = |me: &mut Self, f: &str, t: &Option<String>, d: &Template, p| {
            me.template(&k(f), t.as_ref(), Some(d.clone()), p)
                .unwrap_or_else(|| d.clone())
        };
        Mapping {
            user_name: req(self, "user_name", &raw.user_name, &base.user_name, u),
            guest_user_name: self.template(
                &k("guest_user_name"),
                raw.guest_user_name.as_ref(),
                base.guest_user_name.clone(),
                u,
            ),
            user_display_name: req(
                self,
                "user_display_name",
                &raw.user_display_name,
                &base.user_display_name,
                u,
            ),
            user_external_id: self.template(
                &k("user_external_id"),
                raw.user_external_id.as_ref(),
                base.user_external_id.clone(),
                u,
            ),
            service_principal_key: req(
                self,
                "service_principal_key",
                &raw.service_principal_key,
                &base.service_principal_key,
                s,
            ),
            service_principal_display_name: req(
                self,
                "service_principal_display_name",
                &raw.service_principal_display_name,
                &base.service_principal_display_name,
                s,
            ),
            service_principal_external_id: self.template(
                &k("service_principal_external_id"),
                raw.service_principal_external_id.as_ref(),
                base.service_principal_external_id.clone(),
                s,
            ),
            group_name: req(self, "group_name", &raw.group_name, &base.group_name, g),
            group_display_name: self.template(
                &k("group_display_name"),
                raw.group_display_name.as_ref(),
                base.group_display_name.clone(),
                g,
            ),
            group_external_id: self.template(
                &k("group_external_id"),
                raw.group_external_id.as_ref(),
                base.group_external_id.clone(),
                g,
            ),
            group_description: self.template(
                &k("group_description"),
                raw.group_description.as_ref(),
                base.group_description.clone(),
                g,
            ),
            group_policies: base.group_policies.clone(),
        }
    }

    pub(super) fn policy(&mut self, prefix: &str, raw: &RawPolicy, base: &Policy) -> Policy {
        let k = |f: &str| format!("{prefix}.{f}");
        let mut p = base.clone();
        if let Some(d) = &raw.deprovision {
            match d.as_str() {
                "none" => p.deprovision = Deprovision::None,
                "deactivate" => p.deprovision = Deprovision::Deactivate,
                "delete" => p.deprovision = Deprovision::Delete,
                other => self.err(Origin::File(&k("deprovision")), format!("{other:?} is not a deprovision policy; use \"none\", \"deactivate\" or \"delete\"")),
            }
        }
        if let Some(c) = &raw.on_conflict {
            match c.as_str() {
                "halt" => p.on_conflict = OnConflict::Halt,
                "skip" => p.on_conflict = OnConflict::Skip,
                other => self.err(
                    Origin::File(&k("on_conflict")),
                    format!("{other:?} is not a conflict policy; use \"halt\" or \"skip\""),
                ),
            }
        }
        if let Some(c) = &raw.on_apply_error {
            match c.as_str() {
                "resume" => p.on_apply_error = OnApplyError::Resume,
                "rollback" => p.on_apply_error = OnApplyError::Rollback,
                other => self.err(
                    Origin::File(&k("on_apply_error")),
                    format!(
                        "{other:?} is not an apply error policy; use \"resume\" or \"rollback\""
                    ),
                ),
            }
        }
        if let Some(a) = raw.adopt {
            p.adopt = a;
        }
        if let Some(keys) = &raw.adopt_keys {
            p.adopt_keys.clear();
            for entry in keys {
                match entry.split_once(':').and_then(|(k, v)| Some((Kind::parse(k)?, v))) {
                    Some((kind, key)) if !key.is_empty() => {
                        p.adopt_keys.insert(PKey::new(kind, key));
                    }
                    _ => self.err(
                        Origin::File(&k("adopt_keys")),
                        format!("{entry:?} is not KIND:KEY (e.g. \"user:jane@corp.example\", \"group:Data Engineers\", \"servicePrincipal:<app id>\")"),
                    ),
                }
            }
        }
        if let Some(attrs) = &raw.yield_attributes {
            p.yield_attributes.clear();
            for a in attrs {
                match Attr::parse(a) {
                    Some(Attr::Key) | None => self.err(
                        Origin::File(&k("yield_attributes")),
                        format!("{a:?} cannot be yielded; the attributes are displayName, emails, active, externalId, description"),
                    ),
                    Some(attr) => {
                        p.yield_attributes.insert(attr);
                    }
                }
            }
        }
        if let Some(y) = raw.yield_members {
            p.yield_members = y;
        }
        if raw.max_deletions.is_some() {
            p.max_deletions = raw.max_deletions;
        }
        if let Some(pct) = raw.max_deletions_percent {
            if pct > 100 {
                self.err(
                    Origin::File(&k("max_deletions_percent")),
                    format!("{pct} is not a percentage (0 to 100)"),
                );
            }
            p.max_deletions_percent = Some(pct);
        }
        if let Some(n) = raw.quarantine_after {
            p.quarantine_after = n;
        }
        if let Some(pct) = raw.max_failed_percent {
            if pct > 100 {
                self.err(
                    Origin::File(&k("max_failed_percent")),
                    format!("{pct} is not a percentage (0 to 100; 100 never halts)"),
                );
            }
            p.max_failed_percent = Some(pct);
        }
        p
    }
}
