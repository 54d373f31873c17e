//! Every raw system call of the crate: VFIO ioctls, `mmap`/`munmap`,
//! `prlimit`, `capget` and the `PROCMAP_QUERY` ioctl on `/proc/<pid>/maps`. Each wrapper takes typed arguments, so the request number and
//! the argument's type and direction cannot be mismatched by a caller.
//!
//! The SAFETY notes follow one pattern: (1) the fd is valid for the call
//! (a `BorrowedFd` guarantees it), (2) whatever the kernel reads or writes
//! lives in this frame and is large enough for the request, (3) the return
//! value is checked before any output is used.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_region_info,
};

use crate::ioctls::*;

fn check(ret: libc::c_int) -> Result<libc::c_int, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// `VFIO_GET_API_VERSION` on a container.
pub(crate) fn get_api_version(container: BorrowedFd<'_>) -> Result<i32, Errno> {
    // SAFETY: (1) valid fd; (2) the request takes no argument; (3) checked.
    check(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION) })
}

/// `VFIO_CHECK_EXTENSION` on a container: is extension `ext` supported?
pub(crate) fn check_extension(container: BorrowedFd<'_>, ext: u32) -> Result<bool, Errno> {
    // SAFETY: (1) valid fd; (2) the argument is an integer passed by value,
    // no memory is touched; (3) checked.
    let ret = check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            VFIO_CHECK_EXTENSION,
            ext as libc::c_ulong,
        )
    })?;
    Ok(ret > 0)
}

/// `VFIO_SET_IOMMU` on a container.
pub(crate) fn set_iommu(container: BorrowedFd<'_>, model: u32) -> Result<(), Errno> {
    // SAFETY: (1) valid fd; (2) integer argument by value; (3) checked.
    check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            VFIO_SET_IOMMU,
            model as libc::c_ulong,
        )
    })?;
    Ok(())
}

/// `VFIO_GROUP_UNSET_CONTAINER`: take `group` out of its container
/// (`EBUSY` while a device fd of the group is open).
pub(crate) fn group_unset_container(group: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: (1) valid fd; (2) no argument, no memory touched; (3) checked.
    check(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_UNSET_CONTAINER) })?;
    Ok(())
}

/// `VFIO_GROUP_GET_STATUS` on a group.
pub(crate) fn group_get_status(group: BorrowedFd<'_>) -> Result<vfio_group_status, Errno> {
    let mut status = vfio_group_status {
        argsz: argsz::<vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: (1) valid fd; (2) `status` lives in this frame and is the
    // struct the request reads and writes; (3) checked before use.
    check(unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            VFIO_GROUP_GET_STATUS,
            &mut status as *mut vfio_group_status,
        )
    })?;
    Ok(status)
}

/// `VFIO_GROUP_SET_CONTAINER`: put `group` into `container`.
pub(crate) fn group_set_container(
    group: BorrowedFd<'_>,
    container: BorrowedFd<'_>,
) -> Result<(), Errno> {
    let container_fd: libc::c_int = container.as_raw_fd();
    // SAFETY: (1) both fds valid; (2) the kernel reads one int through the
    // pointer, which points at `container_fd` in this frame; (3) checked.
    check(unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            VFIO_GROUP_SET_CONTAINER,
            &container_fd as *const libc::c_int,
        )
    })?;
    Ok(())
}

/// `VFIO_GROUP_GET_DEVICE_FD`: open device `name` (its PCI address) of
/// `group`.
pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    // SAFETY: (1) valid fd; (2) the kernel reads a NUL-terminated string,
    // which `name` is, alive for the call; (3) checked.
    let fd =
        check(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) })?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_GET_INFO` (base struct only; capabilities are not read).
pub(crate) fn device_get_info(device: BorrowedFd<'_>) -> Result<vfio_device_info, Errno> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: (1) valid fd; (2) `info` is the request's struct, in this
    // frame, with `argsz` telling the kernel its size; (3) checked.
    check(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            VFIO_DEVICE_GET_INFO,
            &mut info as *mut vfio_device_info,
        )
    })?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (base struct only).
pub(crate) fn device_get_region_info(
    device: BorrowedFd<'_>,
    index: u32,
) -> Result<vfio_region_info, Errno> {
    let mut info = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: (1) valid fd; (2) `info` is the request's struct, in this
    // frame, with `argsz` telling the kernel its size; (3) checked.
    check(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            VFIO_DEVICE_GET_REGION_INFO,
            &mut info as *mut vfio_region_info,
        )
    })?;
    Ok(info)
}

/// A VFIO device command `request` whose argument is the struct in `buf`.
///
/// # Safety
///
/// `request` must be a VFIO device command that reads and writes its
/// argument only within the `argsz` it finds in its first `u32`, and that
/// `argsz` must be at most `buf.len()`.
pub(crate) unsafe fn device_ioctl(
    device: BorrowedFd<'_>,
    request: u32,
    buf: &mut [u8],
) -> Result<i32, Errno> {
    // SAFETY: (1) valid fd; (2) `buf` is exclusively borrowed for the call
    // and, by the contract above, the command stays within it; (3)
    // checked.
    check(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            request as libc::c_ulong,
            buf.as_mut_ptr(),
        )
    })
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: (1) valid fd; (2) the request takes no argument; (3) checked.
    check(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_RESET) })?;
    Ok(())
}

/// `VFIO_IOMMU_GET_INFO` into `buf`, whose first field (`argsz`) is set to
/// the buffer's length here; the kernel writes at most that many bytes.
pub(crate) fn iommu_get_info(container: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(), Errno> {
    let base = std::mem::size_of::<vfio_bindings::bindings::vfio::vfio_iommu_type1_info>();
    if buf.len() < base {
        return Err(Errno::EINVAL);
    }
    let len = u32::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: (1) valid fd; (2) `buf` is at least the base struct and its
    // `argsz` field says exactly how long it is, so the kernel copies no
    // more than `buf.len()` bytes back (it reads and writes with
    // copy_{from,to}_user, which need no alignment); (3) checked.
    check(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) })?;
    Ok(())
}

/// `VFIO_IOMMU_MAP_DMA`.
///
/// # Safety
///
/// The kernel pins the pages of this process at `map.vaddr` and lets the
/// device read (and write, with the WRITE flag) them: no Rust reference may
/// point into `[map.vaddr, map.vaddr + map.size)` while it is mapped (the
/// crate maps only its own aliases of client memory, which it touches
/// through raw addresses and `/proc/self/mem` only).
pub(crate) unsafe fn iommu_map_dma(
    container: BorrowedFd<'_>,
    map: &vfio_iommu_type1_dma_map,
) -> Result<(), Errno> {
    // SAFETY: (1) valid fd; (2) the kernel only reads `map`, which lives for
    // the call; the memory at `map.vaddr` is looked up by the kernel, which
    // fails with EFAULT if it is not mapped; (3) checked.
    check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            VFIO_IOMMU_MAP_DMA,
            map as *const vfio_iommu_type1_dma_map,
        )
    })?;
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA`; the kernel writes the unmapped size back into
/// `unmap.size`, hence `&mut`.
pub(crate) fn iommu_unmap_dma(
    container: BorrowedFd<'_>,
    unmap: &mut vfio_iommu_type1_dma_unmap,
) -> Result<(), Errno> {
    // SAFETY: (1) valid fd; (2) `unmap` is the request's struct (no bitmap
    // flag is ever set, so the kernel reads nothing past it) and lives for
    // the call; (3) checked before `size` is read.
    check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            VFIO_IOMMU_UNMAP_DMA,
            unmap as *mut vfio_iommu_type1_dma_unmap,
        )
    })?;
    Ok(())
}

/// A shared mapping of a file in this process, unmapped on drop.
///
/// It is only ever used through its address (by the kernel for DMA, by
/// tests through `/proc/self/mem`); no Rust reference points into it.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    addr: usize,
    len: usize,
}

impl SharedMapping {
    /// Map `len` bytes of `fd` at file offset `offset`, `MAP_SHARED`.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        read: bool,
        write: bool,
        offset: u64,
    ) -> Result<Self, Errno> {
        let mut prot = libc::PROT_NONE;
        if read {
            prot |= libc::PROT_READ;
        }
        if write {
            prot |= libc::PROT_WRITE;
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        // SAFETY: a new mapping at an address the kernel chooses (addr NULL,
        // no MAP_FIXED) cannot overlap any existing memory of this process;
        // the fd is valid; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(SharedMapping {
            addr: ptr as usize,
            len,
        })
    }

    /// Start address in this process.
    pub(crate) fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Fill the page tables of `[offset, offset + len)` of the mapping with
    /// read faults (`MADV_POPULATE_READ`, Linux 5.14+; `EINVAL` before).
    /// A read fault on a shared file mapping maps a whole fault-around
    /// window (64 KiB by default), writable when the file needs no write
    /// notification (shmem, hugetlbfs), where the pin of
    /// `VFIO_IOMMU_MAP_DMA` on a fresh mapping takes a write fault per
    /// page. Changes no memory and no mapping.
    pub(crate) fn populate_read(&self, offset: usize, len: usize) -> Result<(), Errno> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Errno::EINVAL);
        }
        // SAFETY: the range lies inside this object's own mapping, which no
        // Rust reference points into; populating only fills its page
        // tables (allocating file pages where the file has none yet).
        check(unsafe {
            libc::madvise(
                (self.addr + offset) as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_READ,
            )
        })?;
        Ok(())
    }

    /// Make the mapping read-only (tests split an area in two with it).
    #[cfg(test)]
    pub(crate) fn protect_read_only(&self, offset: usize, len: usize) -> Result<(), Errno> {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: the range lies inside this object's own mapping, which no
        // Rust reference points into; only its protection changes.
        check(unsafe {
            libc::mprotect(
                (self.addr + offset) as *mut libc::c_void,
                len,
                libc::PROT_READ,
            )
        })?;
        Ok(())
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is exactly a mapping this object created and
        // owns; nothing holds a reference into it.
        let ret = unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        if ret != 0 {
            tracing::error!(
                addr = self.addr,
                len = self.len,
                "munmap of an alias failed: {}",
                Errno::last()
            );
        }
    }
}

/// Give the calling thread the lowest priority of normal scheduling
/// (nice 19); the process's other threads keep theirs (on Linux a thread
/// id names one thread for `setpriority`).
pub(crate) fn lower_own_priority() -> Result<(), Errno> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: plain integers in, nothing borrowed; checked.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if ret != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Whether task `tid` (a process or thread id) has `CAP_IPC_LOCK` in its
/// effective set (`capget(2)`).
pub(crate) fn has_cap_ipc_lock(tid: libc::pid_t) -> Result<bool, Errno> {
    /// `struct __user_cap_header_struct` of `<linux/capability.h>`.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    /// `struct __user_cap_data_struct`; version 3 fills two of them.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: tid,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads `header` and writes two `Data` (the size version
    // 3 implies) into `data`; both live in this frame; checked.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(Errno::last());
    }
    Ok(data[0].effective & (1 << CAP_IPC_LOCK) != 0)
}

/// `struct procmap_query` of `<linux/fs.h>` (Linux 6.11+): one area of a
/// process, asked by address of its `/proc/<pid>/maps` file.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct ProcmapQuery {
    pub size: u64,
    pub query_flags: u64,
    pub query_addr: u64,
    pub vma_start: u64,
    pub vma_end: u64,
    pub vma_flags: u64,
    pub vma_page_size: u64,
    pub vma_offset: u64,
    pub inode: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub vma_name_size: u32,
    pub build_id_size: u32,
    pub vma_name_addr: u64,
    pub build_id_addr: u64,
}

const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);

/// `vma_flags` bits of [`ProcmapQuery`].
pub(crate) const PROCMAP_QUERY_VMA_READABLE: u64 = 0x01;
pub(crate) const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;
pub(crate) const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
pub(crate) const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;

/// `PROCMAP_QUERY`, `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong =
    nix::request_code_readwrite!(b'f', 17, std::mem::size_of::<ProcmapQuery>()) as libc::c_ulong;

/// `PROCMAP_QUERY` on an open `/proc/<pid>/maps`: the area containing
/// `query.query_addr` (`ENOENT` if none), its name copied into `name`.
/// `ENOTTY` on kernels before 6.11.
pub(crate) fn procmap_query(
    maps: BorrowedFd<'_>,
    addr: u64,
    name: &mut [u8],
) -> Result<ProcmapQuery, Errno> {
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr,
        vma_name_size: u32::try_from(name.len()).unwrap_or(u32::MAX),
        vma_name_addr: name.as_mut_ptr() as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: (1) valid fd; (2) `q` is the request's struct and lives for
    // the call; the kernel writes at most `vma_name_size` bytes to `name`,
    // which is borrowed mutably for the call, and no build id (size 0);
    // (3) checked before any output is used.
    check(unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY, &mut q as *mut ProcmapQuery) })?;
    Ok(q)
}

/// The soft `RLIMIT_MEMLOCK` of process `pid`; `None` when unlimited.
pub(crate) fn memlock_soft_limit(pid: libc::pid_t) -> Result<Option<u64>, Errno> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: no new limit is passed (NULL); the old one is written into
    // `old`, which lives in this frame; checked.
    check(unsafe { libc::prlimit(pid, libc::RLIMIT_MEMLOCK, std::ptr::null(), &mut old) })?;
    Ok((old.rlim_cur != libc::RLIM_INFINITY).then_some(old.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Every wrapper fails cleanly with EBADF-like errors on a file that is
    /// not a VFIO fd, instead of misbehaving.
    #[test]
    fn wrappers_on_a_non_vfio_file_fail_with_the_kernels_errno() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_fd();
        assert_eq!(get_api_version(fd), Err(Errno::ENOTTY));
        assert_eq!(check_extension(fd, 3), Err(Errno::ENOTTY));
        assert_eq!(group_get_status(fd).unwrap_err(), Errno::ENOTTY);
        assert_eq!(device_get_region_info(fd, 0).unwrap_err(), Errno::ENOTTY);
        let mut buf = [0u8; 24];
        assert_eq!(iommu_get_info(fd, &mut buf), Err(Errno::ENOTTY));
        let mut short = [0u8; 8];
        assert_eq!(iommu_get_info(fd, &mut short), Err(Errno::EINVAL));
    }

    /// The limit the kernel reports in `/proc/self/limits`.
    #[test]
    fn own_memlock_limit_matches_proc_limits() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let soft = line["Max locked memory".len()..]
            .split_whitespace()
            .next()
            .unwrap();
        let expect = (soft != "unlimited").then(|| soft.parse::<u64>().unwrap());
        assert_eq!(memlock_soft_limit(std::process::id() as i32), Ok(expect));
        assert_eq!(memlock_soft_limit(i32::MAX), Err(Errno::ESRCH));
    }

    /// capget agrees with the CapEff line of /proc/<tid>/status, for this
    /// process and for one of its threads; a task that does not exist is
    /// ESRCH.
    #[test]
    fn cap_ipc_lock_matches_capeff_in_proc() {
        fn capeff_has_ipc_lock(tid: i32) -> bool {
            let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap();
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .unwrap();
            u64::from_str_radix(hex.trim(), 16).unwrap() & (1 << 14) != 0
        }
        let me = std::process::id() as i32;
        assert_eq!(has_cap_ipc_lock(me), Ok(capeff_has_ipc_lock(me)));
        assert_eq!(has_cap_ipc_lock(i32::MAX), Err(Errno::ESRCH));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw()).unwrap();
            done_rx.recv().unwrap();
        });
        let live = rx.recv().unwrap();
        assert_eq!(has_cap_ipc_lock(live), Ok(capeff_has_ipc_lock(live)));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
