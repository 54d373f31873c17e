//! The fuzz targets. A target is a name and a constructor of its state;
//! the state takes one generated input per call and panics when an
//! invariant breaks. To add one: a module here with a `Target` constant,
//! and one line in [`ALL`].
//!
//! - [`cuse_wire`]: the CUSE wire decoders (`cuse-session`,
//!   `cuse-cursor`);
//! - [`ioctl_tables`]: every row of every node's ioctl table through the
//!   node's dispatch (`ioctl-tables`);
//! - [`engine_ops`]: random sequences of engine operations on the fake
//!   backend, checked against a model after every step (`engine-ops`).

use crate::gen::Rng;

pub mod cuse_wire;
pub mod engine_ops;
pub mod ioctl_tables;

/// A target's state: takes one generated input per call.
pub type Feed = Box<dyn FnMut(&mut Rng)>;

/// One fuzz target.
pub struct Target {
    /// Its name on the command line.
    pub name: &'static str,
    /// What it feeds, and what it checks.
    pub about: &'static str,
    /// The most inputs one run feeds it, for a target slow per input
    /// (`--iterations` above it is cut to it); `None`: no limit.
    pub cap: Option<u64>,
    /// A fresh state; each call generates one input from the `Rng`, feeds
    /// it, and checks the outcome.
    pub make: fn() -> Feed,
}

/// An engine over `backend` serving `devices` (id, PCI address, IOMMU
/// group), with page-table walks cut at `walk_limit` entries.
pub fn engine(
    backend: std::sync::Arc<ioasid_engine::fake::FakeBackend>,
    devices: &[(ioasid_engine::DeviceId, &str, u32)],
    walk_limit: u64,
) -> std::sync::Arc<ioasid_engine::Engine> {
    let specs = devices
        .iter()
        .map(|&(id, name, group)| ioasid_engine::DeviceSpec {
            id,
            name: name.into(),
            group,
        })
        .collect();
    let engine = ioasid_engine::Engine::new(backend, specs).expect("distinct device ids");
    engine.set_walk_limit(walk_limit);
    engine
}

/// Every target, in the order `fuzz` runs them.
pub const ALL: &[Target] = &[
    cuse_wire::SESSION,
    cuse_wire::CURSOR,
    ioctl_tables::IOCTL_TABLES,
    engine_ops::ENGINE_OPS,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target, a few thousand inputs, a few hundred for a target
    /// with a cap (the release-mode run in scripts/test does a million
    /// each, or the cap).
    #[test]
    fn every_target_takes_a_few_thousand_inputs() {
        let mut names: Vec<&str> = ALL.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "target names are unique");
        for t in ALL {
            let mut feed = (t.make)();
            let n = if t.cap.is_some() { 300 } else { 3000 };
            for i in 0..n {
                feed(&mut Rng::for_iteration(1, i));
            }
        }
    }
}
