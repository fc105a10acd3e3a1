//! Graph's JSON shapes of users, groups and service principals, their default property sets, and
//! `$select` projection.

use idsync_model::{Group, Kind, ServicePrincipal, User, UserType};
use serde_json::{Map, Value, json};

/// A directory resource collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collection {
    /// `/users`.
    Users,
    /// `/groups`.
    Groups,
    /// `/servicePrincipals`.
    ServicePrincipals,
}

impl Collection {
    /// The OData type name.
    pub fn type_name(self) -> &'static str {
        match self {
            Collection::Users => "microsoft.graph.user",
            Collection::Groups => "microsoft.graph.group",
            Collection::ServicePrincipals => "microsoft.graph.servicePrincipal",
        }
    }

    /// The URL segment.
    pub fn segment(self) -> &'static str {
        match self {
            Collection::Users => "users",
            Collection::Groups => "groups",
            Collection::ServicePrincipals => "servicePrincipals",
        }
    }

    /// The collection of a principal kind.
    pub fn of(kind: Kind) -> Self {
        match kind {
            Kind::User => Collection::Users,
            Kind::Group => Collection::Groups,
            Kind::ServicePrincipal => Collection::ServicePrincipals,
        }
    }

    /// Properties a `$select` may name.
    pub fn properties(self) -> &'static [&'static str] {
        match self {
            Collection::Users => &[
                "id",
                "displayName",
                "userPrincipalName",
                "mail",
                "otherMails",
                "accountEnabled",
                "userType",
                "onPremisesImmutableId",
                "givenName",
                "surname",
                "jobTitle",
                "businessPhones",
                "mobilePhone",
                "officeLocation",
                "preferredLanguage",
            ],
            Collection::Groups => &[
                "id",
                "displayName",
                "description",
                "securityEnabled",
                "mailEnabled",
                "mail",
                "groupTypes",
                "members",
            ],
            Collection::ServicePrincipals => &[
                "id",
                "appId",
                "displayName",
                "accountEnabled",
                "servicePrincipalType",
            ],
        }
    }

    /// Properties returned without `$select` (Graph's default set: for users, not `accountEnabled`
    /// nor `userType`).
    pub fn defaults(self) -> &'static [&'static str] {
        match self {
            Collection::Users => &[
                "businessPhones",
                "displayName",
                "givenName",
                "jobTitle",
                "mail",
                "mobilePhone",
                "officeLocation",
                "preferredLanguage",
                "surname",
                "userPrincipalName",
                "id",
            ],
            Collection::Groups => &[
                "id",
                "displayName",
                "description",
                "securityEnabled",
                "mailEnabled",
                "mail",
                "groupTypes",
            ],
            Collection::ServicePrincipals => &[
                "id",
                "appId",
                "displayName",
                "accountEnabled",
                "servicePrincipalType",
            ],
        }
    }
}

/// A user's full JSON.
pub fn user(u: &User) -> Value {
    json!({
        "id": u.id,
        "displayName": u.display_name,
        "userPrincipalName": u.user_name,
        "mail": u.emails.first(),
        "otherMails": u.emails.iter().skip(1).collect::<Vec<_>>(),
        "accountEnabled": u.active,
        "userType": match u.user_type { UserType::Member => "Member", UserType::Guest => "Guest" },
        "onPremisesImmutableId": u.external_id,
        "givenName": Value::Null,
        "surname": Value::Null,
        "jobTitle": Value::Null,
        "businessPhones": [],
        "mobilePhone": Value::Null,
        "officeLocation": Value::Null,
        "preferredLanguage": Value::Null,
    })
}

/// A group's full JSON (without members).
pub fn group(g: &Group) -> Value {
    json!({
        "id": g.id,
        "displayName": g.display_name,
        "description": g.description,
        "securityEnabled": g.security_enabled,
        "mailEnabled": g.mail_enabled,
        "mail": Value::Null,
        "groupTypes": [],
    })
}

/// A service principal's full JSON.
pub fn service_principal(s: &ServicePrincipal) -> Value {
    json!({
        "id": s.id,
        "appId": s.app_id,
        "displayName": s.display_name,
        "accountEnabled": s.active,
        "servicePrincipalType": "Application",
    })
}

/// One property of a user, without building the whole object.
pub fn user_field(u: &User, name: &str) -> Option<Value> {
    Some(match name {
        "id" => json!(u.id),
        "displayName" => json!(u.display_name),
        "userPrincipalName" => json!(u.user_name),
        "mail" => json!(u.emails.first()),
        "otherMails" => json!(u.emails.iter().skip(1).collect::<Vec<_>>()),
        "accountEnabled" => json!(u.active),
        "userType" => json!(match u.user_type {
            UserType::Member => "Member",
            UserType::Guest => "Guest",
        }),
        "onPremisesImmutableId" => json!(u.external_id),
        "businessPhones" => json!([]),
        "givenName" | "surname" | "jobTitle" | "mobilePhone" | "officeLocation"
        | "preferredLanguage" => Value::Null,
        _ => return None,
    })
}

/// One property of a group.
pub fn group_field(g: &Group, name: &str) -> Option<Value> {
    Some(match name {
        "id" => json!(g.id),
        "displayName" => json!(g.display_name),
        "description" => json!(g.description),
        "securityEnabled" => json!(g.security_enabled),
        "mailEnabled" => json!(g.mail_enabled),
        "mail" => Value::Null,
        "groupTypes" => json!([]),
        _ => return None,
    })
}

/// One property of a service principal.
pub fn sp_field(s: &ServicePrincipal, name: &str) -> Option<Value> {
    Some(match name {
        "id" => json!(s.id),
        "appId" => json!(s.app_id),
        "displayName" => json!(s.display_name),
        "accountEnabled" => json!(s.active),
        "servicePrincipalType" => json!("Application"),
        _ => return None,
    })
}

/// Builds only the selected properties (always `id`), or the default set: the hot path of
/// list pages, which never builds the whole object.
pub fn render(
    c: Collection,
    select: Option<&[String]>,
    field: impl Fn(&str) -> Option<Value>,
) -> Value {
    let mut out = Map::new();
    if let Some(id) = field("id") {
        out.insert("id".into(), id);
    }
    let mut put = |k: &str| {
        if k != "id"
            && let Some(v) = field(k)
        {
            out.insert(k.to_owned(), v);
        }
    };
    match select {
        Some(s) => s.iter().for_each(|k| put(k)),
        None => c.defaults().iter().for_each(|k| put(k)),
    }
    Value::Object(out)
}

/// Checks a `$select` list against a collection's properties.
pub fn check_select(c: Collection, select: &[String]) -> Result<(), String> {
    for p in select {
        if !c.properties().contains(&p.as_str()) {
            return Err(format!(
                "Could not find a property named '{p}' on type '{}'.",
                c.type_name()
            ));
        }
    }
    Ok(())
}

/// Keeps the selected properties (always `id`), or the default set.
pub fn project(c: Collection, full: &Value, select: Option<&[String]>) -> Value {
    let mut out = Map::new();
    let Some(obj) = full.as_object() else {
        return Value::Object(out);
    };
    let keep: Vec<&str> = match select {
        Some(s) => s.iter().map(String::as_str).collect(),
        None => c.defaults().to_vec(),
    };
    if let Some(id) = obj.get("id") {
        out.insert("id".into(), id.clone());
    }
    for k in keep {
        if let Some(v) = obj.get(k) {
            out.insert(k.to_owned(), v.clone());
        }
    }
    Value::Object(out)
}
