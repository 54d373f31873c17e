//! Handler slots of one node: how many requests run at once, and whose.
//!
//! Pure bookkeeping, no threads and no system calls, so that every rule is
//! tested on its own; the server's threads ask it what to do.
//!
//! - A **client** is a process (the caller's thread-group id). Each may
//!   have [`Budget::per_client`] requests running at once; its further
//!   requests wait, in its own order, for one of its own slots.
//! - All clients together share [`Budget::total`] slots. When they are all
//!   taken, a client with nothing running may still start one request, up
//!   to [`Budget::reserve`] more: a process that makes one call at a time is
//!   never made to wait by the calls of others.
//! - A waiting request is started as soon as its client may run again,
//!   the client with the fewest requests running first (then the oldest
//!   request), so a freed slot goes to whoever has least.
//! - At most [`Budget::waiting_per_client`] requests of one client wait;
//!   more are refused (the caller answers them `EAGAIN`), so a client with
//!   thousands of threads cannot make the server hold thousands of
//!   messages.
//! - Finding a caller's process costs a read of `/proc/<tid>/status`, so it
//!   is done only when it matters: while fewer than `per_client` requests
//!   run in all, no client can be at its budget, and a request is started
//!   without knowing whose it is ([`Slots::start_unnamed`]). Once that many
//!   run, the server names the callers of those still unnamed
//!   ([`Slots::unnamed`], [`Slots::name`]) before it decides.
//!
//! RELEASE and INTERRUPT never come here: the server answers them at once.

use std::collections::{HashMap, VecDeque};

/// Whom a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Client {
    /// A process, by its thread-group id.
    Process(u32),
    /// A calling thread whose process could not be found (it is exiting):
    /// charged on its own.
    Thread(u32),
}

/// How many handler slots a node has; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Requests of all clients running at once.
    pub total: usize,
    /// Requests of one client running at once (at most `total`).
    pub per_client: usize,
    /// Extra requests, beyond `total`, that clients with nothing running
    /// may start.
    pub reserve: usize,
    /// Requests of one client waiting at once.
    pub waiting_per_client: usize,
}

impl Budget {
    /// `total` shared slots, `per_client` of them for one client (clamped
    /// to 1..=total), a reserve of `total` for clients with nothing running,
    /// and 64 waiting requests per client.
    pub(crate) fn new(total: usize, per_client: usize) -> Self {
        let total = total.max(1);
        Budget {
            total,
            per_client: per_client.clamp(1, total),
            reserve: total,
            waiting_per_client: 64,
        }
    }
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Run it now: it holds a slot until [`Slots::finish`].
    Run,
    /// Put it in [`Slots::wait`]; [`Slots::next`] hands it out when its
    /// client may run.
    Wait,
    /// Its client already has the most waiting requests allowed: answer it
    /// with an error.
    Refuse,
}

#[derive(Debug)]
struct Running {
    tid: u32,
    client: Option<Client>,
}

#[derive(Debug)]
struct Waiter<T> {
    unique: u64,
    tid: u32,
    client: Client,
    item: T,
}

#[derive(Debug, Default, Clone, Copy)]
struct Load {
    running: usize,
    waiting: usize,
}

/// The slots of one node; `T` is what a waiting request carries (the parsed
/// request and its bytes, in the server).
#[derive(Debug)]
pub(crate) struct Slots<T> {
    budget: Budget,
    /// Requests running, by unique id.
    running: HashMap<u64, Running>,
    /// Requests running and waiting per named client (entries with both
    /// zero are removed).
    clients: HashMap<Client, Load>,
    /// Waiting requests, oldest first.
    waiting: VecDeque<Waiter<T>>,
}

impl<T> Slots<T> {
    pub(crate) fn new(budget: Budget) -> Self {
        Slots {
            budget,
            running: HashMap::new(),
            clients: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Requests running.
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Start request `unique` of thread `tid` without naming its client, if
    /// that cannot break a budget: fewer than `per_client` run in all and
    /// nothing waits. False if the caller must be named first.
    pub(crate) fn start_unnamed(&mut self, unique: u64, tid: u32) -> bool {
        if self.running.len() >= self.budget.per_client || !self.waiting.is_empty() {
            return false;
        }
        self.running.insert(unique, Running { tid, client: None });
        true
    }

    /// Running requests whose client is not named yet: (unique, tid).
    pub(crate) fn unnamed(&self) -> Vec<(u64, u32)> {
        self.running
            .iter()
            .filter(|(_, r)| r.client.is_none())
            .map(|(&u, r)| (u, r.tid))
            .collect()
    }

    /// Name the client of running request `unique` (ignored if it finished
    /// meanwhile or is named already).
    pub(crate) fn name(&mut self, unique: u64, client: Client) {
        if let Some(r) = self.running.get_mut(&unique) {
            if r.client.is_none() {
                r.client = Some(client);
                self.clients.entry(client).or_default().running += 1;
            }
        }
    }

    fn may_run(&self, client: Client) -> bool {
        let mine = self.clients.get(&client).map_or(0, |l| l.running);
        let all = self.running.len();
        mine < self.budget.per_client
            && (all < self.budget.total
                || (mine == 0 && all < self.budget.total + self.budget.reserve))
    }

    /// Decide on request `unique` of thread `tid` of `client`. `Run` marks
    /// it running; after `Wait` the caller must hand it to [`Slots::wait`]
    /// (under the same lock).
    pub(crate) fn admit(&mut self, unique: u64, tid: u32, client: Client) -> Admission {
        // Requests of this client already waiting go first.
        let load = self.clients.get(&client).copied().unwrap_or_default();
        if load.waiting == 0 && self.may_run(client) {
            self.running.insert(
                unique,
                Running {
                    tid,
                    client: Some(client),
                },
            );
            self.clients.entry(client).or_default().running += 1;
            return Admission::Run;
        }
        if load.waiting >= self.budget.waiting_per_client {
            return Admission::Refuse;
        }
        Admission::Wait
    }

    /// Keep request `unique` waiting, after [`Slots::admit`] said `Wait`.
    pub(crate) fn wait(&mut self, unique: u64, tid: u32, client: Client, item: T) {
        self.clients.entry(client).or_default().waiting += 1;
        self.waiting.push_back(Waiter {
            unique,
            tid,
            client,
            item,
        });
    }

    /// Request `unique` finished: its slot is free (unknown ids are
    /// ignored).
    pub(crate) fn finish(&mut self, unique: u64) {
        let Some(r) = self.running.remove(&unique) else {
            return;
        };
        if let Some(c) = r.client {
            self.release_client(c, |l| l.running -= 1);
        }
    }

    fn release_client(&mut self, client: Client, change: impl FnOnce(&mut Load)) {
        if let Some(load) = self.clients.get_mut(&client) {
            change(load);
            if load.running == 0 && load.waiting == 0 {
                self.clients.remove(&client);
            }
        }
    }

    /// A waiting request that may run now, marked running: the one of the
    /// client with the fewest requests running, the oldest of those.
    pub(crate) fn next(&mut self) -> Option<(u64, T)> {
        let mut best: Option<(usize, usize)> = None; // (running of client, index)
        let mut seen: Vec<Client> = Vec::new();
        for (i, w) in self.waiting.iter().enumerate() {
            // Only a client's oldest waiting request is a candidate.
            if seen.contains(&w.client) {
                continue;
            }
            seen.push(w.client);
            if !self.may_run(w.client) {
                continue;
            }
            let mine = self.clients.get(&w.client).map_or(0, |l| l.running);
            match best {
                Some((b, _)) if b <= mine => {}
                _ => best = Some((mine, i)),
            }
        }
        let (_, i) = best?;
        let w = self.waiting.remove(i)?;
        let load = self.clients.entry(w.client).or_default();
        load.waiting -= 1;
        load.running += 1;
        self.running.insert(
            w.unique,
            Running {
                tid: w.tid,
                client: Some(w.client),
            },
        );
        Some((w.unique, w.item))
    }

    /// Remove and return the waiting requests for which `pred` holds (e.g.
    /// interrupted ones, to be answered `EINTR`).
    pub(crate) fn take_waiting(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in std::mem::take(&mut self.waiting) {
            if pred(&w.item) {
                self.release_client(w.client, |l| l.waiting -= 1);
                taken.push(w.item);
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        taken
    }

    /// Whether a waiting request may run now (then [`Slots::next`] returns
    /// one).
    pub(crate) fn any_ready(&self) -> bool {
        self.waiting.iter().any(|w| self.may_run(w.client))
    }

    /// Requests running for `client` (for tests and statistics).
    #[cfg(test)]
    fn running_for(&self, client: Client) -> usize {
        self.clients.get(&client).map_or(0, |l| l.running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Client = Client::Process(100);
    const B: Client = Client::Process(200);
    const C: Client = Client::Process(300);

    fn budget(total: usize, per_client: usize, reserve: usize) -> Budget {
        Budget {
            total,
            per_client,
            reserve,
            waiting_per_client: 64,
        }
    }

    /// `admit`, and `wait` if told to: what admit said.
    fn offer(s: &mut Slots<u64>, unique: u64, client: Client) -> Admission {
        let a = s.admit(unique, 1, client);
        if a == Admission::Wait {
            s.wait(unique, 1, client, unique);
        }
        a
    }

    fn run(s: &mut Slots<u64>, unique: u64, client: Client) {
        assert_eq!(offer(s, unique, client), Admission::Run, "{unique}");
    }

    fn waits(s: &mut Slots<u64>, unique: u64, client: Client) {
        assert_eq!(offer(s, unique, client), Admission::Wait, "{unique}");
    }

    #[test]
    fn budget_new_clamps() {
        assert_eq!(Budget::new(0, 0), budget(1, 1, 1));
        assert_eq!(Budget::new(32, 64).per_client, 32);
        assert_eq!(Budget::new(32, 8), budget(32, 8, 32));
    }

    #[test]
    fn a_greedy_client_waits_for_its_own_slots_and_others_run() {
        let mut s = Slots::new(budget(8, 2, 8));
        // A floods: two run, the rest wait.
        for u in 1..=6 {
            if u <= 2 {
                run(&mut s, u, A);
            } else {
                waits(&mut s, u, A);
            }
        }
        assert_eq!((s.running(), s.waiting()), (2, 4));
        // B is not behind A's waiting requests.
        run(&mut s, 20, B);
        run(&mut s, 21, B);
        waits(&mut s, 22, B);
        // Nothing may start: both are at their budget.
        assert_eq!(s.next(), None);
        // A's slot frees: A's oldest waiting request takes it.
        s.finish(1);
        assert_eq!(s.next(), Some((3, 3)));
        assert_eq!(s.next(), None);
        // B's slot frees: B's waiting request, not A's older ones.
        s.finish(20);
        assert_eq!(s.next(), Some((22, 22)));
        assert_eq!(s.running_for(A), 2);
        assert_eq!(s.running_for(B), 2);
    }

    #[test]
    fn a_client_with_nothing_running_uses_the_reserve() {
        let mut s = Slots::new(budget(4, 2, 2));
        for (u, c) in [(1, A), (2, A), (3, B), (4, B)] {
            run(&mut s, u, c);
        }
        // All shared slots are taken; C has nothing running: it starts.
        run(&mut s, 5, C);
        // But only one: C's second waits.
        waits(&mut s, 6, C);
        let d = Client::Process(400);
        run(&mut s, 7, d);
        // The reserve is used up: a fifth client waits too.
        let e = Client::Process(500);
        waits(&mut s, 8, e);
        // A slot frees: E (nothing running) goes before C (one running),
        // although C waited longer.
        s.finish(1);
        assert_eq!(s.next(), Some((8, 8)));
        assert_eq!(s.next(), None);
        // C (one running) waits while all shared slots are taken...
        s.finish(2);
        s.finish(3);
        assert_eq!(s.running(), 4);
        assert_eq!(s.next(), None);
        // ...and starts when one of them frees.
        s.finish(4);
        assert_eq!(s.next(), Some((6, 6)));
    }

    #[test]
    fn a_clients_requests_stay_in_order() {
        let mut s = Slots::new(budget(8, 1, 8));
        run(&mut s, 1, A);
        for u in 2..=4 {
            waits(&mut s, u, A);
        }
        for expect in 2..=4 {
            s.finish(expect - 1);
            assert_eq!(s.next(), Some((expect, expect)));
        }
        // While a request of A waits, a new one of A waits behind it even
        // if a slot is free at that moment.
        let mut s = Slots::new(budget(8, 1, 8));
        run(&mut s, 1, A);
        waits(&mut s, 2, A);
        s.finish(1);
        waits(&mut s, 3, A);
        assert_eq!(s.next(), Some((2, 2)));
    }

    #[test]
    fn too_many_waiting_are_refused_per_client() {
        let mut s = Slots::new(Budget {
            waiting_per_client: 2,
            ..budget(4, 1, 0)
        });
        run(&mut s, 1, A);
        waits(&mut s, 2, A);
        waits(&mut s, 3, A);
        assert_eq!(offer(&mut s, 4, A), Admission::Refuse);
        // Another client is not affected.
        run(&mut s, 5, B);
        waits(&mut s, 6, B);
    }

    #[test]
    fn unnamed_requests_count_in_the_total_and_are_named_later() {
        let mut s = Slots::new(budget(4, 2, 0));
        assert!(s.start_unnamed(1, 11));
        assert!(s.start_unnamed(2, 12));
        // Two run: a third could be a client's third; it must be named.
        assert!(!s.start_unnamed(3, 13));
        let mut unnamed = s.unnamed();
        unnamed.sort();
        assert_eq!(unnamed, vec![(1, 11), (2, 12)]);
        s.name(1, A);
        s.name(2, A);
        s.name(2, B); // already named: ignored
        s.name(99, B); // not running: ignored
        assert!(s.unnamed().is_empty());
        assert_eq!(s.running_for(A), 2);
        waits(&mut s, 3, A);
        run(&mut s, 4, B);
        // Nothing may start unnamed while something waits.
        s.finish(4);
        assert!(!s.start_unnamed(5, 15));
        // An unnamed request that finishes frees a slot of the total only.
        let mut s = Slots::<u64>::new(budget(4, 2, 0));
        assert!(s.start_unnamed(1, 11));
        s.finish(1);
        s.finish(1);
        assert_eq!(s.running(), 0);
    }

    #[test]
    fn interrupted_waiters_are_taken_out() {
        let mut s = Slots::new(budget(2, 1, 0));
        run(&mut s, 1, A);
        for u in 2..=5 {
            waits(&mut s, u, A);
        }
        assert_eq!(s.take_waiting(|&u| u % 2 == 0), vec![2, 4]);
        assert_eq!(s.waiting(), 2);
        s.finish(1);
        assert_eq!(s.next(), Some((3, 3)));
        assert_eq!(s.take_waiting(|_| true), vec![5]);
        s.finish(3);
        // Nothing is left of A.
        assert!(s.clients.is_empty());
        assert_eq!(s.next(), None);
    }

    /// Random admissions, finishes and interrupts against the rules: no
    /// client ever runs more than its budget, the total never exceeds
    /// total + reserve, a client with nothing running waits only when the
    /// reserve is used up, and nothing that may run is left waiting.
    #[test]
    fn random_schedules_keep_every_rule() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let b = budget(6, 2, 3);
        let mut s = Slots::<u64>::new(b);
        let mut running: Vec<u64> = Vec::new();
        for unique in 1..20_000u64 {
            match rand(3) {
                0 | 1 => {
                    let client = Client::Process(rand(5) as u32);
                    match offer(&mut s, unique, client) {
                        Admission::Run => running.push(unique),
                        Admission::Wait => {}
                        Admission::Refuse => panic!("64 waiting per client never reached"),
                    }
                }
                _ if !running.is_empty() => {
                    let u = running.swap_remove(rand(running.len() as u64) as usize);
                    s.finish(u);
                    while let Some((u, _)) = s.next() {
                        running.push(u);
                    }
                }
                _ => {}
            }
            if rand(50) == 0 {
                let k = rand(4);
                s.take_waiting(|&u| u % 4 == k);
            }
            assert!(s.running() <= b.total + b.reserve);
            for (c, l) in &s.clients {
                assert!(l.running <= b.per_client, "{c:?} runs {}", l.running);
            }
            // Invariant of next(): nothing left that may run.
            let stuck = s.waiting.iter().any(|w| s.may_run(w.client));
            assert!(!stuck, "a waiting request could run");
        }
    }
}
