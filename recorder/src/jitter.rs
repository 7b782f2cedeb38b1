//! Puts one stream's RTP packets back in order, waits a bounded time for a
//! missing one (a NACK retransmission may still bring it), then declares it
//! lost so the stream moves on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A packet released in order, or the news that one is missing.
#[derive(Debug, PartialEq)]
pub enum Out<T> {
    Packet { seq: u64, item: T },
    Lost { seq: u64 },
}

pub struct JitterBuffer<T> {
    /// Extended (64-bit, unwrapped) sequence number → (arrival, item).
    held: BTreeMap<u64, (Instant, T)>,
    /// Next sequence number to release.
    next: Option<u64>,
    /// Highest extended sequence number seen, to unwrap the next one.
    highest: Option<u64>,
    wait: Duration,
    max_held: usize,
}

impl<T> JitterBuffer<T> {
    /// `wait`: how long a gap may hold back later packets.
    pub fn new(wait: Duration) -> Self {
        JitterBuffer {
            held: BTreeMap::new(),
            next: None,
            highest: None,
            wait,
            max_held: 2048,
        }
    }

    /// Turns a 16-bit sequence number into a 64-bit one, choosing the
    /// wrap-around nearest to what came before.
    fn extend(&mut self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            // Start high so early reordering cannot go below zero.
            let e = (1u64 << 32) + seq as u64;
            self.highest = Some(e);
            return e;
        };
        let base = h & !0xffff;
        let candidates = [base.wrapping_sub(1 << 16), base, base + (1 << 16)];
        let e = candidates
            .into_iter()
            .map(|b| b + seq as u64)
            .min_by_key(|e| e.abs_diff(h))
            .expect("three candidates");
        if e > h {
            self.highest = Some(e);
        }
        e
    }

    /// Adds a packet. Duplicates and packets older than what was already
    /// released are dropped.
    pub fn push(&mut self, seq: u16, at: Instant, item: T) {
        let e = self.extend(seq);
        match self.next {
            None => self.next = Some(e),
            Some(n) if e < n => return,
            Some(_) => {}
        }
        self.held.entry(e).or_insert((at, item));
    }

    /// Releases what is ready at `now`: packets in order, and `Lost` for a
    /// gap that has held a later packet back longer than the wait.
    pub fn pop(&mut self, now: Instant) -> Option<Out<T>> {
        let next = self.next?;
        let (&first, &(arrived, _)) = self.held.iter().next()?;
        if first == next {
            let (_, item) = self.held.remove(&first).expect("present");
            self.next = Some(next + 1);
            return Some(Out::Packet { seq: first, item });
        }
        if first < next {
            self.held.remove(&first);
            return self.pop(now);
        }
        // A gap before `first`: wait for it, but not forever.
        if now.duration_since(arrived) >= self.wait || self.held.len() >= self.max_held {
            self.next = Some(next + 1);
            return Some(Out::Lost { seq: next });
        }
        None
    }

    /// Releases everything regardless of gaps (end of stream).
    pub fn drain(&mut self) -> Vec<Out<T>> {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut out = Vec::new();
        while let Some(o) = self.pop(far) {
            out.push(o);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(out: Vec<Out<u16>>) -> Vec<String> {
        out.into_iter()
            .map(|o| match o {
                Out::Packet { item, .. } => item.to_string(),
                Out::Lost { .. } => "lost".into(),
            })
            .collect()
    }

    fn pop_all(j: &mut JitterBuffer<u16>, now: Instant) -> Vec<Out<u16>> {
        let mut v = Vec::new();
        while let Some(o) = j.pop(now) {
            v.push(o);
        }
        v
    }

    #[test]
    fn reorders_and_waits_then_declares_loss() {
        let t0 = Instant::now();
        let mut j = JitterBuffer::new(Duration::from_millis(100));
        for s in [10u16, 12, 11, 14] {
            j.push(s, t0, s);
        }
        assert_eq!(seqs(pop_all(&mut j, t0)), ["10", "11", "12"]);
        // 13 is missing: 14 waits...
        assert!(j.pop(t0 + Duration::from_millis(50)).is_none());
        // ...a retransmission of 13 arrives in time.
        j.push(13, t0 + Duration::from_millis(60), 13);
        assert_eq!(
            seqs(pop_all(&mut j, t0 + Duration::from_millis(60))),
            ["13", "14"]
        );
        // 15 never comes.
        j.push(16, t0, 16);
        assert_eq!(
            seqs(pop_all(&mut j, t0 + Duration::from_millis(200))),
            ["lost", "16"]
        );
        // Late and duplicate packets are dropped.
        j.push(15, t0, 15);
        j.push(16, t0, 16);
        assert!(pop_all(&mut j, t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn sequence_numbers_wrap() {
        let t0 = Instant::now();
        let mut j = JitterBuffer::new(Duration::from_millis(100));
        for s in [65534u16, 0, 65535, 1] {
            j.push(s, t0, s);
        }
        let out = pop_all(&mut j, t0);
        assert_eq!(seqs(out), ["65534", "65535", "0", "1"]);
    }
}
