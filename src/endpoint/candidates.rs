//! The eligible endpoints of a snapshot as a vector whose unchanged parts are shared with the
//! snapshot before it, so that one endpoint joining, leaving or changing weight costs a few
//! microseconds at any pool size instead of a copy of the whole table.

use std::fmt;
use std::ops::Index;
use std::sync::Arc;

use super::Candidate;

/// Elements per chunk: a change copies one chunk (and the list of chunk pointers).
const CHUNK_BITS: u32 = 6;
const CHUNK: usize = 1 << CHUNK_BITS;

/// A vector stored as reference-counted chunks of [`CHUNK`] elements: cloning it copies the
/// chunk pointers only, and a change copies only the chunk it touches. Indexing is two loads.
pub(crate) struct Chunked<T> {
    chunks: Vec<Arc<[T]>>,
    len: usize,
}

impl<T> Clone for Chunked<T> {
    fn clone(&self) -> Self {
        Chunked {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    /// The vector of `items`, in order.
    pub(crate) fn from_vec(items: Vec<T>) -> Self {
        let len = items.len();
        let mut chunks = Vec::with_capacity(len.div_ceil(CHUNK));
        let mut items = items.into_iter();
        while chunks.len() * CHUNK < len {
            chunks.push(items.by_ref().take(CHUNK).collect());
        }
        Chunked { chunks, len }
    }

    /// The number of elements.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Element `i`, if `i < len()`.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.chunks
            .get(i >> CHUNK_BITS)
            .and_then(|c| c.get(i & (CHUNK - 1)))
    }

    /// The elements in order.
    pub(crate) fn iter(&self) -> Iter<'_, T> {
        Iter {
            chunks: self.chunks.iter(),
            chunk: [].iter(),
            remaining: self.len,
        }
    }
}

impl<T: Clone> Chunked<T> {
    /// Replaces chunk `c` by a copy of it changed by `f` (in place when no snapshot shares it).
    fn edit_chunk(&mut self, c: usize, f: impl FnOnce(&mut Vec<T>)) {
        let mut items = self.chunks[c].to_vec();
        f(&mut items);
        if items.is_empty() {
            self.chunks.remove(c);
        } else {
            self.chunks[c] = items.into();
        }
    }

    /// Appends `item`.
    pub(crate) fn push(&mut self, item: T) {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Arc::from([item]));
        } else {
            let last = self.chunks.len() - 1;
            self.edit_chunk(last, |c| c.push(item));
        }
        self.len += 1;
    }

    /// Replaces element `i` (`i < len()`).
    pub(crate) fn set(&mut self, i: usize, item: T) {
        let at = i & (CHUNK - 1);
        match Arc::get_mut(&mut self.chunks[i >> CHUNK_BITS]) {
            Some(chunk) => chunk[at] = item,
            None => self.edit_chunk(i >> CHUNK_BITS, |c| c[at] = item),
        }
    }

    /// Removes element `i` (`i < len()`), moving the last element into its place.
    pub(crate) fn swap_remove(&mut self, i: usize) {
        let last = self.len - 1;
        if i != last {
            let moved = self[last].clone();
            self.set(i, moved);
        }
        let c = self.chunks.len() - 1;
        self.edit_chunk(c, |c| {
            c.pop();
        });
        self.len -= 1;
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;

    #[inline]
    fn index(&self, i: usize) -> &T {
        &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl<T: fmt::Debug> fmt::Debug for Chunked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// An iterator over [`Candidates`] (or the crate's other chunked vectors), in index order.
#[derive(Clone, Debug)]
pub struct Iter<'a, T> {
    chunks: std::slice::Iter<'a, Arc<[T]>>,
    chunk: std::slice::Iter<'a, T>,
    remaining: usize,
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    #[inline]
    fn next(&mut self) -> Option<&'a T> {
        loop {
            if let Some(item) = self.chunk.next() {
                self.remaining -= 1;
                return Some(item);
            }
            self.chunk = self.chunks.next()?.iter();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<T> ExactSizeIterator for Iter<'_, T> {}

/// The eligible endpoints of a snapshot, as a strategy sees them: indexable like a slice
/// (`candidates[i]`, [`len`](Candidates::len), [`iter`](Candidates::iter)).
///
/// Snapshots share the unchanged parts of this vector with the snapshot before them: it is
/// stored in chunks of 64 candidates, and a change copies only the chunks it touches. An
/// endpoint joining takes the next index; one leaving gives its index to the last candidate
/// (so indices are dense, but the order is the order of arrival, not of ids). Cloning is cheap
/// (one reference count per 64 candidates).
#[derive(Clone, Default)]
pub struct Candidates(pub(crate) Chunked<Candidate>);

impl Candidates {
    /// The number of candidates.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no candidate.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// Candidate `i`, if `i < len()`.
    #[inline]
    pub fn get(&self, i: usize) -> Option<&Candidate> {
        self.0.get(i)
    }

    /// The first candidate, if any.
    #[inline]
    pub fn first(&self) -> Option<&Candidate> {
        self.0.get(0)
    }

    /// The candidates in index order.
    pub fn iter(&self) -> Iter<'_, Candidate> {
        self.0.iter()
    }
}

impl FromIterator<Candidate> for Candidates {
    fn from_iter<I: IntoIterator<Item = Candidate>>(iter: I) -> Self {
        Candidates(Chunked::from_vec(iter.into_iter().collect()))
    }
}

impl Index<usize> for Candidates {
    type Output = Candidate;

    #[inline]
    fn index(&self, i: usize) -> &Candidate {
        &self.0[i]
    }
}

impl<'a> IntoIterator for &'a Candidates {
    type Item = &'a Candidate;
    type IntoIter = Iter<'a, Candidate>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for Candidates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_match_a_plain_vector() {
        let mut plain: Vec<u32> = (0..200).collect();
        let mut chunked = Chunked::from_vec(plain.clone());
        let before = chunked.clone();
        for step in 0..600usize {
            let x = 1000 + step as u32;
            match step % 5 {
                0 | 1 => {
                    plain.push(x);
                    chunked.push(x);
                }
                2 => {
                    let i = (step * 7) % plain.len();
                    plain[i] = x;
                    chunked.set(i, x);
                }
                _ => {
                    let i = (step * 13) % plain.len();
                    plain.swap_remove(i);
                    chunked.swap_remove(i);
                }
            }
            assert_eq!(chunked.len(), plain.len());
            assert!(chunked.iter().copied().eq(plain.iter().copied()));
            assert_eq!(chunked.iter().len(), plain.len());
            for (i, v) in plain.iter().enumerate() {
                assert_eq!(chunked[i], *v);
            }
        }
        // The clone taken at the start did not change.
        assert!(before.iter().copied().eq(0..200));
        while !plain.is_empty() {
            plain.swap_remove(0);
            chunked.swap_remove(0);
            assert!(chunked.iter().copied().eq(plain.iter().copied()));
        }
        assert!(chunked.get(0).is_none());
    }
}
