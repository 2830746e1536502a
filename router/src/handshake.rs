//! The budget of connections that have not authenticated yet (`listen.max_handshakes`).
//!
//! Kept apart from `listen.max_clients`, so sockets that never finish their startup cannot lock
//! authenticated clients out. When the budget is full, a new connection displaces the one that
//! has been starting up longest (it is told so and closed): a real client authenticates in
//! milliseconds, so a flood of silent sockets only ever displaces itself, while refusing the
//! newcomer instead would lock real clients out until the silent ones time out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

pub struct Handshakes {
    max: usize,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    next_id: u64,
    /// Oldest first: (ticket id, what tells that connection it was displaced).
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// One connection's place in the budget; it leaves the budget when dropped.
pub struct Ticket {
    id: u64,
    owner: Arc<Handshakes>,
    /// Resolves when a newer connection displaced this one.
    pub displaced: oneshot::Receiver<()>,
}

impl Handshakes {
    pub fn new(max: u32) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            max: (max as usize).max(1),
            queue: Mutex::new(Queue::default()),
        })
    }

    /// A place for a new connection; `true` when an older one had to make room.
    pub fn admit(self: &Arc<Self>) -> (Ticket, bool) {
        let (tx, rx) = oneshot::channel();
        let mut q = crate::locks::lock(&self.queue);
        let mut displaced = false;
        while q.waiting.len() >= self.max {
            if let Some((_, oldest)) = q.waiting.pop_front() {
                let _ = oldest.send(());
                displaced = true;
            }
        }
        let id = q.next_id;
        q.next_id += 1;
        q.waiting.push_back((id, tx));
        let ticket = Ticket {
            id,
            owner: self.clone(),
            displaced: rx,
        };
        (ticket, displaced)
    }

    /// Connections starting up now.
    pub fn len(&self) -> usize {
        crate::locks::lock(&self.queue).waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut q = crate::locks::lock(&self.owner.queue);
        q.waiting.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_makes_room_and_finished_ones_leave() {
        let h = Handshakes::new(2);
        let (mut a, d) = h.admit();
        assert!(!d);
        let (b, _) = h.admit();
        let (mut c, d) = h.admit();
        assert!(d, "a third connection displaced the oldest");
        assert!(a.displaced.try_recv().is_ok());
        assert_eq!(h.len(), 2);
        drop(b);
        assert_eq!(h.len(), 1);
        let (_d, displaced) = h.admit();
        assert!(!displaced, "room was left by b");
        assert!(c.displaced.try_recv().is_err());
        drop(a); // already gone from the queue: nothing else removed
        assert_eq!(h.len(), 2);
    }
}
