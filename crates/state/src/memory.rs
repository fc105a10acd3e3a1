//! State in memory: the same rules as every other store (versions, compare-and-swap commits,
//! leases) over a map guarded by a mutex. For tests and embedded runs; nothing survives the process.

use crate::StateError;
use crate::blob::{BlobStore, Blobs, Cond, Tag};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// State in memory.
pub type MemoryStore = BlobStore<MemoryBlobs>;

impl MemoryStore {
    /// An empty store.
    pub fn in_memory() -> Self {
        BlobStore::new(MemoryBlobs::default())
    }
}

/// A map of objects, each with a generation that every write advances.
#[derive(Debug, Default)]
pub struct MemoryBlobs {
    objects: Mutex<BTreeMap<String, (Vec<u8>, u64)>>,
    generation: std::sync::atomic::AtomicU64,
}

impl MemoryBlobs {
    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Vec<u8>, u64)>> {
        // A panic while the lock was held leaves a map that is still whole: every write below
        // replaces one entry at once.
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Blobs for MemoryBlobs {
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Tag)>, StateError> {
        Ok(self
            .objects()
            .get(key)
            .map(|(b, g)| (b.clone(), Tag(g.to_string()))))
    }

    async fn put(&self, key: &str, bytes: Vec<u8>, cond: Cond) -> Result<bool, StateError> {
        let mut objects = self.objects();
        let holds = match (&cond, objects.get(key)) {
            (Cond::Absent, None) => true,
            (Cond::Match(t), Some((_, g))) => t.0 == g.to_string(),
            _ => false,
        };
        if holds {
            let g = 1 + self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            objects.insert(key.to_owned(), (bytes, g));
        }
        Ok(holds)
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        self.objects().remove(key);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, StateError> {
        Ok(self
            .objects()
            .keys()
            .filter(|k| !k.contains('/'))
            .cloned()
            .collect())
    }

    async fn list_under(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        Ok(self
            .objects()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn location(&self, key: &str) -> String {
        format!("memory:{key}")
    }

    fn describe(&self) -> String {
        "memory (nothing is kept after this process)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_passes_the_conformance_suite() {
        let store = super::MemoryStore::in_memory();
        crate::testing::run(&store, "m").await.unwrap();
    }
}
