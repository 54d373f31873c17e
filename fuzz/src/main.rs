//! `fuzz`: deterministic, seeded fuzzing on the host, with stable Rust (no
//! `cargo fuzz`, which needs a nightly compiler): the CUSE decoders, every
//! node's ioctl table through its dispatch, and the engine over its fake
//! backend. Each target generates valid inputs, mutates them, feeds them,
//! and checks its invariants; a panic is a failure, reported with the seed
//! and iteration that make the input again.
//!
//! ```text
//! cargo run --release -p cuse-ioasid-fuzz -- [--iterations N] [--seed S] [TARGET...]
//! cargo run --release -p cuse-ioasid-fuzz -- --seed S --only I TARGET   # one input again
//! cargo run --release -p cuse-ioasid-fuzz -- --list
//! ```
//!
//! Targets are in `src/targets/` (see its module documentation to add
//! one): `cuse-session` and `cuse-cursor` (the CUSE wire decoders),
//! `ioctl-tables` (every row of the four nodes' ioctl tables through their
//! dispatch) and `engine-ops` (sequences of engine operations checked
//! against a model after every step). `scripts/test` runs every target for
//! a bounded number of iterations (`--iterations 1000000`).
//!
//! A target that is slow per input has a cap (`--list` shows it): a run
//! feeds it at most that many inputs, whatever `--iterations` says.
//! `engine-ops` is capped at 100,000: one of its inputs is a fresh engine
//! and up to 40 operations, each followed by a check of the whole engine
//! and fake backend against the model, about 140 µs of CPU where an
//! `ioctl-tables` input takes about 20; a million would take two and a
//! half minutes. The whole release run takes 30 to 40 s of CPU on the
//! 2-core build machine, `ioctl-tables` and `engine-ops` about half each
//! (85 s of wall-clock time at a load average of 9).

mod gen;
mod targets;

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use gen::Rng;
use targets::{Target, ALL};

#[derive(Parser)]
#[command(about = "Seeded fuzzing of the project's decoders (see the crate documentation)")]
struct Args {
    /// Inputs per target.
    #[arg(long, default_value_t = 1_000_000)]
    iterations: u64,
    /// Seed of the run: the same seed gives the same inputs.
    #[arg(long, default_value_t = 17)]
    seed: u64,
    /// Run only iteration I (to make a failing input again).
    #[arg(long, value_name = "I")]
    only: Option<u64>,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
    /// Targets to run (default: all).
    targets: Vec<String>,
}

thread_local! {
    /// The message of the last panic on this thread (handlers under test
    /// may panic on purpose; only a panic that escapes a target counts).
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for t in ALL {
            let cap = t
                .cap
                .map_or(String::new(), |c| format!(" [at most {c} inputs per run]"));
            println!("{:14} {}{cap}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    let chosen: Vec<&Target> = if args.targets.is_empty() {
        ALL.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for name in &args.targets {
            match ALL.iter().find(|t| t.name == name) {
                Some(t) => chosen.push(t),
                None => {
                    eprintln!("fuzz: no target {name:?} (see --list)");
                    return ExitCode::from(2);
                }
            }
        }
        chosen
    };
    std::panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
    }));
    for target in chosen {
        let range = match args.only {
            Some(i) => i..i + 1,
            None => {
                0..target
                    .cap
                    .map_or(args.iterations, |c| c.min(args.iterations))
            }
        };
        let mut feed = (target.make)();
        let start = Instant::now();
        for i in range.clone() {
            let mut rng = Rng::for_iteration(args.seed, i);
            if catch_unwind(AssertUnwindSafe(|| feed(&mut rng))).is_err() {
                let why = LAST_PANIC.with(|p| p.borrow().clone());
                eprintln!(
                    "fuzz: {}: iteration {i} of seed {} failed: {why}",
                    target.name, args.seed
                );
                eprintln!(
                    "fuzz: again with: cargo run --release -p cuse-ioasid-fuzz -- --seed {} --only {i} {}",
                    args.seed, target.name
                );
                return ExitCode::FAILURE;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let n = range.end - range.start;
        println!(
            "fuzz: {}: {n} iterations in {secs:.2} s ({:.0} per second), no failure",
            target.name,
            n as f64 / secs.max(1e-9)
        );
    }
    ExitCode::SUCCESS
}
