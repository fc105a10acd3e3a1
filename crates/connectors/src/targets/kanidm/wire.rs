//! Kanidm's sync wire types, as small serde structs of our own (`kanidm_proto` would bring some
//! 350 crates). Shapes: `proto/src/scim_v1/synch.rs` and `libs/scim_proto/src/lib.rs` of the
//! Kanidm repository; summarised in `docs/apis/kanidm-sync.md`.

use serde::{Deserialize, Serialize};

/// The schema URN prefix of a synced entry's classes.
pub const SCHEMA_PREFIX: &str = "urn:ietf:params:scim:schemas:kanidm:sync:1:";

/// The URN of one class.
pub fn schema(class: &str) -> String {
    format!("{SCHEMA_PREFIX}{class}")
}

/// `ScimSyncState`: externally tagged, `"Refresh"` or `{"Active":{"cookie":"…"}}` (the cookie's
/// bytes in unpadded URL-safe base64).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncState {
    /// The next request must be a refresh.
    Refresh,
    /// The cookie the last request left.
    Active {
        /// The cookie, as base64 text.
        cookie: String,
    },
}

/// `ScimSyncRetentionMode`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Retain {
    /// Delete nothing.
    Ignore,
    /// Delete the agreement's entries not listed.
    Retain(Vec<String>),
    /// Delete these.
    Delete(Vec<String>),
}

impl Retain {
    /// About how many bytes it takes in a request.
    pub fn size(&self) -> usize {
        match self {
            Retain::Ignore => 8,
            Retain::Retain(v) | Retain::Delete(v) => {
                16 + v.iter().map(|u| u.len() + 3).sum::<usize>()
            }
        }
    }
}

/// A mail value.
#[derive(Clone, Debug, Serialize)]
pub struct Mail {
    /// The address.
    pub value: String,
    /// The first is primary.
    pub primary: bool,
}

/// A member reference: Kanidm reads a UUID first, an external id otherwise.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    /// The member's UUID.
    pub external_id: String,
}

/// A person or group entry: a camelCase header (`schemas`, `id`, `externalId`), then Kanidm's
/// attribute names. An attribute left out is purged by Kanidm.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// The classes, as schema URNs.
    pub schemas: Vec<String>,
    /// The entry's UUID.
    pub id: String,
    /// Stored as `sync_external_id`.
    #[serde(rename = "externalId", skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `displayname` (people).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    /// `description` (groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `mail` (people).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mail: Vec<Mail>,
    /// `member` (groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<Vec<Member>>,
}

/// The bytes a request takes besides its entries and retain mode (two states with cookies).
pub const OVERHEAD: usize = 256;

/// One request's entries (serialised) and retain mode; the states are added when it is sent.
#[derive(Clone, Debug)]
pub struct Part {
    /// Entries, each serialised.
    pub entries: Vec<Vec<u8>>,
    /// What to delete.
    pub retain: Retain,
}

impl Part {
    /// The `ScimSyncRequest` body, from `from` to `Active{to}`.
    pub fn body(&self, from: &SyncState, to: &str) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(OVERHEAD + self.entries.iter().map(|e| e.len() + 1).sum::<usize>());
        b.extend_from_slice(b"{\"from_state\":");
        b.extend(serde_json::to_vec(from).unwrap_or_default());
        b.extend_from_slice(b",\"to_state\":");
        b.extend(
            serde_json::to_vec(&SyncState::Active {
                cookie: to.to_owned(),
            })
            .unwrap_or_default(),
        );
        b.extend_from_slice(b",\"retain\":");
        b.extend(serde_json::to_vec(&self.retain).unwrap_or_default());
        b.extend_from_slice(b",\"entries\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(e);
        }
        b.extend_from_slice(b"]}");
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_as_kanidm_reads_them() {
        assert_eq!(
            serde_json::to_string(&SyncState::Refresh).unwrap(),
            "\"Refresh\""
        );
        let a: SyncState = serde_json::from_str(r#"{"Active":{"cookie":"Y29va2ll"}}"#).unwrap();
        assert_eq!(
            a,
            SyncState::Active {
                cookie: "Y29va2ll".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Retain::Ignore).unwrap(),
            "\"Ignore\""
        );
        assert_eq!(
            serde_json::to_string(&Retain::Delete(vec!["u".into()])).unwrap(),
            r#"{"Delete":["u"]}"#
        );
        let p = Part {
            entries: vec![b"{\"id\":\"a\"}".to_vec(), b"{\"id\":\"b\"}".to_vec()],
            retain: Retain::Ignore,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&p.body(&SyncState::Refresh, "Yw")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"from_state":"Refresh","to_state":{"Active":{"cookie":"Yw"}},"retain":"Ignore","entries":[{"id":"a"},{"id":"b"}]})
        );
    }
}
