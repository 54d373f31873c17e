//! A caller made of a byte buffer at a fixed address and a table of file
//! descriptors, for the front ends' tests and the fuzz targets on the
//! host.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use zerocopy::FromBytes;

use crate::caller::Caller;

/// The memory `[base, base + len)` of a caller, but its `holes`;
/// everything else faults.
pub struct FakeCaller {
    /// First address of the memory.
    pub base: u64,
    /// The memory.
    pub mem: RefCell<Vec<u8>>,
    /// Address ranges inside the memory that fault as if unmapped (for
    /// the caller's reads and writes; [`FakeCaller::put`] and
    /// [`FakeCaller::get`] ignore them).
    pub holes: RefCell<Vec<Range<u64>>>,
    /// How many of the caller's reads and writes faulted.
    pub faults: Cell<usize>,
    /// Whether writes succeed (`EFAULT` otherwise).
    pub writable: Cell<bool>,
    /// Every (address, length) written, in order.
    pub writes: RefCell<Vec<(u64, usize)>>,
    /// The fds the caller holds: (its number, the file).
    pub fds: Vec<(i32, OwnedFd)>,
    /// The calling thread.
    pub tid: i32,
    /// The caller's process id, or the errno of a caller that vanished.
    pub pid: Cell<Result<i32, Errno>>,
    /// How many times the process id was asked for.
    pub pid_asked: Cell<usize>,
}

impl FakeCaller {
    /// A caller whose memory is `mem` at `base`, thread and process `tid`,
    /// holding no fds.
    pub fn new(base: u64, mem: Vec<u8>, tid: i32) -> Self {
        FakeCaller {
            base,
            mem: RefCell::new(mem),
            holes: RefCell::new(Vec::new()),
            faults: Cell::new(0),
            writable: Cell::new(true),
            writes: RefCell::new(Vec::new()),
            fds: Vec::new(),
            tid,
            pid: Cell::new(Ok(tid)),
            pid_asked: Cell::new(0),
        }
    }

    /// Give the caller a copy of `file` as its fd number `fd`.
    pub fn hold(&mut self, fd: i32, file: &OwnedFd) {
        self.fds
            .push((fd, file.try_clone().expect("dup of a test fd")));
    }

    fn range(&self, addr: u64, len: usize) -> Result<Range<usize>, Errno> {
        let start = usize::try_from(addr.checked_sub(self.base).ok_or(Errno::EFAULT)?)
            .map_err(|_| Errno::EFAULT)?;
        let end = start.checked_add(len).ok_or(Errno::EFAULT)?;
        if end > self.mem.borrow().len() {
            return Err(Errno::EFAULT);
        }
        Ok(start..end)
    }

    /// The range of `mem` behind the caller's access of `len` bytes at
    /// `addr`, or `EFAULT` (counted) if any of it is not mapped.
    fn access(&self, addr: u64, len: usize) -> Result<Range<usize>, Errno> {
        let r = self.range(addr, len).and_then(|r| {
            let end = addr + len as u64;
            let hit = self
                .holes
                .borrow()
                .iter()
                .any(|h| h.start < end && addr < h.end);
            if hit && len > 0 {
                Err(Errno::EFAULT)
            } else {
                Ok(r)
            }
        });
        if r.is_err() {
            self.faults.set(self.faults.get() + 1);
        }
        r
    }

    /// Put `bytes` at `addr` (which must lie in the memory).
    pub fn put(&self, addr: u64, bytes: &[u8]) {
        let r = self
            .range(addr, bytes.len())
            .expect("inside the fake memory");
        self.mem.borrow_mut()[r].copy_from_slice(bytes);
    }

    /// Zero the whole memory.
    pub fn clear(&self) {
        self.mem.borrow_mut().fill(0);
    }

    /// The `len` bytes at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let r = self.range(addr, len).expect("inside the fake memory");
        self.mem.borrow()[r].to_vec()
    }

    /// The `T` at `addr`.
    pub fn struct_at<T: FromBytes>(&self, addr: u64) -> T {
        T::read_from_bytes(&self.get(addr, std::mem::size_of::<T>())).expect("sized")
    }
}

impl Caller for FakeCaller {
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let r = self.access(addr, buf.len())?;
        buf.copy_from_slice(&self.mem.borrow()[r]);
        Ok(())
    }

    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        if !self.writable.get() {
            self.faults.set(self.faults.get() + 1);
            return Err(Errno::EFAULT);
        }
        let r = self.access(addr, data.len())?;
        self.mem.borrow_mut()[r].copy_from_slice(data);
        self.writes.borrow_mut().push((addr, data.len()));
        Ok(())
    }

    fn get_fd(&self, fd: i32) -> Result<OwnedFd, Errno> {
        let (_, f) = self
            .fds
            .iter()
            .find(|(n, _)| *n == fd)
            .ok_or(Errno::EBADF)?;
        f.as_fd().try_clone_to_owned().map_err(|_| Errno::EMFILE)
    }

    fn tid(&self) -> i32 {
        self.tid
    }

    fn pid(&self) -> Result<i32, Errno> {
        self.pid_asked.set(self.pid_asked.get() + 1);
        self.pid.get()
    }
}
