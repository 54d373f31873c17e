//! The daemon's log lines on their way to stderr, without a stalled stderr
//! holding up requests.
//!
//! A plain stderr writer makes the thread that logs write the line itself,
//! under the process's one stderr lock. When that write does not return (a
//! pipe nobody reads, a stuck journal, a 9p file whose server does not
//! answer: seen in the test VM), every other thread that logs waits on
//! the lock, and so does every request whose handler logs: its client
//! waits for an answer that never comes, unkillable once the daemon has
//! read its request.
//!
//! Here one thread of its own writes the lines, in order. A thread that
//! logs hands its line over and waits until it is written, so a line is
//! on stderr when the call that logged it returns, as before, but waits
//! at most [`WAIT`]. A line not written by then marks stderr stalled:
//! later lines are queued (up to [`QUEUE_BYTES`], then dropped and
//! counted) without waiting. Once the queue has drained, stderr counts as
//! working again, and a line says how many lines were dropped.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow};

/// How long a thread that logs waits for its line to be written.
pub const WAIT: Duration = Duration::from_millis(500);

/// How many bytes of lines may wait while stderr is stalled.
pub const QUEUE_BYTES: usize = 4 << 20;

#[derive(Default)]
struct State {
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// Lines handed over so far, and lines written (or failed) so far.
    handed: u64,
    written: u64,
    stalled: bool,
    dropped: u64,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here for lines.
    lines: Condvar,
    /// Threads that log wait here for their line to be written.
    written: Condvar,
    wait: Duration,
    queue_bytes: usize,
    /// Put before the line that reports drops (`<4>` for the journal).
    prefix: &'static str,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `tracing_subscriber` writer (`MakeWriter`) for the daemon's log.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Lines to the process's stderr; `prefix` leads the line that reports
    /// drops.
    pub fn stderr(prefix: &'static str) -> io::Result<LogWriter> {
        LogWriter::to(io::stderr(), WAIT, QUEUE_BYTES, prefix)
    }

    /// Lines to `out`, written by a thread started here.
    fn to(
        out: impl Write + Send + 'static,
        wait: Duration,
        queue_bytes: usize,
        prefix: &'static str,
    ) -> io::Result<LogWriter> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            lines: Condvar::new(),
            written: Condvar::new(),
            wait,
            queue_bytes,
            prefix,
        });
        let theirs = Arc::clone(&shared);
        // The thread starts with every signal blocked (it inherits this
        // thread's mask): the daemon takes its stop signals on a thread of
        // its own, and one delivered here would end the process.
        let all = SigSet::all();
        let before = all
            .thread_swap_mask(SigmaskHow::SIG_BLOCK)
            .map_err(io::Error::from)?;
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(&theirs, out));
        before.thread_set_mask().map_err(io::Error::from)?;
        spawned?;
        Ok(LogWriter { shared })
    }

    /// Hand one line over; wait for it unless stderr is stalled.
    fn submit(&self, line: &[u8]) {
        let s = &self.shared;
        let mut state = s.lock();
        if state.stalled && state.queued_bytes + line.len() > s.queue_bytes {
            state.dropped += 1;
            return;
        }
        state.queue.push_back(line.to_vec());
        state.queued_bytes += line.len();
        state.handed += 1;
        let mine = state.handed;
        s.lines.notify_one();
        if state.stalled {
            return;
        }
        let (mut state, timeout) = s
            .written
            .wait_timeout_while(state, s.wait, |st| st.written < mine)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() && state.written < mine {
            state.stalled = true;
        }
    }
}

/// The writer thread: every line in order, then a word on lines dropped
/// once a stall is over.
fn write_lines(shared: &Shared, mut out: impl Write) {
    loop {
        let line = {
            let mut state = shared.lock();
            while state.queue.is_empty() {
                state = shared.lines.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.queue.pop_front().unwrap_or_default()
        };
        // A failed write loses the line, as a plain stderr writer would.
        let _ = out.write_all(&line).and_then(|()| out.flush());
        let mut state = shared.lock();
        state.queued_bytes -= line.len();
        state.written += 1;
        if state.stalled && state.queue.is_empty() {
            state.stalled = false;
            let dropped = std::mem::take(&mut state.dropped);
            drop(state);
            if dropped > 0 {
                let note = format!(
                    "{}cuse-ioasid: stderr stalled; {dropped} log lines were dropped\n",
                    shared.prefix
                );
                let _ = out.write_all(note.as_bytes()).and_then(|()| out.flush());
            }
            state = shared.lock();
        }
        drop(state);
        shared.written.notify_all();
    }
}

/// One event's line, handed over when written (tracing-subscriber writes
/// each event with one `write_all`).
pub struct Line<'a>(&'a LogWriter);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.submit(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::OwnedFd;

    fn pipe() -> (File, File) {
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    fn log(w: &LogWriter, text: &str) {
        use tracing_subscriber::fmt::MakeWriter;
        w.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_line_is_written_before_the_call_returns() {
        let (mut r, w) = pipe();
        let writer = LogWriter::to(w, Duration::from_secs(3600), 1 << 20, "").unwrap();
        log(&writer, "one\n");
        log(&writer, "two\n");
        // Both are in the pipe already: nothing more will come, so a read
        // of exactly their bytes returns them.
        let mut got = [0u8; 8];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one\ntwo\n");
        assert!(!writer.shared.lock().stalled);
    }

    /// A stop signal sent to the daemon must not land on the writer
    /// thread (its default action would end the process, status 143).
    #[test]
    fn the_writer_thread_blocks_the_stop_signals() {
        let (_r, w) = pipe();
        let _writer = LogWriter::to(w, Duration::from_secs(1), 1 << 20, "").unwrap();
        let mut seen = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() != "log-writer" {
                continue;
            }
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            let blocked = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                assert_ne!(blocked & 1 << (sig - 1), 0, "signal {sig} not blocked");
            }
            seen += 1;
        }
        assert!(seen > 0, "no log-writer thread found");
        // The thread that started it keeps its own mask.
        assert!(!SigSet::thread_get_mask()
            .unwrap()
            .contains(nix::sys::signal::SIGTERM));
    }

    /// Stderr that blocks every write until opened, then keeps what it
    /// was given.
    /// Whether it is open, what it was given; and its condition variable.
    type GateState = (Mutex<(bool, Vec<u8>)>, Condvar);

    #[derive(Clone, Default)]
    struct Gate(Arc<GateState>);

    impl Gate {
        fn open(&self) {
            self.0 .0.lock().unwrap().0 = true;
            self.0 .1.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(self.0 .0.lock().unwrap().1.clone()).unwrap()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut g = cv.wait_while(lock.lock().unwrap(), |g| !g.0).unwrap();
            g.1.extend_from_slice(buf);
            cv.notify_all();
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Stderr blocks from the first line, as a stuck one would: every call
    /// to log still returns; lines past the queue are dropped and counted,
    /// and said so once stderr works again.
    #[test]
    fn a_stalled_stderr_holds_no_caller_up_and_drops_are_reported() {
        let gate = Gate::default();
        let writer = LogWriter::to(gate.clone(), Duration::from_millis(20), 4096, "<4>").unwrap();
        let line = format!("{}\n", "x".repeat(999));
        for _ in 0..100 {
            log(&writer, &line);
        }
        let dropped = {
            let s = writer.shared.lock();
            assert!(s.stalled, "the writer should count as stalled");
            s.dropped
        };
        // The queue's 4096 bytes count the line the blocked writer holds:
        // it and three more are kept, the other 96 dropped.
        assert_eq!(dropped, 96);
        gate.open();
        let wait_for_end = |end: &str| {
            let (lock, cv) = &*gate.0;
            drop(cv.wait_while(lock.lock().unwrap(), |g| !g.1.ends_with(end.as_bytes())));
        };
        let note = "<4>cuse-ioasid: stderr stalled; 96 log lines were dropped\n";
        wait_for_end(note);
        assert_eq!(gate.text(), format!("{}{note}", line.repeat(4)));
        // Working again: lines are handed over and written as before.
        log(&writer, "after\n");
        wait_for_end("dropped\nafter\n");
        assert_eq!(writer.shared.lock().dropped, 0);
    }
}
