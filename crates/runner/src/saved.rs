//! Saved plans: sealed with a digest when written, checked before they are applied.

use idsync_engine::fnv::Fnv;
use idsync_model::PlanFile;
use std::hash::Hasher;

/// The digest of a plan file's content (everything but the digest itself).
fn digest(file: &PlanFile) -> String {
    let unsealed = PlanFile {
        checksum: None,
        ..file.clone()
    };
    // A plan is plain data; should it ever fail to serialise, the empty digest matches nothing.
    let bytes = serde_json::to_vec(&unsealed).unwrap_or_default();
    let mut h = Fnv::default();
    h.write(&bytes);
    format!("fnv64:{:016x}", h.finish())
}

/// Sets the plan file's digest, before it is saved.
pub fn seal(file: &mut PlanFile) {
    file.checksum = Some(digest(file));
}

/// Whether the plan file is as it was sealed.
pub fn intact(file: &PlanFile) -> bool {
    file.checksum.as_deref() == Some(digest(file).as_str())
}
