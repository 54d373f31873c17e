//! The lines a client's requests write to the daemon's log, within a
//! budget per client.
//!
//! A client must not be able to fill the journal: one hostile call wrote a
//! line per PASID-table entry (32,770 lines), and a loop of refused calls a
//! line each. So a call writes at most one line (the engine hands back
//! summaries, such as its `WalkReport`, instead of logging),
//! and every line a request causes goes through [`client_line`]: each
//! client may write [`BURST`] lines at once and [`PER_SECOND`] more each
//! second. Lines past that are counted, not written; the client's next
//! line that is written says how many were dropped, and [`dropped_total`]
//! counts them all.
//!
//! A client is the open file a request came on (see [`Client`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use ioasid_uapi::Error;

/// Lines a client may write at once.
pub const BURST: u64 = 20;
/// Lines a client may write each second, once its burst is spent.
pub const PER_SECOND: u64 = 2;
/// Clients remembered at most; past that, those with nothing to report
/// and a full budget are forgotten first.
const MAX_CLIENTS: usize = 4096;

/// Whose budget a line is charged to: the open file the request came on
/// (known without a look-up; how many files a client may open is bounded
/// in its turn).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    /// An open file of `/dev/ioasid` or `/dev/iommu`, or a device file
    /// bound to one: the engine's context id.
    Context(u64),
    /// A device file not bound to any context: the device and the file
    /// handle its node gave the open.
    DeviceFile(u32, u64),
    /// An open refused before there was a file to charge (a process at its
    /// budget of open files): all such lines share one budget.
    RefusedOpen,
}

/// How many earlier lines of the client were dropped; displayed as a
/// suffix of the line that is written (empty when none were).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped(pub u64);

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(
                f,
                " [{n} earlier lines of this client dropped: over its log budget]"
            ),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    /// Lines it may write now, in thousandths.
    milli: u64,
    last: Instant,
    dropped: u64,
}

/// Token buckets, one per client.
#[derive(Debug)]
pub struct Budgets {
    burst: u64,
    per_second: u64,
    buckets: Mutex<HashMap<Client, Bucket>>,
    dropped: AtomicU64,
}

impl Budgets {
    /// Budgets of `burst` lines at once and `per_second` lines a second.
    pub fn new(burst: u64, per_second: u64) -> Self {
        Budgets {
            burst,
            per_second,
            buckets: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether `client` may write a line at time `now`: `Some` with the
    /// lines it dropped since its last one, or `None` (the line is counted
    /// as dropped).
    pub fn admit(&self, client: Client, now: Instant) -> Option<Dropped> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&client) {
            self.forget_some(&mut buckets, now);
        }
        let full = self.burst * 1000;
        let b = buckets.entry(client).or_insert(Bucket {
            milli: full,
            last: now,
            dropped: 0,
        });
        let gained = now.saturating_duration_since(b.last).as_millis() as u64 * self.per_second;
        b.milli = (b.milli + gained).min(full);
        b.last = now;
        if b.milli >= 1000 {
            b.milli -= 1000;
            Some(Dropped(std::mem::take(&mut b.dropped)))
        } else {
            b.dropped += 1;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Make room: forget clients whose budget is full again and who have
    /// nothing to report; if none, the one heard from longest ago.
    fn forget_some(&self, buckets: &mut HashMap<Client, Bucket>, now: Instant) {
        let full = self.burst * 1000;
        buckets.retain(|_, b| {
            let gained = now.saturating_duration_since(b.last).as_millis() as u64 * self.per_second;
            b.dropped > 0 || b.milli + gained < full
        });
        if buckets.len() >= MAX_CLIENTS {
            if let Some(oldest) = buckets.iter().min_by_key(|(_, b)| b.last).map(|(c, _)| *c) {
                buckets.remove(&oldest);
            }
        }
    }

    /// Lines dropped so far, all clients together.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

static BUDGETS: LazyLock<Budgets> = LazyLock::new(|| Budgets::new(BURST, PER_SECOND));

/// Whether `client` may write a line now (see the module documentation).
pub fn client_line(client: Client) -> Option<Dropped> {
    BUDGETS.admit(client, Instant::now())
}

/// Lines every client's requests could not write, since the start.
pub fn dropped_total() -> u64 {
    BUDGETS.dropped_total()
}

/// The one log rule for a refused request: a client's mistake at info
/// level (it says what to do), anything else at warn level; either within
/// the client's budget.
pub fn refusal(client: Client, node: &str, cmd: &str, e: &Error) {
    let Some(dropped) = client_line(client) else {
        return;
    };
    if e.is_client_mistake() {
        tracing::info!(node, cmd, errno = %e.errno, "{}{dropped}", e.message);
    } else {
        tracing::warn!(node, cmd, errno = %e.errno, "{}{dropped}", e.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_a_trickle_and_the_drops_are_told() {
        let b = Budgets::new(3, 2);
        let t0 = Instant::now();
        let a = Client::Context(1);
        for _ in 0..3 {
            assert_eq!(b.admit(a, t0), Some(Dropped(0)));
        }
        for _ in 0..10 {
            assert_eq!(b.admit(a, t0), None);
        }
        // Another client is not affected.
        assert_eq!(b.admit(Client::DeviceFile(1, 1), t0), Some(Dropped(0)));
        // Half a second later one line is due, and it tells of the ten.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.admit(a, t1), Some(Dropped(10)));
        assert_eq!(b.admit(a, t1), None);
        assert_eq!(b.dropped_total(), 11);
        // A long pause refills the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.admit(a, t2).is_some());
        }
        assert_eq!(b.admit(a, t2), None);
    }

    #[test]
    fn a_million_refusals_write_a_bounded_number_of_lines() {
        let b = Budgets::new(BURST, PER_SECOND);
        let t0 = Instant::now();
        // A million lines over ten seconds: the burst and 2 a second.
        let written = (0..1_000_000u64)
            .filter(|i| {
                let now = t0 + Duration::from_micros(i * 10);
                b.admit(Client::Context(7), now).is_some()
            })
            .count() as u64;
        assert!(written <= BURST + 10 * PER_SECOND + 1, "{written}");
        assert_eq!(b.dropped_total(), 1_000_000 - written);
    }

    #[test]
    fn the_table_of_clients_stays_bounded() {
        let b = Budgets::new(2, 1);
        let t0 = Instant::now();
        for ctx in 0..(MAX_CLIENTS as u64 + 64) {
            b.admit(Client::Context(ctx), t0);
        }
        assert!(b.buckets.lock().unwrap().len() <= MAX_CLIENTS);
    }

    #[test]
    fn dropped_is_a_suffix_only_when_lines_were_dropped() {
        assert_eq!(Dropped(0).to_string(), "");
        assert!(Dropped(5).to_string().contains("5 earlier lines"));
    }
}
