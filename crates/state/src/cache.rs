//! What the credential providers share: a cached credential fetched again five minutes before it
//! expires (one fetch at a time), and form encoding.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// A credential and when it expires.
pub(crate) struct Cached<T> {
    slot: tokio::sync::Mutex<Option<(Arc<T>, Instant)>>,
}

impl<T> std::fmt::Debug for Cached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cached(..)")
    }
}

impl<T> Cached<T> {
    pub(crate) fn new() -> Self {
        Cached {
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// The cached credential while it has more than five minutes left, else a fresh one from
    /// `fetch` (its lifetime capped at a day).
    pub(crate) async fn get<F, Fut>(&self, fetch: F) -> Result<Arc<T>, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(T, Duration), String>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some((c, exp)) = slot.as_ref()
            && *exp > Instant::now() + Duration::from_secs(300)
        {
            return Ok(c.clone());
        }
        let (c, ttl) = fetch().await?;
        let c = Arc::new(c);
        *slot = Some((
            c.clone(),
            Instant::now() + ttl.min(Duration::from_secs(86_400)),
        ));
        Ok(c)
    }
}

/// `k=v&k=v`, every value percent-encoded but for RFC 3986's unreserved characters.
pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}
