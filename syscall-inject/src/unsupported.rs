//! Architectures other than x86_64: every injection is refused.

use std::os::fd::BorrowedFd;

use crate::error::Error;
use crate::options::Options;

/// Room for argument structs (unused here).
pub const SCRATCH_SIZE: usize = 1024;

/// Never constructed on this architecture.
#[derive(Debug)]
pub enum Seized {}

/// Never constructed on this architecture.
#[derive(Debug)]
pub enum Stopped {}

fn unsupported() -> Error {
    Error::UnsupportedArch {
        arch: std::env::consts::ARCH,
    }
}

impl Seized {
    /// Always [`Error::UnsupportedArch`].
    pub fn seize(_tid: i32, _options: Options) -> Result<Seized, Error> {
        Err(unsupported())
    }
    /// Unreachable.
    pub fn tid(&self) -> i32 {
        match *self {}
    }
    /// Unreachable.
    pub fn wait_stop(self, _nr: i64) -> Result<Stopped, Error> {
        match self {}
    }
}

impl Stopped {
    /// Unreachable.
    pub fn tid(&self) -> i32 {
        match *self {}
    }
    /// Unreachable.
    pub fn pid(&self) -> i32 {
        match *self {}
    }
    /// Unreachable.
    pub fn put(&mut self, _bytes: &[u8]) -> Result<u64, Error> {
        match *self {}
    }
    /// Unreachable.
    pub fn read(&self, _addr: u64, _buf: &mut [u8]) -> Result<(), Error> {
        match *self {}
    }
    /// Unreachable.
    pub fn same_file(&self, _fd: i32, _ours: BorrowedFd<'_>) -> Result<bool, Error> {
        match *self {}
    }
    /// Unreachable.
    pub fn syscall(&mut self, _nr: i64, _args: &[u64]) -> Result<i64, Error> {
        match *self {}
    }
    /// Unreachable.
    pub fn finish(self, _result: i64) -> Result<(), Error> {
        match self {}
    }
}

/// Nothing to do here.
pub fn sweep_parked() {}

/// `?`: not implemented here.
pub fn state_of(_tid: i32) -> char {
    '?'
}

/// Nothing is ever traced here.
pub fn still_tracing() -> bool {
    false
}
