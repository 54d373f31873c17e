//! Pinning a client's own memory: the client's thread, stopped by
//! `syscall-inject` on its way out of a request, issues
//! `VFIO_IOMMU_MAP_DMA` itself, on a copy of the daemon's container that
//! the daemon brought into it. Type1 then pins the client's pages
//! (`current->mm`: heap, stack, anonymous or file `MAP_PRIVATE` memory all
//! work) and charges them to the client's `locked_vm` against its own
//! `RLIMIT_MEMLOCK` (or not at all if it has `CAP_IPC_LOCK`), exactly as
//! for a program using VFIO itself.
//!
//! - [`bring_container`] puts the container into the client once,
//!   close-on-exec: the client `socket`s and `connect`s to a daemon-private
//!   abstract Unix socket (name random, one per transfer, and the peer's
//!   pid checked with `SO_PEERCRED`), the daemon sends the container with
//!   `SCM_RIGHTS`, the client `recvmsg`s it with `MSG_CMSG_CLOEXEC` and
//!   `close`s the socket.
//! - [`map_dma_as_client`] checks (`kcmp(KCMP_FILE)`) that the client's fd
//!   number still is that container (a client may `close` or `dup2` over
//!   it; it is then brought again), and injects the map with the client's
//!   own address. The kernel's result comes back unchanged (`EFAULT`,
//!   `ENOMEM` over the limit, `EEXIST`, ...).
//! - Unmapping needs none of this: type1 unpins from any holder of the
//!   container ([`crate::VfioLegacy::unmap_dma`] on the daemon's fd).
//!
//! The copy in the client is a real container fd: the client can map,
//! unmap and query it directly. It reaches only what the container holds,
//! so a container must hold the groups of one client only.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

use ioasid_engine::backend::Prot;
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sendmsg, sockopt, ControlMessage, MsgFlags};
use syscall_inject::Stopped;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
};

use crate::error::{Error, Result};
use crate::ioctls::VFIO_IOMMU_MAP_DMA;

/// A file descriptor number in one client process that held a given
/// container when it was last checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFd {
    /// The client process.
    pub pid: i32,
    /// The descriptor number in it.
    pub fd: i32,
}

/// An address in the client's address space. The daemon never
/// dereferences it: only the client's own system call uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub u64);

/// One `VFIO_IOMMU_MAP_DMA` of client memory, issued by the client.
#[derive(Debug, Clone, Copy)]
pub struct ClientDmaMap {
    /// The IO virtual address.
    pub iova: u64,
    /// The client's memory.
    pub vaddr: ClientAddr,
    /// Bytes.
    pub size: u64,
    /// Device access.
    pub prot: Prot,
}

fn inject_err(e: syscall_inject::Error) -> Error {
    Error::new(e.errno(), e.to_string())
}

/// An injected call that failed: its errno; `ENOSYS`, `EPERM` and `EACCES`
/// from calls that need no permission are a seccomp filter or an LSM.
fn call_failed(stopped: &Stopped, call: &'static str, ret: i64) -> Error {
    let errno = Errno::from_raw(-ret as i32);
    if matches!(errno, Errno::ENOSYS | Errno::EPERM | Errno::EACCES) {
        inject_err(syscall_inject::Error::Blocked {
            tid: stopped.tid(),
            call,
            errno,
        })
    } else {
        Error::new(
            errno,
            format!(
                "{call} injected into thread {} failed: {errno}",
                stopped.tid()
            ),
        )
    }
}

fn syscall(stopped: &mut Stopped, nr: i64, args: &[u64]) -> Result<i64> {
    stopped.syscall(nr, args).map_err(inject_err)
}

/// Make sure the stopped client holds `container` and return its fd number
/// there: `known` if `kcmp` says it still is that container, otherwise a
/// new close-on-exec copy brought in over a Unix socket.
pub fn ensure_container(
    stopped: &mut Stopped,
    container: BorrowedFd<'_>,
    known: Option<ClientFd>,
) -> Result<ClientFd> {
    if let Some(k) = known.filter(|k| k.pid == stopped.pid()) {
        if stopped.same_file(k.fd, container).map_err(inject_err)? {
            return Ok(k);
        }
        tracing::debug!(
            pid = k.pid,
            fd = k.fd,
            "the client's container fd was closed or replaced; bringing it again"
        );
    }
    bring_container(stopped, container)
}

/// Bring a close-on-exec copy of `container` into the stopped client and
/// return its number there.
pub fn bring_container(stopped: &mut Stopped, container: BorrowedFd<'_>) -> Result<ClientFd> {
    let name = format!(
        "cuse-ioasid-fd-{}-{:016x}",
        std::process::id(),
        random_u64()
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| Error::io(&e, "abstract socket name"))?;
    let listener = UnixListener::bind_addr(&addr)
        .map_err(|e| Error::io(&e, format!("binding the fd-transfer socket @{name}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(&e, "O_NONBLOCK on the fd-transfer socket"))?;

    // struct sockaddr_un for the abstract name: family, NUL, name.
    let mut sun = Vec::with_capacity(3 + name.len());
    sun.extend_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    sun.push(0);
    sun.extend_from_slice(name.as_bytes());
    let sun_addr = stopped.put(&sun).map_err(inject_err)?;

    let ret = syscall(
        stopped,
        libc::SYS_socket,
        &[
            libc::AF_UNIX as u64,
            (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64,
            0,
        ],
    )?;
    if ret < 0 {
        return Err(call_failed(stopped, "socket", ret));
    }
    let sock = ret as u64;
    let result = transfer(stopped, container, &listener, sock, sun_addr, sun.len());
    // The socket goes in every case.
    let closed = syscall(stopped, libc::SYS_close, &[sock]);
    let fd = result?;
    closed?;
    let there = ClientFd {
        pid: stopped.pid(),
        fd,
    };
    if !stopped.same_file(fd, container).map_err(inject_err)? {
        return Err(Error::new(
            Errno::EIO,
            format!(
                "fd {fd} received by thread {} is not the container sent",
                stopped.tid()
            ),
        ));
    }
    tracing::debug!(pid = there.pid, fd, "container brought into the client");
    Ok(there)
}

/// Connect, send, receive: the received fd number in the client.
fn transfer(
    stopped: &mut Stopped,
    container: BorrowedFd<'_>,
    listener: &UnixListener,
    sock: u64,
    sun_addr: u64,
    sun_len: usize,
) -> Result<i32> {
    let ret = syscall(
        stopped,
        libc::SYS_connect,
        &[sock, sun_addr, sun_len as u64],
    )?;
    if ret < 0 {
        let failed = call_failed(stopped, "connect", ret);
        if failed.errno != Errno::ECONNREFUSED {
            return Err(failed);
        }
        // The name is bound: the client cannot see it.
        return Err(Error::new(
            Errno::EFAULT,
            format!(
                "{}: the client runs in another network namespace than the daemon (abstract \
                 Unix sockets, over which its thread receives the VFIO container, do not cross \
                 them; a systemd unit with PrivateNetwork= does this), so its private memory \
                 cannot be pinned; use shared memory (memfd, shm, MAP_SHARED) or run both in \
                 one network namespace",
                failed.message
            ),
        ));
    }
    // Its connection is queued now; strangers who raced to our name are
    // dropped (the abstract namespace is visible to every process), at
    // most a backlog's worth, and told in one line.
    let mut strangers = 0u32;
    let conn = loop {
        let (conn, _) = listener.accept().map_err(|e| {
            Error::io(
                &e,
                "the client's connection to the fd-transfer socket is not there",
            )
        })?;
        let cred = getsockopt(&conn, sockopt::PeerCredentials)
            .map_err(|e| Error::new(e, "SO_PEERCRED on the fd-transfer connection"))?;
        if cred.pid() == stopped.pid() {
            break conn;
        }
        strangers += 1;
    };
    if strangers > 0 {
        tracing::warn!(
            strangers,
            "processes other than the client connected to the fd-transfer socket; dropped"
        );
    }
    let fds = [container.as_raw_fd()];
    sendmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &[std::io::IoSlice::new(b"c")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| Error::new(e, "sending the container fd (SCM_RIGHTS)"))?;

    // The client's recvmsg: one data byte and room for one fd.
    // SAFETY: CMSG_SPACE only computes a size.
    let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let data_addr = stopped.put(&[0u8; 8]).map_err(inject_err)?;
    let cmsg_addr = stopped.put(&vec![0u8; cmsg_space]).map_err(inject_err)?;
    let mut iov = Vec::with_capacity(16);
    iov.extend_from_slice(&data_addr.to_ne_bytes());
    iov.extend_from_slice(&1u64.to_ne_bytes());
    let iov_addr = stopped.put(&iov).map_err(inject_err)?;
    // struct msghdr: name, namelen(+pad), iov, iovlen, control,
    // controllen, flags(+pad).
    let mut hdr = Vec::with_capacity(56);
    hdr.extend_from_slice(&0u64.to_ne_bytes());
    hdr.extend_from_slice(&0u64.to_ne_bytes());
    hdr.extend_from_slice(&iov_addr.to_ne_bytes());
    hdr.extend_from_slice(&1u64.to_ne_bytes());
    hdr.extend_from_slice(&cmsg_addr.to_ne_bytes());
    hdr.extend_from_slice(&(cmsg_space as u64).to_ne_bytes());
    hdr.extend_from_slice(&0u64.to_ne_bytes());
    let hdr_addr = stopped.put(&hdr).map_err(inject_err)?;
    let ret = syscall(
        stopped,
        libc::SYS_recvmsg,
        &[sock, hdr_addr, libc::MSG_CMSG_CLOEXEC as u64],
    )?;
    if ret < 0 {
        return Err(call_failed(stopped, "recvmsg", ret));
    }
    let mut back = [0u8; 56];
    stopped.read(hdr_addr, &mut back).map_err(inject_err)?;
    let msg_flags = i32::from_ne_bytes(back[48..52].try_into().unwrap_or_default());
    let mut cmsg = vec![0u8; cmsg_space];
    stopped.read(cmsg_addr, &mut cmsg).map_err(inject_err)?;
    // struct cmsghdr: len (u64), level (i32), type (i32), data.
    let level = i32::from_ne_bytes(cmsg[8..12].try_into().unwrap_or_default());
    let kind = i32::from_ne_bytes(cmsg[12..16].try_into().unwrap_or_default());
    if msg_flags & libc::MSG_CTRUNC != 0 || level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
        // MSG_CTRUNC: the client is out of file descriptors.
        return Err(Error::new(
            Errno::EMFILE,
            format!(
                "thread {} could not receive the container fd (flags {msg_flags:#x}): is the \
                 client at its RLIMIT_NOFILE?",
                stopped.tid()
            ),
        ));
    }
    Ok(i32::from_ne_bytes(
        cmsg[16..20].try_into().unwrap_or_default(),
    ))
}

/// A random number for socket names (not secret: the peer's pid is what
/// authenticates the connection).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: the kernel writes at most 8 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// Map `map` in `container` by the stopped client's own
/// `VFIO_IOMMU_MAP_DMA`, bringing the container into the client first if
/// `known` no longer names it there. Returns the fd number to remember.
/// On failure the errno is the kernel's (or `EFAULT` for a refused
/// injection), the message says which.
pub fn map_dma_as_client(
    stopped: &mut Stopped,
    container: BorrowedFd<'_>,
    known: Option<ClientFd>,
    map: &ClientDmaMap,
) -> Result<ClientFd> {
    let at = ensure_container(stopped, container, known)?;
    issue_map(stopped, at, map)?;
    Ok(at)
}

/// Have the stopped client issue `VFIO_IOMMU_MAP_DMA` for `map` on its fd
/// `at` (a container, see [`ensure_container`]). The errno is the
/// kernel's, the message says which call failed and why it may have.
pub fn issue_map(stopped: &mut Stopped, at: ClientFd, map: &ClientDmaMap) -> Result<()> {
    let mut flags = 0;
    if map.prot.read {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if map.prot.write {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    let argsz = std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32;
    let mut bytes = Vec::with_capacity(argsz as usize);
    bytes.extend_from_slice(&argsz.to_ne_bytes());
    bytes.extend_from_slice(&flags.to_ne_bytes());
    bytes.extend_from_slice(&map.vaddr.0.to_ne_bytes());
    bytes.extend_from_slice(&map.iova.to_ne_bytes());
    bytes.extend_from_slice(&map.size.to_ne_bytes());
    let arg = stopped.put(&bytes).map_err(inject_err)?;
    let ret = syscall(
        stopped,
        libc::SYS_ioctl,
        &[at.fd as u64, VFIO_IOMMU_MAP_DMA, arg],
    )?;
    if ret < 0 {
        let errno = Errno::from_raw(-ret as i32);
        let hint = match errno {
            Errno::ENOMEM => " (over the client's RLIMIT_MEMLOCK? type1 charges its locked_vm)",
            Errno::EFAULT => " (not mapped in the client, or not writable for a writable map)",
            Errno::EEXIST => " (the IOVA range is already mapped)",
            _ => "",
        };
        return Err(Error::new(
            errno,
            format!(
                "VFIO_IOMMU_MAP_DMA by client thread {} iova {:#x} size {:#x} vaddr {:#x}: \
                 {errno}{hint}",
                stopped.tid(),
                map.iova,
                map.size,
                map.vaddr.0
            ),
        ));
    }
    Ok(())
}
