//! Reading what an LDAP server sends, without trusting it: search entries, referrals, and the RFC
//! 4533 content synchronisation controls and messages. ldap3
//! decodes these with `expect` and `panic!`; a malformed answer must be an error naming the server
//! instead, so these walk the BER tags themselves and return `None` on anything unexpected.
//!
//! Sources: RFC 4511 section 4.5.2 (SearchResultEntry), section 4.13 (IntermediateResponse);
//! RFC 4533 sections 2.3 to 2.5 (syncState, syncDone, syncInfoValue). See docs/apis/ldap.md.

use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag};
use std::collections::BTreeMap;

/// The syncRequest control (RFC 4533 section 2.2).
pub const SYNC_REQUEST: &str = "1.3.6.1.4.1.4203.1.9.1.1";
/// The syncState control (section 2.3).
pub const SYNC_STATE: &str = "1.3.6.1.4.1.4203.1.9.1.2";
/// The syncDone control (section 2.4).
pub const SYNC_DONE: &str = "1.3.6.1.4.1.4203.1.9.1.3";
/// The syncInfo intermediate response (section 2.5).
pub const SYNC_INFO: &str = "1.3.6.1.4.1.4203.1.9.1.4";

/// A search result entry: its DN and its attributes by lower-cased name (with options such as
/// `;range=0-1499` kept), every value as bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The entry's DN, as the server wrote it.
    pub dn: String,
    /// Attribute values by lower-cased description.
    pub attrs: BTreeMap<String, Vec<Vec<u8>>>,
    /// The descriptions as the server wrote them, by their lower-cased form.
    pub names: BTreeMap<String, String>,
}

impl Entry {
    /// The values of `name` (any case).
    pub fn values(&self, name: &str) -> &[Vec<u8>] {
        self.attrs
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The values of `name` as text (values that are not UTF-8 left out).
    pub fn texts(&self, name: &str) -> Vec<String> {
        self.values(name)
            .iter()
            .filter_map(|v| String::from_utf8(v.clone()).ok())
            .collect()
    }

    /// The first value of `name` as text.
    pub fn text(&self, name: &str) -> Option<String> {
        self.texts(name).into_iter().next()
    }
}

fn prim(t: &StructureTag) -> Option<&[u8]> {
    match &t.payload {
        PL::P(v) => Some(v),
        PL::C(_) => None,
    }
}

fn cons(t: &StructureTag) -> Option<&[StructureTag]> {
    match &t.payload {
        PL::C(v) => Some(v),
        PL::P(_) => None,
    }
}

fn universal(t: &StructureTag, id: u64) -> bool {
    t.class == TagClass::Universal && t.id == id
}

const BOOLEAN: u64 = 1;
const OCTET_STRING: u64 = 4;
const ENUMERATED: u64 = 10;
const SEQUENCE: u64 = 16;
const SET: u64 = 17;

/// A SearchResultEntry (`[APPLICATION 4]`), or `None` if the tag is not one or is malformed.
pub fn entry(t: &StructureTag) -> Option<Entry> {
    if t.class != TagClass::Application || t.id != 4 {
        return None;
    }
    let parts = cons(t)?;
    let dn = String::from_utf8(prim(parts.first()?)?.to_vec()).ok()?;
    let mut attrs: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut names = BTreeMap::new();
    for a in cons(parts.get(1)?)? {
        let a = cons(a)?;
        let written = String::from_utf8(prim(a.first()?)?.to_vec()).ok()?;
        let name = written.to_ascii_lowercase();
        let vals = cons(a.get(1)?)?;
        names.insert(name.clone(), written);
        let slot = attrs.entry(name).or_default();
        for v in vals {
            slot.push(prim(v)?.to_vec());
        }
    }
    Some(Entry { dn, attrs, names })
}

/// The URLs of a SearchResultReference (`[APPLICATION 19]`).
pub fn referral(t: &StructureTag) -> Option<Vec<String>> {
    if t.class != TagClass::Application || t.id != 19 {
        return None;
    }
    cons(t)?
        .iter()
        .map(|u| String::from_utf8(prim(u)?.to_vec()).ok())
        .collect()
}

/// An IntermediateResponse (`[APPLICATION 25]`): its name and value.
pub fn intermediate(t: &StructureTag) -> Option<(Option<String>, Option<Vec<u8>>)> {
    if t.class != TagClass::Application || t.id != 25 {
        return None;
    }
    let mut name = None;
    let mut value = None;
    for p in cons(t)? {
        match (p.class, p.id) {
            (TagClass::Context, 0) => name = Some(String::from_utf8(prim(p)?.to_vec()).ok()?),
            (TagClass::Context, 1) => value = Some(prim(p)?.to_vec()),
            _ => return None,
        }
    }
    Some((name, value))
}

fn parse(val: &[u8]) -> Option<StructureTag> {
    match parse_tag(val) {
        Ok(([], t)) => Some(t),
        _ => None,
    }
}

/// What the syncState control says of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Unchanged, still there (the present phase).
    Present,
    /// New to the client.
    Add,
    /// Changed.
    Modify,
    /// Gone (or out of the search's scope).
    Delete,
}

/// An entry UUID as its text form (RFC 4122, lower case), as `entryUUID` is written.
pub fn uuid_text(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// An Active Directory objectGUID (16 bytes, the first three fields little-endian) as its GUID
/// string.
pub fn guid_text(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    let mut o = [0u8; 16];
    o[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
    o[4..6].copy_from_slice(&[b[5], b[4]]);
    o[6..8].copy_from_slice(&[b[7], b[6]]);
    o[8..].copy_from_slice(&b[8..]);
    uuid_text(&o)
}

/// The syncState control's value: the state, the entry's UUID (text) and a cookie.
pub fn sync_state(val: &[u8]) -> Option<(State, String, Option<Vec<u8>>)> {
    let t = parse(val)?;
    if !universal(&t, SEQUENCE) {
        return None;
    }
    let parts = cons(&t)?;
    let st = parts.first().filter(|p| universal(p, ENUMERATED))?;
    let state = match prim(st)? {
        [0] => State::Present,
        [1] => State::Add,
        [2] => State::Modify,
        [3] => State::Delete,
        _ => return None,
    };
    let uuid = uuid_text(prim(parts.get(1).filter(|p| universal(p, OCTET_STRING))?)?)?;
    let cookie = match parts.get(2) {
        Some(c) if universal(c, OCTET_STRING) => Some(prim(c)?.to_vec()),
        Some(_) => return None,
        None => None,
    };
    Some((state, uuid, cookie))
}

/// The paged-results control (RFC 2696).
pub const PAGED_RESULTS: &str = "1.2.840.113556.1.4.319";

/// A paged-results request for `size` entries from `cookie` (empty at the start), as the
/// control's value: `SEQUENCE { size INTEGER, cookie OCTET STRING }`.
pub fn paged_request(size: u32, cookie: &[u8]) -> Vec<u8> {
    let mut n = size.to_be_bytes().to_vec();
    while n.len() > 1 && n[0] == 0 && n[1] & 0x80 == 0 {
        n.remove(0);
    }
    if n[0] & 0x80 != 0 {
        n.insert(0, 0);
    }
    let mut body = vec![0x02];
    body.extend(ber_len(n.len()));
    body.extend(n);
    body.push(0x04);
    body.extend(ber_len(cookie.len()));
    body.extend_from_slice(cookie);
    let mut out = vec![0x30];
    out.extend(ber_len(body.len()));
    out.extend(body);
    out
}

fn ber_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let b: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|x| *x == 0)
        .collect();
    let mut out = vec![0x80 | b.len() as u8];
    out.extend(b);
    out
}

/// The cookie of a paged-results response control (empty: the last page).
pub fn paged_cookie(val: &[u8]) -> Option<Vec<u8>> {
    let t = parse(val)?;
    if !universal(&t, SEQUENCE) {
        return None;
    }
    let parts = cons(&t)?;
    let c = parts.get(1).filter(|p| universal(p, OCTET_STRING))?;
    Some(prim(c)?.to_vec())
}

/// The syncDone control's value: the cookie, and whether deletions were sent as such
/// (`refreshDeletes`; false means a present phase ran).
pub fn sync_done(val: &[u8]) -> Option<(Option<Vec<u8>>, bool)> {
    let t = parse(val)?;
    if !universal(&t, SEQUENCE) {
        return None;
    }
    let mut cookie = None;
    let mut deletes = false;
    for p in cons(&t)? {
        if universal(p, OCTET_STRING) {
            cookie = Some(prim(p)?.to_vec());
        } else if universal(p, BOOLEAN) {
            deletes = prim(p)?.first().is_some_and(|b| *b != 0);
        } else {
            return None;
        }
    }
    Some((cookie, deletes))
}

/// A syncInfo message (RFC 4533 section 2.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncInfo {
    /// A new cookie.
    NewCookie(Vec<u8>),
    /// The end of a delete phase (`refreshDelete`) or a present phase (`refreshPresent`).
    Phase {
        /// Whether it was the present phase.
        present: bool,
        /// The cookie.
        cookie: Option<Vec<u8>>,
        /// Whether the refresh is done.
        done: bool,
    },
    /// Entries by UUID: deleted (`refresh_deletes`) or present.
    IdSet {
        /// The cookie.
        cookie: Option<Vec<u8>>,
        /// Deleted rather than present.
        refresh_deletes: bool,
        /// The entries' UUIDs, as text.
        uuids: Vec<String>,
    },
}

/// The value of a syncInfo intermediate response.
pub fn sync_info(val: &[u8]) -> Option<SyncInfo> {
    let t = parse(val)?;
    if t.class != TagClass::Context {
        return None;
    }
    match t.id {
        0 => Some(SyncInfo::NewCookie(prim(&t)?.to_vec())),
        1 | 2 => {
            let mut cookie = None;
            let mut done = true;
            for p in cons(&t)? {
                if universal(p, OCTET_STRING) {
                    cookie = Some(prim(p)?.to_vec());
                } else if universal(p, BOOLEAN) {
                    done = prim(p)?.first().is_some_and(|b| *b != 0);
                } else {
                    return None;
                }
            }
            Some(SyncInfo::Phase {
                present: t.id == 2,
                cookie,
                done,
            })
        }
        3 => {
            let mut cookie = None;
            let mut refresh_deletes = false;
            let mut uuids = Vec::new();
            for p in cons(&t)? {
                if universal(p, OCTET_STRING) {
                    cookie = Some(prim(p)?.to_vec());
                } else if universal(p, BOOLEAN) {
                    refresh_deletes = prim(p)?.first().is_some_and(|b| *b != 0);
                } else if universal(p, SET) {
                    for u in cons(p)? {
                        uuids.push(uuid_text(prim(u)?)?);
                    }
                } else {
                    return None;
                }
            }
            Some(SyncInfo::IdSet {
                cookie,
                refresh_deletes,
                uuids,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BER element (definite length), to build what a server sends.
    fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = value.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let len: Vec<u8> = n
                .to_be_bytes()
                .iter()
                .copied()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | len.len() as u8);
            out.extend(len);
        }
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn sync_controls_read_back_what_rfc_4533_writes() {
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
        ];
        // syncStateValue ::= SEQUENCE { state ENUMERATED, entryUUID, cookie OPTIONAL }
        let mut body = tlv(0x0a, &[3]);
        body.extend(tlv(0x04, &uuid));
        body.extend(tlv(0x04, b"rid=001,csn=x"));
        let (state, id, cookie) = sync_state(&tlv(0x30, &body)).unwrap();
        assert_eq!(state, State::Delete);
        assert_eq!(id, "12345678-9abc-def0-0001-020304050607");
        assert_eq!(cookie.as_deref(), Some(&b"rid=001,csn=x"[..]));

        let mut done = tlv(0x04, b"c");
        done.extend(tlv(0x01, &[0xff]));
        assert_eq!(
            sync_done(&tlv(0x30, &done)),
            Some((Some(b"c".to_vec()), true))
        );
        assert_eq!(sync_done(&tlv(0x30, &[])), Some((None, false)));

        // syncIdSet [3] { cookie, refreshDeletes TRUE, syncUUIDs SET OF }
        let mut set = tlv(0x04, b"k");
        set.extend(tlv(0x01, &[1]));
        set.extend(tlv(0x31, &tlv(0x04, &uuid)));
        assert_eq!(
            sync_info(&tlv(0xa3, &set)),
            Some(SyncInfo::IdSet {
                cookie: Some(b"k".to_vec()),
                refresh_deletes: true,
                uuids: vec!["12345678-9abc-def0-0001-020304050607".into()],
            })
        );
        assert_eq!(
            sync_info(&tlv(0x80, b"new")),
            Some(SyncInfo::NewCookie(b"new".to_vec()))
        );
        assert_eq!(
            sync_info(&tlv(0xa2, &[])),
            Some(SyncInfo::Phase {
                present: true,
                cookie: None,
                done: true
            })
        );
    }

    #[test]
    fn guids_are_written_as_windows_writes_them() {
        // The bytes of {01234567-89ab-cdef-0123-456789abcdef} as AD stores them.
        let b = [
            0x67, 0x45, 0x23, 0x01, 0xab, 0x89, 0xef, 0xcd, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            guid_text(&b).unwrap(),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
        assert_eq!(guid_text(&b[..15]), None);
    }

    #[test]
    fn a_cookie_longer_than_127_bytes_is_read_whole() {
        // Samba's DirSync cookies are 144 bytes, OpenLDAP's grow with the servers: a long-form
        // length must be read, not cut.
        let cookie = vec![7u8; 300];
        let done = tlv(0x30, &tlv(0x04, &cookie));
        assert_eq!(&done[..4], &[0x30, 0x82, 0x01, 0x30]);
        assert_eq!(sync_done(&done), Some((Some(cookie), false)));
    }

    #[test]
    fn paged_results_are_written_and_read_as_rfc_2696_says() {
        // size 500 = 0x01f4, an empty cookie: SEQUENCE { INTEGER 500, OCTET STRING "" }.
        assert_eq!(
            paged_request(500, &[]),
            [0x30, 0x06, 0x02, 0x02, 0x01, 0xf4, 0x04, 0x00]
        );
        // A size whose top bit is set gets a leading zero (INTEGER is signed).
        assert_eq!(paged_request(128, b"k")[2..6], [0x02, 0x02, 0x00, 0x80]);
        // A long cookie keeps its length in the long form, and reads back whole.
        let cookie = vec![9u8; 200];
        let v = paged_request(1000, &cookie);
        assert_eq!(paged_cookie(&v), Some(cookie));
        assert_eq!(paged_cookie(&paged_request(1, &[])), Some(Vec::new()));
        assert_eq!(paged_cookie(&[0x30, 0x03, 0x02, 0x01, 0x05]), None);
    }

    proptest::proptest! {
        /// A request written for any size and cookie reads back the cookie.
        #[test]
        fn paged_requests_round_trip(size in 1u32.., cookie in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            proptest::prop_assert_eq!(paged_cookie(&paged_request(size, &cookie)), Some(cookie));
        }

        /// Random bytes never panic a reader: they are `None` or a value.
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = sync_state(&b);
            let _ = sync_done(&b);
            let _ = sync_info(&b);
            let _ = paged_cookie(&b);
            if let Some(t) = parse(&b) {
                let _ = entry(&t);
                let _ = referral(&t);
                let _ = intermediate(&t);
            }
        }
    }
}
