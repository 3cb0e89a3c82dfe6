//! The kept generations, oldest first, as the store's snapshot holds them, and the
//! window of recent commits beside them: both are [`Chunked`] lists.
//!
//! Owns one cost: the writer copies the snapshot for every batch (readers keep the old
//! one), so copying these lists must not cost a pointer per item. With `--history
//! 10000` that was most of a commit's CPU (a reference count touched per generation on
//! the copy, and again when the old snapshot was dropped), and later, with the items in
//! shared chunks, still a reference count per chunk. A [`Chunked`] list is three shared
//! parts: the oldest chunk (`head`), the full chunks between (`middle`, itself shared),
//! and the newest chunk (`tail`), each of up to [`CHUNK`] items. A copy touches three
//! counts; `push` copies only the tail and a trim only the head (at most [`CHUNK`] items
//! each); the middle is copied (a pointer per chunk) only when a chunk enters or leaves
//! it, once per [`CHUNK`] pushes or trims. So a commit costs the same with 10 or 10,000
//! generations kept. Must not decide what is kept: the writer trims, `files` reads and
//! writes.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeSeq, Serializer};

use super::Generation;

/// Items per chunk.
const CHUNK: usize = 32;

/// The kept generations, oldest first.
pub type History = Chunked<Arc<Generation>>;

/// A list, oldest first, that is cheap to copy whatever its length and is pushed at the
/// end and trimmed at the front (see the module header).
#[derive(Debug, Clone)]
pub struct Chunked<T> {
    /// The oldest items; empty only if the whole list is.
    head: Arc<Vec<T>>,
    /// Full chunks after `head`, oldest first.
    middle: Arc<VecDeque<Arc<Vec<T>>>>,
    /// The newest items, after `middle`; may be empty.
    tail: Arc<Vec<T>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            head: Arc::default(),
            middle: Arc::default(),
            tail: Arc::default(),
            len: 0,
        }
    }
}

impl<T: Clone> Chunked<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn last(&self) -> Option<&T> {
        self.tail
            .last()
            .or_else(|| self.middle.back().and_then(|c| c.last()))
            .or_else(|| self.head.last())
    }

    pub fn first(&self) -> Option<&T> {
        self.head.first()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + '_ {
        self.head
            .iter()
            .chain(self.middle.iter().flat_map(|c| c.iter()))
            .chain(self.tail.iter())
    }

    pub fn push(&mut self, item: T) {
        self.len += 1;
        if self.middle.is_empty() && self.tail.is_empty() && self.head.len() < CHUNK {
            // Nothing after the head: it is the newest chunk too.
            Arc::make_mut(&mut self.head).push(item);
            return;
        }
        if self.tail.len() == CHUNK {
            let full = std::mem::take(&mut self.tail);
            Arc::make_mut(&mut self.middle).push_back(full);
        }
        let tail = Arc::make_mut(&mut self.tail);
        if tail.capacity() == 0 {
            tail.reserve_exact(CHUNK);
        }
        tail.push(item);
    }

    /// Removes the `n` oldest items (all of them if there are fewer).
    pub fn drop_oldest(&mut self, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let here = n.min(self.head.len());
            if here == self.head.len() {
                self.head = Arc::default();
            } else {
                Arc::make_mut(&mut self.head).drain(..here);
            }
            n -= here;
            if self.head.is_empty() {
                self.refill_head();
            }
        }
    }

    /// Moves the next chunk into the emptied head: the oldest of the middle, or the tail.
    fn refill_head(&mut self) {
        if !self.middle.is_empty() {
            if let Some(next) = Arc::make_mut(&mut self.middle).pop_front() {
                self.head = next;
            }
        } else {
            self.head = std::mem::take(&mut self.tail);
        }
    }
}

impl<T: Clone> FromIterator<T> for Chunked<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut list = Chunked::default();
        list.extend(iter);
        list
    }
}

impl<T: Clone> Extend<T> for Chunked<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for item in iter {
            self.push(item);
        }
    }
}

impl<T: Clone> From<Vec<T>> for Chunked<T> {
    fn from(items: Vec<T>) -> Self {
        items.into_iter().collect()
    }
}

impl<T: Clone + PartialEq> PartialEq for Chunked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

/// As a list, like the `Vec` or `VecDeque` it replaces.
impl<T: Clone + Serialize> Serialize for Chunked<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len))?;
        for item in self.iter() {
            seq.serialize_element(item)?;
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
    fn a_copy_shares_its_parts_and_a_push_or_trim_copies_one_chunk_at_most() {
        let mut list: Chunked<(u64, u64)> = (0..1000).map(|n| (n, n)).collect();
        let copy = list.clone();
        assert!(Arc::ptr_eq(&list.middle, &copy.middle));
        assert_eq!(
            (list.head.len(), list.middle.len(), list.tail.len()),
            (32, 30, 8)
        );
        list.push((1000, 1000));
        list.drop_oldest(1);
        // Neither the push (into the tail) nor the trim (of the head) copied the middle.
        assert!(Arc::ptr_eq(&list.middle, &copy.middle));
        assert!(!Arc::ptr_eq(&list.head, &copy.head) && !Arc::ptr_eq(&list.tail, &copy.tail));
        assert!(list.iter().copied().eq((1..=1000).map(|n| (n, n))));
        assert!(copy.iter().copied().eq((0..1000).map(|n| (n, n))));
        // A chunk enters and leaves the middle once per `CHUNK` pushes and trims.
        list.extend((1001..1024).map(|n| (n, n)));
        assert_eq!(list.tail.len(), CHUNK);
        list.push((1024, 1024));
        assert_eq!((list.middle.len(), list.tail.len()), (31, 1));
        list.drop_oldest(31);
        assert_eq!((list.head.len(), list.middle.len()), (CHUNK, 30));
        assert_eq!(list.first(), Some(&(32, 32)));
        assert_eq!(list.last(), Some(&(1024, 1024)));
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
