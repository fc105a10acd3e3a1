//! Random bytes, random gzip streams and random JSON as stored state documents: each is decoded
//! or refused with an error that names the document, never a panic; and a document that decodes
//! has a version the commit check reads the same way.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_state::codec::{decode, decode_version};
use proptest::prelude::*;
use std::io::Write;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode(bytes, "fuzz/a.state") {
        Ok(st) => {
            prop_assert_eq!(decode_version(bytes, "fuzz/a.state").ok(), Some(st.version));
        }
        Err(e) => {
            prop_assert!(e.to_string().contains("fuzz/a.state"), "{}", e);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes)?;
    }

    #[test]
    fn random_bytes_behind_a_gzip_header(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut b = vec![0x1f, 0x8b, 0x08, 0x00];
        b.extend(bytes);
        check(&b)?;
    }

    #[test]
    fn valid_gzip_of_random_text(text in "\\PC{0,200}") {
        check(&gzip(text.as_bytes()))?;
    }

    #[test]
    fn valid_gzip_of_state_like_json(
        format in 0u32..4,
        version in any::<u64>(),
        agreement in "\\PC{0,8}",
        tail in "\\PC{0,40}",
    ) {
        let doc = format!(
            r#"{{"format": {format}, "agreement": {:?}, "version": {version}, "links": {tail}}}"#,
            agreement
        );
        check(&gzip(doc.as_bytes()))?;
    }

    #[test]
    fn a_real_document_cut_anywhere(cut in 0usize..400) {
        let st = idsync_model::AgreementState::new("cut");
        let full = idsync_state::codec::encode(&st, "fuzz/a.state").unwrap();
        let at = cut.min(full.len());
        let r = decode(&full[..at], "fuzz/a.state");
        prop_assert_eq!(r.is_ok(), at == full.len(), "cut at {} of {}", at, full.len());
    }
}
