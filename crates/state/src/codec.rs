//! The state documents: the head `<agreement>.state` in every backend, and the whole document
//! `idsync state export` and `import` exchange.
//!
//! Both are JSON, gzip-compressed (RFC 1952). Their `format` field says which layout they have:
//! [`STATE_FORMAT`] a whole document (the JSON form of [`AgreementState`], as builds before the
//! layers also stored it), [`HEAD_FORMAT`] a head whose big fields are in layer objects
//! ([`crate::layers`]). A newer format is refused, never overwritten, so an older idsync cannot
//! damage what a newer one wrote. The `version` counts commits; a commit must name the version it
//! read (compare-and-swap). Plain, uncompressed JSON is read too (for `idsync state import`, and
//! documents written by hand).
//!
//! What it holds: the id map and the owned set (which target principal is which source principal,
//! and how idsync came to own it), a compact last-applied snapshot, the source's cursors (delta
//! tokens), the journal of an apply in progress, and the agreement's status. No credential is ever
//! part of it.

use crate::StateError;
use flate2::Compression;
use flate2::GzBuilder;
use flate2::read::GzDecoder;
use idsync_model::AgreementState;
use idsync_model::state::STATE_FORMAT;
use serde::Deserialize;
use std::io::{Read, Write};

/// The gzip magic number.
const GZIP: [u8; 2] = [0x1f, 0x8b];

/// Unique per commit: process, time, counter.
fn nonce() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("idsync {} {t:x} {n:x}", std::process::id())
}

/// The stored bytes of `state` as one whole document: its JSON, gzip-compressed. The JSON is
/// compressed as it is written, never held whole (at 100k users it is ten times the stored size).
/// The store itself keeps a state in layers (see [`crate::layers`]); a whole document is what
/// `idsync state export` and `import` exchange, and what builds before the layers stored.
pub fn encode(state: &AgreementState, location: &str) -> Result<Vec<u8>, StateError> {
    to_gzip(state, location)
}

/// `value` as gzip-compressed JSON, compressed as it is written.
pub(crate) fn to_gzip<T: serde::Serialize + ?Sized>(
    value: &T,
    location: &str,
) -> Result<Vec<u8>, StateError> {
    // Level 3: within a few percent of the best size for this JSON, several times faster. The
    // gzip header's comment holds a nonce, so that no two commits store the same bytes (a writer
    // told its conditional write conflicted checks whether the stored bytes are its own).
    let mut gz = GzBuilder::new()
        .comment(nonce())
        .write(Vec::new(), Compression::new(3));
    let mut w = std::io::BufWriter::with_capacity(1 << 16, &mut gz);
    serde_json::to_writer(&mut w, value)
        .map_err(|e| corrupt(location, format!("cannot encode: {e}")))?;
    w.flush()
        .map_err(|e| corrupt(location, format!("cannot compress: {e}")))?;
    drop(w);
    gz.finish()
        .map_err(|e| corrupt(location, format!("cannot compress: {e}")))
}

/// A value read from gzip-compressed (or plain) JSON; what is wrong said as [`decode`] says it.
///
/// The text is inflated whole, parsed, and freed: parsing from memory is faster than from the
/// inflating stream (at 100k users a load took 0.95-1.05 s from the stream, 0.6-0.8 s from
/// memory), for a text held while the load runs (about ten times the stored size), before the
/// run builds anything else.
pub(crate) fn from_gzip<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    location: &str,
) -> Result<T, StateError> {
    let mut buf = Vec::new();
    let json = json_of(bytes, location, &mut buf)?;
    serde_json::from_slice(json).map_err(|e| corrupt(location, e.to_string()))
}

pub(crate) fn corrupt(location: &str, detail: String) -> StateError {
    StateError::Corrupt {
        path: location.to_owned(),
        detail,
    }
}

/// The JSON of a stored document (inflated when compressed).
fn json_of<'a>(
    bytes: &'a [u8],
    location: &str,
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], StateError> {
    if !bytes.starts_with(&GZIP) {
        return Ok(bytes);
    }
    // The gzip trailer's last four bytes are the inflated size (modulo 2^32): the text is read
    // into one allocation of its size, not grown by doubling to up to twice it (a 95 MB text
    // at 100k users held 128 MiB). Bounded, as the trailer is not trusted: a stream inflates
    // to at most about 1,000 times its size.
    let said = bytes
        .len()
        .checked_sub(4)
        .and_then(|at| bytes.get(at..))
        .and_then(|t| <[u8; 4]>::try_from(t).ok())
        .map_or(0, |t| u32::from_le_bytes(t) as usize);
    buf.reserve(said.clamp(bytes.len(), bytes.len().saturating_mul(1032)) + 1);
    GzDecoder::new(bytes)
        .read_to_end(buf)
        .map_err(|e| corrupt(location, format!("not a complete gzip stream: {e}")))?;
    Ok(buf)
}

#[derive(Deserialize)]
struct Head {
    format: u32,
    #[serde(default)]
    version: u64,
}

fn check_head(json: &[u8], location: &str) -> Result<Head, StateError> {
    // Fields other than these two are skipped, not built: cheap even for a large document, and
    // the whole text is still checked to be well-formed JSON.
    let head: Head = serde_json::from_slice(json).map_err(|e| corrupt(location, e.to_string()))?;
    check_format(head.format, location)?;
    Ok(head)
}

/// A format this build reads, or [`StateError::NewerFormat`].
fn check_format(format: u32, location: &str) -> Result<(), StateError> {
    if format > HEAD_FORMAT {
        return Err(StateError::NewerFormat {
            path: location.to_owned(),
            found: format,
            supported: HEAD_FORMAT,
        });
    }
    Ok(())
}

/// The error for a head given where a whole document was expected (`idsync state import` of a
/// file copied out of the store).
fn a_head(location: &str) -> StateError {
    corrupt(
        location,
        "this is the head of a stored state, whose principals are kept in separate layer objects \
         beside it; `idsync state export` writes the whole document"
            .into(),
    )
}

/// Decodes a stored document (gzip or plain JSON), refusing newer formats and reporting a
/// corrupted one with what is wrong. A compressed document is decoded as it is inflated, never
/// held whole as text.
pub fn decode(bytes: &[u8], location: &str) -> Result<AgreementState, StateError> {
    if !bytes.starts_with(&GZIP) {
        if check_head(bytes, location)?.format > STATE_FORMAT {
            return Err(a_head(location));
        }
        return serde_json::from_slice(bytes).map_err(|e| corrupt(location, e.to_string()));
    }
    let inflated = std::io::BufReader::with_capacity(1 << 16, GzDecoder::new(bytes));
    match serde_json::from_reader::<_, AgreementState>(inflated) {
        Ok(state) if state.format <= STATE_FORMAT => Ok(state),
        Ok(state) if state.format <= HEAD_FORMAT => Err(a_head(location)),
        Ok(state) => Err(StateError::NewerFormat {
            path: location.to_owned(),
            found: state.format,
            supported: HEAD_FORMAT,
        }),
        Err(e) => Err(why(bytes, location, e)),
    }
}

/// Why a compressed document could not be decoded, read again as a whole to say it: the gzip
/// stream is cut short, the document is of a newer format, or its JSON is not a state.
fn why(bytes: &[u8], location: &str, e: serde_json::Error) -> StateError {
    let mut buf = Vec::new();
    match json_of(bytes, location, &mut buf).and_then(|json| check_head(json, location)) {
        Err(first) => first,
        Ok(_) => corrupt(location, e.to_string()),
    }
}

/// The version of a stored document, checked as [`decode`] checks it (well-formed, not newer)
/// without building the state: what a commit needs to know before replacing it.
pub fn decode_version(bytes: &[u8], location: &str) -> Result<u64, StateError> {
    if !bytes.starts_with(&GZIP) {
        return Ok(check_head(bytes, location)?.version);
    }
    let inflated = std::io::BufReader::with_capacity(1 << 16, GzDecoder::new(bytes));
    match serde_json::from_reader::<_, Head>(inflated) {
        Ok(head) => {
            check_format(head.format, location)?;
            Ok(head.version)
        }
        Err(e) => Err(why(bytes, location, e)),
    }
}

/// The format of a stored head: the agreement's small fields in the document itself, its id
/// map, owned set and last applied snapshot in the layer objects it names
/// ([`crate::layers`]). A whole document (format [`STATE_FORMAT`], as builds before the layers
/// stored it) is read as well, and replaced by a head at its next commit; a build that knows only
/// whole documents refuses a head as newer, never overwrites it.
///
/// Format 3 heads may name bases that hold the last applied snapshot in the compact form
/// (`crate::compact`: members as positions); a build that reads format 2 only refuses them as
/// newer. Format 2 heads, and the bases they name, are read as they are.
pub const HEAD_FORMAT: u32 = 3;

/// What the document under `<agreement>.state` is.
#[derive(Debug)]
pub(crate) enum Stored {
    /// A whole document (format 1): everything in it.
    Whole(AgreementState),
    /// A head: the state's small fields, and the layers that hold the rest.
    Head {
        /// The state, its id map, owned set and last applied snapshot left empty.
        state: AgreementState,
        /// The layers, the base first.
        layers: Vec<crate::layers::LayerRef>,
    },
}

#[derive(serde::Serialize)]
struct HeadOut<'a> {
    format: u32,
    agreement: &'a str,
    version: u64,
    layers: &'a [crate::layers::LayerRef],
    state: &'a AgreementState,
}

#[derive(Deserialize)]
struct HeadIn {
    version: u64,
    layers: Vec<crate::layers::LayerRef>,
    state: AgreementState,
}

#[derive(Deserialize)]
struct HeadLayers {
    format: u32,
    version: Option<u64>,
    #[serde(default)]
    layers: Option<Vec<crate::layers::LayerRef>>,
}

/// The stored head of `state` at `version`: every field but the id map, the owned set and the
/// last applied snapshot, which `layers` hold.
pub(crate) fn encode_head(
    state: &AgreementState,
    version: u64,
    layers: &[crate::layers::LayerRef],
    location: &str,
) -> Result<Vec<u8>, StateError> {
    // Every field named, none by `..`: a field added to the state is a compile error here until
    // it is decided whether it belongs in the head (small, rewritten at every commit) or a layer.
    let AgreementState {
        format: _,
        agreement,
        version: _,
        status,
        links: _,
        owned: _,
        last_applied: _,
        cursors,
        journal,
        failing,
        halted,
        trust,
        target_cursor,
        cursors_at,
        settled,
    } = state;
    let small = AgreementState {
        format: STATE_FORMAT,
        agreement: agreement.clone(),
        version,
        status: *status,
        links: Default::default(),
        owned: Default::default(),
        last_applied: None,
        cursors: cursors.clone(),
        journal: journal.clone(),
        failing: failing.clone(),
        halted: halted.clone(),
        trust: trust.clone(),
        target_cursor: target_cursor.clone(),
        cursors_at: *cursors_at,
        settled: settled.clone(),
    };
    to_gzip(
        &HeadOut {
            format: HEAD_FORMAT,
            agreement,
            version,
            layers,
            state: &small,
        },
        location,
    )
}

/// Reads the document under `<agreement>.state`: a head or a whole document.
pub(crate) fn decode_stored(bytes: &[u8], location: &str) -> Result<Stored, StateError> {
    let head = decode_head(bytes, location)?;
    if head.1.is_none() {
        return decode(bytes, location).map(Stored::Whole);
    }
    let h: HeadIn = from_gzip(bytes, location)?;
    if h.state.version != h.version {
        return Err(corrupt(
            location,
            format!(
                "the head says version {} and its state version {}",
                h.version, h.state.version
            ),
        ));
    }
    Ok(Stored::Head {
        state: h.state,
        layers: h.layers,
    })
}

/// The version of the document under `<agreement>.state` and, for a head, its layers (`None`
/// for a whole document), without building the rest: what a commit needs before replacing it.
pub(crate) fn decode_head(
    bytes: &[u8],
    location: &str,
) -> Result<(u64, Option<Vec<crate::layers::LayerRef>>), StateError> {
    let h: HeadLayers = from_gzip(bytes, location).map_err(|e| match e {
        // Say what a document of a newer format is before how it failed to read.
        StateError::Corrupt { .. } => match decode_version(bytes, location) {
            Err(newer @ StateError::NewerFormat { .. }) => newer,
            _ => e,
        },
        e => e,
    })?;
    check_format(h.format, location)?;
    match (h.format > STATE_FORMAT, h.layers) {
        (true, _) if h.version.is_none() => {
            Err(corrupt(location, "a head without a version".into()))
        }
        (true, Some(layers)) if !layers.is_empty() => Ok((h.version.unwrap_or(0), Some(layers))),
        (true, _) => Err(corrupt(location, "a head that names no layers".into())),
        (false, Some(_)) => Err(corrupt(
            location,
            format!("a document of format {} that names layers", h.format),
        )),
        (false, None) => Ok((h.version.unwrap_or(0), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_compressed_and_reads_plain_json() {
        let mut st = AgreementState::new("a");
        st.cursors.insert("graph.users".into(), "token".repeat(100));
        let bytes = encode(&st, "a").unwrap();
        assert!(bytes.starts_with(&GZIP));
        assert!(bytes.len() < serde_json::to_vec(&st).unwrap().len());
        assert_eq!(decode(&bytes, "a").unwrap(), st);
        assert_ne!(
            encode(&st, "a").unwrap(),
            bytes,
            "each commit's bytes are its own"
        );
        assert_eq!(decode(&serde_json::to_vec(&st).unwrap(), "a").unwrap(), st);
    }

    #[test]
    fn truncated_garbage_and_newer_documents_are_refused() {
        let bytes = encode(&AgreementState::new("a"), "a").unwrap();
        let e = decode(&bytes[..bytes.len() / 2], "a").unwrap_err();
        assert!(e.to_string().contains("gzip"), "{e}");
        let e = decode(b"\x00\x01binary", "a").unwrap_err();
        assert!(e.to_string().contains("corrupted"), "{e}");
        let e = decode(br#"{"format": 99}"#, "a").unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
    }

    fn gzip(json: &[u8]) -> Vec<u8> {
        let mut gz = GzBuilder::new().write(Vec::new(), Compression::new(3));
        gz.write_all(json).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn compressed_documents_decoded_as_they_inflate_say_what_is_wrong() {
        // A newer format whose fields this build does not know, and one that decodes anyway.
        for newer in [
            br#"{"format": 99, "links": "a layout to come"}"#.as_slice(),
            br#"{"format": 99, "agreement": "a"}"#.as_slice(),
        ] {
            let e = decode(&gzip(newer), "a").unwrap_err();
            assert!(
                matches!(e, StateError::NewerFormat { found: 99, .. }),
                "{e}"
            );
            let e = decode_version(&gzip(newer), "a").unwrap_err();
            assert!(
                matches!(e, StateError::NewerFormat { found: 99, .. }),
                "{e}"
            );
        }
        // Well-formed JSON that is not a state, and JSON cut short inside a complete stream.
        let e = decode(&gzip(br#"{"format": 1, "links": 5}"#), "a").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        let e = decode(&gzip(br#"{"format": 1, "agreement": "#), "a").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        let e = decode_version(&gzip(br#"{"format": 1, "version": 4"#), "a").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        // Trailing bytes after the document are refused, as from a slice.
        let mut st = AgreementState::new("a");
        st.version = 7;
        let mut json = serde_json::to_vec(&st).unwrap();
        assert_eq!(decode_version(&gzip(&json), "a").unwrap(), 7);
        json.extend_from_slice(b" {}");
        assert!(decode(&gzip(&json), "a").is_err());
    }
}
