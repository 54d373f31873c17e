//! The fuzz targets. A target is a name and a constructor of its state;
//! the state takes one generated input per call and panics when an
//! invariant breaks. To add one: a module here with a `Target` constant,
//! and one line in [`ALL`].

use crate::gen::Rng;

pub mod cuse_wire;

/// A target's state: takes one generated input per call.
pub type Feed = Box<dyn FnMut(&mut Rng)>;

/// One fuzz target.
pub struct Target {
    /// Its name on the command line.
    pub name: &'static str,
    /// What it feeds, and what it checks.
    pub about: &'static str,
    /// A fresh state; each call generates one input from the `Rng`, feeds
    /// it, and checks the outcome.
    pub make: fn() -> Feed,
}

/// Every target, in the order `fuzz` runs them.
pub const ALL: &[Target] = &[cuse_wire::SESSION, cuse_wire::CURSOR];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target, a few thousand inputs (the release-mode run in
    /// scripts/test does a million each).
    #[test]
    fn every_target_takes_a_few_thousand_inputs() {
        let mut names: Vec<&str> = ALL.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "target names are unique");
        for t in ALL {
            let mut feed = (t.make)();
            for i in 0..3000 {
                feed(&mut Rng::for_iteration(1, i));
            }
        }
    }
}
