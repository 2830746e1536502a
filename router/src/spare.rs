//! Buffers a session reuses from one batch to the next: a relayed statement allocates no message,
//! batch or outgoing buffer once the session has warmed up. Only small buffers are kept, and only
//! a few, so an idle session holds a few KiB at most.

/// A client batch: its messages (tag, whole message) up to a Sync, Query or Flush.
pub(crate) type Batch = Vec<(u8, Vec<u8>)>;

/// Message buffers kept at most (a batch of the extended protocol is four or five messages).
const KEEP_MESSAGES: usize = 8;
/// A buffer larger than this is freed rather than kept.
const KEEP_BYTES: usize = 8 * 1024;

#[derive(Debug, Default)]
pub(crate) struct Spare {
    messages: Vec<Vec<u8>>,
    batch: Batch,
    out: Vec<u8>,
}

impl Spare {
    /// A message buffer holding a copy of `bytes`.
    pub(crate) fn message(&mut self, bytes: &[u8]) -> Vec<u8> {
        match self.messages.pop() {
            Some(mut m) => {
                m.clear();
                m.extend_from_slice(bytes);
                m
            }
            None => bytes.to_vec(),
        }
    }

    /// An empty batch.
    pub(crate) fn batch(&mut self) -> Batch {
        std::mem::take(&mut self.batch)
    }

    /// Takes back a batch that is done with: its small messages and its vector.
    pub(crate) fn recycle(&mut self, mut batch: Batch) {
        for (_, m) in batch.drain(..) {
            if self.messages.len() < KEEP_MESSAGES && m.capacity() <= KEEP_BYTES {
                self.messages.push(m);
            }
        }
        if batch.capacity() <= KEEP_MESSAGES && self.batch.capacity() == 0 {
            self.batch = batch;
        }
    }

    /// An empty outgoing buffer with room for `len` bytes.
    pub(crate) fn out(&mut self, len: usize) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.reserve(len);
        out
    }

    /// Takes back an outgoing buffer that has been sent.
    pub(crate) fn put_out(&mut self, out: Vec<u8>) {
        if out.capacity() <= KEEP_BYTES {
            self.out = out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_comes_back_empty_and_holds_only_the_new_bytes() {
        let mut spare = Spare::default();
        let mut batch = spare.batch();
        batch.push((b'Q', spare.message(b"Q-a-long-first-message")));
        batch.push((b'S', spare.message(b"S")));
        let first = batch[0].1.as_ptr();
        spare.recycle(batch);
        let batch = spare.batch();
        assert!(
            batch.is_empty() && batch.capacity() >= 2,
            "the vector is reused"
        );
        let a = spare.message(b"xy");
        let b = spare.message(b"abc");
        assert_eq!((a.as_slice(), b.as_slice()), (&b"xy"[..], &b"abc"[..]));
        assert!(
            a.as_ptr() == first || b.as_ptr() == first,
            "a message buffer is reused"
        );
        assert_eq!(
            spare.message(b"new"),
            b"new",
            "a fresh one when none is left"
        );
    }

    #[test]
    fn only_a_few_small_buffers_are_kept() {
        let mut spare = Spare::default();
        let mut batch = spare.batch();
        for _ in 0..3 * KEEP_MESSAGES {
            batch.push((b'B', vec![0; 16]));
        }
        batch.push((b'Q', vec![0; KEEP_BYTES + 1]));
        spare.recycle(batch);
        assert_eq!(spare.messages.len(), KEEP_MESSAGES);
        assert!(spare.messages.iter().all(|m| m.capacity() <= KEEP_BYTES));
        assert_eq!(
            spare.batch.capacity(),
            0,
            "a long batch's vector is not kept"
        );

        let mut out = spare.out(KEEP_BYTES * 2);
        out.extend_from_slice(b"sent");
        spare.put_out(out);
        assert_eq!(
            spare.out.capacity(),
            0,
            "a large outgoing buffer is not kept"
        );
        let mut out = spare.out(10);
        out.extend_from_slice(b"sent");
        spare.put_out(out);
        let out = spare.out(4);
        assert!(out.is_empty() && out.capacity() >= 4);
    }
}
