//! The kept generations, oldest first, as the store's snapshot holds them.
//!
//! Owns one cost: the writer copies the snapshot for every batch (readers keep the old
//! one), so copying the history must not cost a pointer per kept generation — with
//! `--history 10000` that was most of a commit's CPU (a reference count touched per
//! generation on the copy, and again when the old snapshot was dropped). The
//! generations are kept in shared chunks of up to [`CHUNK`]: a copy shares every chunk,
//! `push` copies only the newest chunk and a trim only the oldest (at most [`CHUNK`]
//! pointers each), so a commit costs the same with 10 or 10,000 generations kept. Must not decide what is kept: the writer
//! trims, `files` reads and writes.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeSeq, Serializer};

use super::Generation;

/// Generations per shared chunk.
const CHUNK: usize = 32;

/// The kept generations, oldest first. Cheap to clone (see the module comment).
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Never an empty chunk; only the oldest and the newest may be partly filled. A
    /// generation no longer kept is no longer held (settings may be MiBs each).
    chunks: VecDeque<Arc<Vec<Arc<Generation>>>>,
    len: usize,
}

impl History {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The newest generation.
    pub fn last(&self) -> Option<&Arc<Generation>> {
        self.chunks.back().and_then(|c| c.last())
    }

    /// The oldest generation kept.
    pub fn first(&self) -> Option<&Arc<Generation>> {
        self.chunks.front().and_then(|c| c.first())
    }

    /// Oldest first; `.rev()` for newest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Arc<Generation>> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// Adds the newest generation.
    pub fn push(&mut self, generation: Arc<Generation>) {
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < CHUNK => Arc::make_mut(chunk).push(generation),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(generation);
                self.chunks.push_back(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Drops the `n` oldest generations (all of them if there are fewer). Copies at
    /// most the oldest chunk's pointers.
    pub fn drop_oldest(&mut self, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                Arc::make_mut(front).drain(..n);
                n = 0;
            }
        }
    }
}

impl FromIterator<Arc<Generation>> for History {
    fn from_iter<I: IntoIterator<Item = Arc<Generation>>>(iter: I) -> Self {
        let mut history = History::default();
        history.extend(iter);
        history
    }
}

impl Extend<Arc<Generation>> for History {
    fn extend<I: IntoIterator<Item = Arc<Generation>>>(&mut self, iter: I) {
        for generation in iter {
            self.push(generation);
        }
    }
}

impl From<Vec<Arc<Generation>>> for History {
    fn from(generations: Vec<Arc<Generation>>) -> Self {
        generations.into_iter().collect()
    }
}

impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

/// As a list, oldest first: the form the slots have always held.
impl Serialize for History {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len))?;
        for generation in self.iter() {
            seq.serialize_element(generation)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Caller;

    fn generation(n: u64) -> Arc<Generation> {
        Arc::new(Generation {
            generation: n,
            time: String::new(),
            tx: format!("tx{n}"),
            tx_id: None,
            caller: Caller::default(),
            changed_keys: Vec::new(),
            rollback_of: None,
            settings: Arc::new(serde_json::Value::Null),
        })
    }

    fn numbers(history: &History) -> Vec<u64> {
        history.iter().map(|g| g.generation).collect()
    }

    #[test]
    fn it_reads_like_the_list_it_replaces_through_pushes_and_trims() {
        let mut history = History::default();
        let mut model: VecDeque<u64> = VecDeque::new();
        let mut copies = Vec::new();
        for n in 0..1000u64 {
            history.push(generation(n));
            model.push_back(n);
            // Trims of every size, across chunk boundaries.
            let keep = 1 + (n as usize * 7) % 300;
            if model.len() > keep {
                let excess = model.len() - keep;
                history.drop_oldest(excess);
                model.drain(..excess);
            }
            assert_eq!(numbers(&history), Vec::from(model.clone()), "after {n}");
            assert_eq!(history.len(), model.len());
            assert_eq!(
                history.first().map(|g| g.generation),
                model.front().copied()
            );
            assert_eq!(history.last().map(|g| g.generation), model.back().copied());
            let newest_first: Vec<u64> = history.iter().rev().map(|g| g.generation).collect();
            assert!(newest_first.iter().eq(model.iter().rev()));
            if n % 97 == 0 {
                copies.push((history.clone(), model.clone()));
            }
        }
        // A copy is not changed by what happens to the history after it.
        for (copy, model) in copies {
            assert_eq!(numbers(&copy), Vec::from(model));
        }
        history.drop_oldest(usize::MAX);
        assert!(history.is_empty() && history.first().is_none() && history.last().is_none());
    }

    #[test]
    fn it_serializes_as_a_list_and_compares_by_content() {
        let history: History = (1..=70).map(generation).collect();
        let list: Vec<Arc<Generation>> = (1..=70).map(generation).collect();
        assert_eq!(
            serde_json::to_value(&history).expect("json"),
            serde_json::to_value(&list).expect("json")
        );
        let mut trimmed = history.clone();
        trimmed.drop_oldest(5);
        let rebuilt: History = (6..=70).map(generation).collect();
        assert_eq!(trimmed, rebuilt);
        assert_ne!(trimmed, history);
    }
}
