//! What the state tests share: a web identity token source on the Graph emulator.
#![allow(dead_code, clippy::panic)]

use idsync_model::Secret;
use idsync_state::sts::WebIdentityToken;

/// A managed identity's token from the Graph emulator's instance metadata endpoint, fetched for
/// every exchange (the CLI's source is idsync's Entra ID sign-in, which also caches).
#[derive(Debug)]
pub struct Imds {
    /// The Graph emulator's base URL (or an address where nothing answers).
    pub base: String,
    /// The resource the token is for.
    pub audience: String,
}

#[async_trait::async_trait]
impl WebIdentityToken for Imds {
    async fn token(&self) -> Result<Secret, String> {
        let url = format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}",
            self.base, self.audience
        );
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::Client::new()
            .get(url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|e| format!("the managed identity endpoint: {}", e.without_url()))?;
        let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
        v["access_token"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| "no access_token in the answer".to_owned())
    }
    fn describe(&self) -> String {
        format!("managed identity, audience {}", self.audience)
    }
}

/// The conformance suite on `store`, then again 2.5 s later, when credentials that live 302 s
/// (refreshed five minutes before they expire) are due: `exchanges` (the token exchanges the
/// emulator counted) must have grown, and the second run pass.
pub async fn across_a_refresh<B: idsync_state::blob::Blobs>(
    store: &idsync_state::BlobStore<B>,
    name: &str,
    exchanges: impl Fn() -> u64,
) {
    idsync_state::testing::run(store, &format!("{name}-1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let before = exchanges();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    idsync_state::testing::run(store, &format!("{name}-2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let after = exchanges();
    assert!(
        after > before,
        "refreshed mid-run: {before} then {after} exchanges"
    );
}
