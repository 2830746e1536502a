//! The shared rings: slow queries, N+1 bursts and plan samples. Fixed-size arrays of records in
//! shared memory, each behind its own LWLock; record `id` lives in slot `id % cap`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{N1Record, SlowRecord, StatsKey, N1_EVENTS, PLAN_SAMPLES};
use super::locks::{lock, LOCK_N1, LOCK_SAMPLES, LOCK_SLOW};
use super::{ready, HEADER, N1, SAMPLES, SLOW};

/// A record kept in one of the shared rings; id 0 marks an empty slot.
pub trait Record {
    fn id(&self) -> u64;
    fn set_id(&mut self, id: u64);
}

impl Record for SlowRecord {
    fn id(&self) -> u64 {
        self.id
    }
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl Record for N1Record {
    fn id(&self) -> u64 {
        self.id
    }
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

/// One shared ring: its slots, their number, its id counter and the lock that guards it.
/// Record `id` lives in slot `id % cap`; ids only grow, so a slot's id tells whether it still
/// holds a given record.
struct Ring<T: 'static> {
    slots: *mut T,
    cap: usize,
    next_id: &'static AtomicU64,
    lock: usize,
}

fn slow_ring() -> Option<Ring<SlowRecord>> {
    // SAFETY: pointers set at startup; the header lives for the whole server life.
    ready().then(|| unsafe {
        Ring {
            slots: SLOW,
            cap: (*HEADER).slow_cap,
            next_id: &(*HEADER).slow_next_id,
            lock: LOCK_SLOW,
        }
    })
}

fn n1_ring() -> Option<Ring<N1Record>> {
    // SAFETY: as for `slow_ring`.
    ready().then(|| unsafe {
        Ring {
            slots: N1,
            cap: N1_EVENTS,
            next_id: &(*HEADER).n1_next_id,
            lock: LOCK_N1,
        }
    })
}

fn sample_ring() -> Option<Ring<SlowRecord>> {
    // SAFETY: as for `slow_ring`.
    ready().then(|| unsafe {
        Ring {
            slots: SAMPLES,
            cap: PLAN_SAMPLES,
            next_id: &(*HEADER).sample_next_id,
            lock: LOCK_SAMPLES,
        }
    })
}

impl<T: Record> Ring<T> {
    /// Writes a new record over the oldest slot; returns its id.
    fn push(&self, fill: impl FnOnce(&mut T)) -> u64 {
        let _l = lock(self.lock, true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        // SAFETY: exclusive ring lock held; the index is below the ring's capacity.
        let slot = unsafe { &mut *self.slots.add((id as usize) % self.cap) };
        fill(slot);
        slot.set_id(id);
        id
    }

    /// Changes record `id` if the ring still holds it.
    fn update(&self, id: u64, f: impl FnOnce(&mut T)) {
        let _l = lock(self.lock, true);
        // SAFETY: exclusive ring lock held.
        let slot = unsafe { &mut *self.slots.add((id as usize) % self.cap) };
        if slot.id() == id {
            f(slot);
        }
    }

    /// Every record, newest first.
    fn each(&self, mut f: impl FnMut(&T)) {
        let _l = lock(self.lock, false);
        // SAFETY: shared ring lock held; slots are only written under the exclusive lock.
        unsafe {
            let mut ids: Vec<(u64, usize)> = (0..self.cap)
                .filter_map(|i| {
                    let id = (*self.slots.add(i)).id();
                    (id != 0).then_some((id, i))
                })
                .collect();
            ids.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
            for (_, i) in ids {
                f(&*self.slots.add(i));
            }
        }
    }

    /// Empties the ring; returns how many records it held.
    fn reset(&self) -> usize {
        let _l = lock(self.lock, true);
        let mut n = 0;
        for i in 0..self.cap {
            // SAFETY: exclusive ring lock held.
            let r = unsafe { &mut *self.slots.add(i) };
            if r.id() != 0 {
                n += 1;
                r.set_id(0);
            }
        }
        n
    }
}

/// Keeps a slow execution (overwriting the oldest); `fill` sets its fields.
pub fn push_slow(fill: impl FnOnce(&mut SlowRecord)) {
    if let Some(r) = slow_ring() {
        r.push(fill);
    }
}

/// Every slow-query record, newest first.
pub fn each_slow(f: impl FnMut(&SlowRecord)) {
    if let Some(r) = slow_ring() {
        r.each(f);
    }
}

/// Slow queries captured since start (including those the ring no longer holds).
pub fn slow_total() -> u64 {
    slow_ring().map_or(0, |r| r.next_id.load(Ordering::Relaxed))
}

pub fn reset_slow() -> usize {
    slow_ring().map_or(0, |r| r.reset())
}

/// Keeps a sampled plan: over the slot of the same statement if the ring holds one (a hot statement
/// must not push every other one out), else over the oldest.
pub fn push_sample(key: &StatsKey, fill: impl FnOnce(&mut SlowRecord)) {
    let Some(ring) = sample_ring() else { return };
    let _l = lock(ring.lock, true);
    // SAFETY: exclusive ring lock held; indexes below the capacity.
    unsafe {
        let same = (0..ring.cap).find(|&i| {
            let r = &*ring.slots.add(i);
            r.id != 0 && r.queryid == key.queryid && r.userid == key.userid && r.dbid == key.dbid
        });
        let id = ring.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = &mut *ring.slots.add(same.unwrap_or((id as usize) % ring.cap));
        fill(slot);
        slot.id = id;
    }
}

/// Every sampled plan, newest first.
pub fn each_sample(f: impl FnMut(&SlowRecord)) {
    if let Some(r) = sample_ring() {
        r.each(f);
    }
}

/// Keeps an N+1 event; returns its id (to update its count later).
pub fn push_n1(fill: impl FnOnce(&mut N1Record)) -> u64 {
    n1_ring().map_or(0, |r| r.push(fill))
}

/// Updates event `id` if the ring still holds it.
pub fn update_n1(id: u64, f: impl FnOnce(&mut N1Record)) {
    if let Some(r) = n1_ring().filter(|_| id != 0) {
        r.update(id, f);
    }
}

/// Every N+1 event, newest first.
pub fn each_n1(f: impl FnMut(&N1Record)) {
    if let Some(r) = n1_ring() {
        r.each(f);
    }
}

pub fn n1_total() -> u64 {
    n1_ring().map_or(0, |r| r.next_id.load(Ordering::Relaxed))
}

pub fn reset_n1() {
    if let Some(r) = n1_ring() {
        r.reset();
    }
}
