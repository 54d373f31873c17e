//! The IOASID engine: contexts, I/O address spaces, mappings, registrations,
//! nesting and the group rule — pure logic over the [`backend::Backend`]
//! trait, unit-tested without root against [`fake::FakeBackend`].

pub mod backend;
