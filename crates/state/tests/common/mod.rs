//! What the state tests share: a web identity token source on the Graph emulator.
#![allow(dead_code)]

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
