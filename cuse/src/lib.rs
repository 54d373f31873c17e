//! CUSE server
