//! The IOASID engine: contexts, address spaces, mappings, registrations, nesting and the group rule, over a backend trait.
