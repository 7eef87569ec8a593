//! Round-robin balancing state, pure: connections the primary accepted,
//! waiting for a worker or handed to one that has not taken them yet, and the
//! [`Picker`] that chooses a worker for each.
//!
//! The supervisor owns one [`RoundRobin`] and does the I/O around it. The
//! primary keeps its own descriptor of each handed connection until the
//! worker says `Taken`, so a connection handed to a worker that dies first
//! goes to another worker ([`RoundRobin::reclaim`]) instead of hanging, as it
//! does under Node's SCHED_RR.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::socket::Picker;

/// The most connections handed to one worker and not yet taken by it.
pub(crate) const MAX_IN_FLIGHT: usize = 32;

/// A connection the primary accepted.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// Its id on the channel (`Conn`/`Taken`/`Closed`).
    pub(crate) id: u64,
    /// The primary's descriptor, shared with the writer that passes it on
    /// (no dup per connection).
    pub(crate) conn: Arc<OwnedFd>,
    /// A hash of the client's address (the sticky picker's key).
    pub(crate) client: u64,
    /// Which round-robin listener accepted it.
    pub(crate) listener: usize,
}

/// A hash of a client address, stable for the life of the primary.
pub(crate) fn client_hash(ip: Option<IpAddr>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ip.hash(&mut h);
    h.finish()
}

/// Connections waiting or in flight, and per-worker counts.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    picker: Picker,
    /// Accepted, waiting for a worker with room.
    pub(crate) waiting: VecDeque<Accepted>,
    /// Handed and not yet taken: connection id → (worker pid, connection).
    handed: HashMap<u64, (u32, Accepted)>,
    /// How many of `handed` each worker holds (kept with `handed`, so the
    /// per-connection dispatch needs no scan).
    untaken: HashMap<u32, usize>,
    /// Taken and not yet reported closed, per worker (least-connections).
    open: HashMap<u32, usize>,
    next_id: u64,
    /// Where the turn order starts next.
    next_slot: usize,
}

impl RoundRobin {
    pub(crate) fn new(picker: Picker) -> Self {
        RoundRobin {
            picker,
            waiting: VecDeque::new(),
            handed: HashMap::new(),
            untaken: HashMap::new(),
            open: HashMap::new(),
            next_id: 0,
            next_slot: 0,
        }
    }

    /// Queues a connection the primary accepted.
    pub(crate) fn accept(&mut self, conn: OwnedFd, client: u64, listener: usize) {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Accepted {
            id,
            conn: Arc::new(conn),
            client,
            listener,
        });
    }

    /// Worker `pid` refused connection `id` (a Node worker whose server has
    /// closed): it goes back to the front of the queue.
    /// Returns the connection's listener, if `pid` held it.
    pub(crate) fn refuse(&mut self, id: u64, pid: u32) -> Option<usize> {
        if !matches!(self.handed.get(&id), Some((p, _)) if *p == pid) {
            return None;
        }
        let (_, accepted) = self.handed.remove(&id).expect("checked");
        forget(&mut self.untaken, pid, 1);
        let listener = accepted.listener;
        self.waiting.push_front(accepted);
        Some(listener)
    }

    /// Whether worker `pid` may be handed another connection.
    pub(crate) fn has_room(&self, pid: u32) -> bool {
        count(&self.untaken, pid) < MAX_IN_FLIGHT
    }

    /// Connections worker `pid` holds: handed and not taken, or open.
    pub(crate) fn load(&self, pid: u32) -> usize {
        count(&self.untaken, pid) + count(&self.open, pid)
    }

    /// Which of `candidates` (ready workers as `(slot, pid)`, in slot order,
    /// out of `slots` slots) gets a connection from `client`; `None` when
    /// none has room.
    pub(crate) fn pick(
        &self,
        candidates: &[(usize, u32)],
        slots: usize,
        client: u64,
    ) -> Option<(usize, u32)> {
        let slots = slots.max(1);
        let from = |start: usize, slot: usize| (slot + slots - start % slots) % slots;
        let room = candidates
            .iter()
            .copied()
            .filter(|(_, p)| self.has_room(*p));
        match self.picker {
            Picker::RoundRobin => room.min_by_key(|(s, _)| from(self.next_slot, *s)),
            Picker::LeastConnections => {
                room.min_by_key(|(s, p)| (self.load(*p), from(self.next_slot, *s)))
            }
            Picker::Sticky => {
                let home = (client % slots as u64) as usize;
                room.min_by_key(|(s, _)| from(home, *s))
            }
        }
    }

    /// Records `accepted` as handed to worker `pid` in `slot`.
    pub(crate) fn hand(&mut self, accepted: Accepted, slot: usize, pid: u32) {
        *self.untaken.entry(pid).or_default() += 1;
        self.handed.insert(accepted.id, (pid, accepted));
        self.next_slot = slot + 1;
    }

    /// Worker `pid` took connection `id`: let go of the primary's copy.
    pub(crate) fn take(&mut self, id: u64, pid: u32) -> bool {
        if !matches!(self.handed.get(&id), Some((p, _)) if *p == pid) {
            return false;
        }
        self.handed.remove(&id);
        forget(&mut self.untaken, pid, 1);
        *self.open.entry(pid).or_default() += 1;
        true
    }

    /// Worker `pid` closed `n` connections it had taken.
    pub(crate) fn closed(&mut self, pid: u32, n: usize) {
        forget(&mut self.open, pid, n);
    }

    /// Worker `pid` is gone or disconnected: every connection it never took
    /// goes back to the front of the queue, in original order; returns how
    /// many. Its open count is dropped.
    pub(crate) fn reclaim(&mut self, pid: u32) -> usize {
        self.open.remove(&pid);
        let mut back: Vec<u64> = self
            .handed
            .iter()
            .filter(|(_, (p, _))| *p == pid)
            .map(|(id, _)| *id)
            .collect();
        back.sort_unstable_by(|a, b| b.cmp(a));
        for id in &back {
            if let Some((_, accepted)) = self.handed.remove(id) {
                self.waiting.push_front(accepted);
            }
        }
        forget(&mut self.untaken, pid, back.len());
        back.len()
    }

    #[cfg(test)]
    fn handed_count(&self) -> usize {
        self.handed.len()
    }
}

fn count(map: &HashMap<u32, usize>, pid: u32) -> usize {
    map.get(&pid).copied().unwrap_or(0)
}

fn forget(map: &mut HashMap<u32, usize>, pid: u32, n: usize) {
    if let Some(c) = map.get_mut(&pid) {
        *c = c.saturating_sub(n);
        if *c == 0 {
            map.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn conn() -> OwnedFd {
        rustix::pipe::pipe().unwrap().0
    }

    /// Hands the front connection as the supervisor does; returns the slot.
    fn dispatch_one(
        rr: &mut RoundRobin,
        candidates: &[(usize, u32)],
        slots: usize,
    ) -> Option<usize> {
        let client = rr.waiting.front()?.client;
        let (slot, pid) = rr.pick(candidates, slots, client)?;
        let accepted = rr.waiting.pop_front().unwrap();
        rr.hand(accepted, slot, pid);
        Some(slot)
    }

    #[test]
    fn counts_untaken_and_reclaims_in_order() {
        let mut rr = RoundRobin::new(Picker::RoundRobin);
        for _ in 0..MAX_IN_FLIGHT {
            assert!(rr.has_room(7));
            rr.accept(conn(), 0, 0);
            let a = rr.waiting.pop_front().unwrap();
            rr.hand(a, 0, 7);
        }
        assert!(!rr.has_room(7), "at most MAX_IN_FLIGHT untaken");
        assert!(rr.has_room(8));
        assert!(!rr.take(3, 8), "only the worker it was handed to takes it");
        assert!(rr.take(3, 7));
        assert!(!rr.take(3, 7), "taken once");
        assert!(rr.has_room(7));
        assert_eq!(rr.load(7), MAX_IN_FLIGHT, "31 untaken + 1 open");
        rr.closed(7, 1);
        assert_eq!(rr.load(7), MAX_IN_FLIGHT - 1);
        rr.accept(conn(), 0, 0);
        assert_eq!(rr.reclaim(7), MAX_IN_FLIGHT - 1);
        let order: Vec<u64> = rr.waiting.iter().map(|a| a.id).collect();
        let mut expect: Vec<u64> = (0..MAX_IN_FLIGHT as u64).filter(|id| *id != 3).collect();
        expect.push(MAX_IN_FLIGHT as u64);
        assert_eq!(order, expect, "reclaimed first, in their original order");
        assert_eq!(rr.handed_count(), 0);
        assert!(rr.untaken.is_empty() && rr.open.is_empty());
    }

    #[test]
    fn least_connections_prefers_the_idlest_worker() {
        let mut rr = RoundRobin::new(Picker::LeastConnections);
        let workers = [(0, 10), (1, 11), (2, 12)];
        // Worker 10 holds three open connections, worker 11 one.
        for (pid, n) in [(10, 3), (11, 1)] {
            for _ in 0..n {
                rr.accept(conn(), 0, 0);
                let a = rr.waiting.pop_front().unwrap();
                let id = a.id;
                rr.hand(a, 0, pid);
                assert!(rr.take(id, pid));
            }
        }
        rr.accept(conn(), 0, 0);
        assert_eq!(dispatch_one(&mut rr, &workers, 3), Some(2));
        rr.accept(conn(), 0, 0);
        // 11 and 12 now tie at one; the turn order breaks the tie.
        assert_eq!(dispatch_one(&mut rr, &workers, 3), Some(1));
        rr.closed(10, 3);
        rr.accept(conn(), 0, 0);
        assert_eq!(dispatch_one(&mut rr, &workers, 3), Some(0));
    }

    proptest! {
        /// Whatever the picker, candidates and traffic: only a candidate with
        /// room is picked, counts match what is in flight, and reclaiming a
        /// worker loses nothing.
        #[test]
        fn picks_only_workers_with_room_and_loses_nothing(
            picker in prop_oneof![Just(Picker::RoundRobin), Just(Picker::LeastConnections), Just(Picker::Sticky)],
            ops in proptest::collection::vec((0u8..4, 0usize..4, any::<u64>()), 1..200),
        ) {
            let slots = 4;
            let mut rr = RoundRobin::new(picker);
            let mut alive = [true; 4];
            let mut accepted = 0usize;
            let mut taken = Vec::new();
            for (op, slot, client) in ops {
                let pid = 100 + slot as u32;
                match op {
                    0 => { rr.accept(conn(), client, 0); accepted += 1; }
                    1 => {
                        let candidates: Vec<(usize, u32)> = (0..slots)
                            .filter(|s| alive[*s]).map(|s| (s, 100 + s as u32)).collect();
                        if let Some(s) = dispatch_one(&mut rr, &candidates, slots) {
                            prop_assert!(alive[s]);
                            prop_assert!(rr.untaken[&(100 + s as u32)] <= MAX_IN_FLIGHT);
                        }
                    }
                    2 => {
                        let ids: Vec<u64> = rr.handed.iter()
                            .filter(|(_, (p, _))| *p == pid).map(|(id, _)| *id).collect();
                        if let Some(id) = ids.first() {
                            prop_assert!(rr.take(*id, pid));
                            taken.push(*id);
                        }
                    }
                    _ => { rr.reclaim(pid); alive[slot] = !alive[slot]; }
                }
                let untaken: usize = rr.untaken.values().sum();
                prop_assert_eq!(untaken, rr.handed_count());
                prop_assert_eq!(rr.waiting.len() + rr.handed_count() + taken.len(), accepted);
            }
        }

        /// Sticky: one client keeps reaching one worker while the candidates
        /// stay the same.
        #[test]
        fn sticky_keeps_a_client_on_one_worker(client in any::<u64>(), n in 1usize..20) {
            let mut rr = RoundRobin::new(Picker::Sticky);
            let workers = [(0, 10), (1, 11), (2, 12)];
            let mut seen = std::collections::HashSet::new();
            for _ in 0..n {
                rr.accept(conn(), client, 0);
                let a = rr.waiting.front().unwrap().id;
                seen.insert(dispatch_one(&mut rr, &workers, 3).unwrap());
                let pid = rr.handed[&a].0;
                prop_assert!(rr.take(a, pid));
            }
            prop_assert_eq!(seen.len(), 1);
        }

        /// Round-robin: with every worker ready and taking at once, each gets
        /// its turn.
        #[test]
        fn round_robin_spreads_evenly(rounds in 1usize..10, slots in 1usize..6) {
            let mut rr = RoundRobin::new(Picker::RoundRobin);
            let workers: Vec<(usize, u32)> = (0..slots).map(|s| (s, s as u32)).collect();
            let mut per = vec![0usize; slots];
            for _ in 0..rounds * slots {
                rr.accept(conn(), 0, 0);
                let id = rr.waiting.front().unwrap().id;
                let s = dispatch_one(&mut rr, &workers, slots).unwrap();
                prop_assert!(rr.take(id, s as u32));
                per[s] += 1;
            }
            prop_assert!(per.iter().all(|c| *c == rounds), "{:?}", per);
        }
    }
}
