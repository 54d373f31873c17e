//! The node end to end on the host: the real engine over its fake backend,
//! a fake VFIO device, a fake ioasid-fd lookup, and a caller made of a byte
//! buffer (plus one test through `cuse_server::Device` with this process as
//! the caller).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cuse_server::{Device, IoctlArgs, Offset, OffsetError, Request};
use ioasid_engine::fake::FakeBackend;
use ioasid_engine::{ContextId, DeviceId, DeviceSpec, Engine};
use ioasid_uapi::vfio as nr;
use ioasid_uapi::{
    VfioAttachIoasid, IOASID_ATTACH_USER_PASID, VFIO_ATTACH_IOASID, VFIO_BIND_IOASID_FD,
    VFIO_DETACH_IOASID, VFIO_UNBIND_IOASID_FD,
};
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_CAP_TYPE,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};
use zerocopy::IntoBytes;

use crate::error::Result;
use crate::node::{DeviceNode, DeviceNodes};
use crate::testing::*;
use ioctl_table::fake::FakeCaller;

const DEV_A: DeviceId = DeviceId(1); // group 3
const DEV_X: DeviceId = DeviceId(10); // group 7
const DEV_Y: DeviceId = DeviceId(11); // group 7

/// Caller memory: the argument struct lives at ARG.
const ARG: u64 = 0x5000_0000;

// ---- fixture -------------------------------------------------------------

struct Fx {
    engine: Arc<Engine>,
    opener: Arc<FakeOpener>,
    lookup: Arc<FakeLookup>,
    nodes: DeviceNodes,
}

impl Fx {
    fn new() -> Self {
        let fake = Arc::new(FakeBackend::new());
        let dev = |id, name: &str, group| DeviceSpec {
            id,
            name: name.to_string(),
            group,
        };
        let engine = Engine::new(
            fake,
            vec![
                dev(DEV_A, "0000:00:03.0", 3),
                dev(DEV_X, "0000:01:01.0", 7),
                dev(DEV_Y, "0000:01:02.0", 7),
            ],
        )
        .unwrap();
        let opener = Arc::new(FakeOpener::default());
        let lookup = Arc::new(FakeLookup::default());
        let nodes = DeviceNodes::with_parts(engine.clone(), opener.clone(), lookup.clone());
        Fx {
            engine,
            opener,
            lookup,
            nodes,
        }
    }

    fn node(&self, id: DeviceId) -> Arc<DeviceNode> {
        self.nodes.node(id).unwrap()
    }

    /// A new context and a file standing for its ioasid fd.
    fn context(&self) -> (ContextId, OwnedFd) {
        let ctx = self.engine.open_context();
        let f =
            nix::sys::memfd::memfd_create(c"ioasid", nix::sys::memfd::MFdFlags::empty()).unwrap();
        self.lookup
            .contexts
            .lock()
            .unwrap()
            .insert(inode(f.as_fd()).unwrap(), ctx);
        (ctx, f)
    }
}

/// A caller whose memory is `mem` at ARG, holding `fds` as (number, file).
fn caller(mem: Vec<u8>, fds: &[(i32, &OwnedFd)]) -> FakeCaller {
    let mut c = FakeCaller::new(ARG, mem, 1);
    for (n, f) in fds {
        c.hold(*n, f);
    }
    c
}

fn ioctl(node: &DeviceNode, c: &FakeCaller, fh: u64, cmd: u32, arg: u64) -> Result<i32> {
    node.handle_ioctl(c, fh, cmd, arg)
}

fn errno(r: Result<impl std::fmt::Debug>) -> Errno {
    r.unwrap_err().errno
}

fn bind(node: &DeviceNode, fh: u64, file: &OwnedFd) -> Result<i32> {
    let c = caller(vec![], &[(5, file)]);
    ioctl(node, &c, fh, VFIO_BIND_IOASID_FD, 5)
}

fn attach_arg(ioasid: u32, pasid: Option<u32>) -> Vec<u8> {
    VfioAttachIoasid {
        argsz: 16,
        flags: if pasid.is_some() {
            IOASID_ATTACH_USER_PASID
        } else {
            0
        },
        ioasid,
        user_pasid: pasid.unwrap_or(0),
    }
    .as_bytes()
    .to_vec()
}

fn region_info_arg(index: u32, argsz: u32) -> Vec<u8> {
    let mut b = vec![0u8; argsz.max(32) as usize];
    put32(&mut b, 0, argsz);
    put32(&mut b, 8, index);
    b
}

fn at(pos: u64) -> Offset {
    Offset::At(pos)
}

// ---- tests ---------------------------------------------------------------

#[test]
fn unbound_node_refuses_everything_but_bind() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let c = caller(region_info_arg(0, 32), &[]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_INFO, ARG)),
        Errno::EINVAL
    );
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG)),
        Errno::EINVAL
    );
    assert_eq!(
        errno(node.handle_ioctl(&c, 1, nr::VFIO_DEVICE_RESET, 0)),
        Errno::EINVAL
    );
    assert_eq!(errno(node.handle_read(1, 4, &at(BAR0))), Errno::EINVAL);
    assert_eq!(errno(node.handle_write(1, &[1], &at(BAR0))), Errno::EINVAL);
    let c = caller(attach_arg(1, None), &[]);
    let e = ioctl(&node, &c, 1, VFIO_ATTACH_IOASID, ARG).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(e.message.contains("not bound"), "{}", e.message);
    let (_ctx, file) = fx.context();
    let c = caller(vec![], &[(5, &file)]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, VFIO_UNBIND_IOASID_FD, 5)),
        Errno::EINVAL
    );
    // Not a VFIO device command at all: ENOTTY, bound or not.
    assert_eq!(errno(ioctl(&node, &c, 1, 0x1234, 0)), Errno::ENOTTY);
    assert_eq!(fx.opener.log(DEV_A).opens.load(Ordering::SeqCst), 0);
}

#[test]
fn bind_resolves_the_callers_fd() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (ctx, file) = fx.context();
    // Not open in the caller: EBADF; negative: EBADF.
    let c = caller(vec![], &[(5, &file)]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, VFIO_BIND_IOASID_FD, 6)),
        Errno::EBADF
    );
    assert_eq!(
        errno(ioctl(&node, &c, 1, VFIO_BIND_IOASID_FD, -1i64 as u64)),
        Errno::EBADF
    );
    assert_eq!(
        errno(ioctl(&node, &c, 1, VFIO_BIND_IOASID_FD, 1 << 40)),
        Errno::EBADF
    );
    // A foreign file: EINVAL.
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let c = caller(vec![], &[(7, &pipe_r)]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, VFIO_BIND_IOASID_FD, 7)),
        Errno::EINVAL
    );
    assert_eq!(node.bound_context(), None);
    assert_eq!(fx.engine.bound_context(DEV_A), None);
    // The real thing.
    assert_eq!(bind(&node, 1, &file).unwrap(), 0);
    assert_eq!(node.bound_context(), Some(ctx));
    assert_eq!(fx.engine.bound_context(DEV_A), Some(ctx));
    assert_eq!(fx.opener.log(DEV_A).opens.load(Ordering::SeqCst), 1);
}

#[test]
fn one_binding_at_a_time() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (ctx1, f1) = fx.context();
    let (_ctx2, f2) = fx.context();
    bind(&node, 1, &f1).unwrap();
    // Again from the same open file, from another open file, to another context.
    assert_eq!(errno(bind(&node, 1, &f1)), Errno::EBUSY);
    assert_eq!(errno(bind(&node, 2, &f1)), Errno::EBUSY);
    assert_eq!(errno(bind(&node, 2, &f2)), Errno::EBUSY);
    assert_eq!(fx.engine.bound_context(DEV_A), Some(ctx1));
    // Another open file may not use the device.
    let c = caller(region_info_arg(0, 32), &[]);
    assert_eq!(
        errno(ioctl(&node, &c, 2, nr::VFIO_DEVICE_GET_INFO, ARG)),
        Errno::EINVAL
    );
    assert_eq!(errno(node.handle_read(2, 4, &at(BAR0))), Errno::EINVAL);
    assert!(node.handle_read(1, 4, &at(BAR0)).is_ok());
    assert_eq!(fx.opener.log(DEV_A).opens.load(Ordering::SeqCst), 1);
}

#[test]
fn group_ownership_and_open_failure() {
    let fx = Fx::new();
    let (_c1, f1) = fx.context();
    let (_c2, f2) = fx.context();
    bind(&fx.node(DEV_X), 1, &f1).unwrap();
    // Y shares X's group: another context may not bind it.
    let e = bind(&fx.node(DEV_Y), 1, &f2).unwrap_err();
    assert_eq!(e.errno, Errno::EBUSY);
    assert!(e.message.contains("IOMMU group"), "{}", e.message);
    bind(&fx.node(DEV_Y), 1, &f1).unwrap();
    // The device cannot be opened: the bind is rolled back.
    *fx.opener.fail.lock().unwrap() = Some(Errno::EBUSY);
    let node = fx.node(DEV_A);
    assert_eq!(errno(bind(&node, 1, &f2)), Errno::EBUSY);
    assert_eq!(fx.engine.bound_context(DEV_A), None);
    *fx.opener.fail.lock().unwrap() = None;
    bind(&node, 1, &f2).unwrap();
}

#[test]
fn unbind_release_and_reuse() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let log = fx.opener.log(DEV_A);
    let (ctx1, f1) = fx.context();
    let (_ctx2, f2) = fx.context();
    bind(&node, 1, &f1).unwrap();
    let io = fx.engine.alloc(ctx1).unwrap();
    let c = caller(attach_arg(io, None), &[]);
    ioctl(&node, &c, 1, VFIO_ATTACH_IOASID, ARG).unwrap();
    // Unbind naming another ioasid fd, or from another open file: EINVAL.
    let c = caller(vec![], &[(5, &f2)]);
    let e = ioctl(&node, &c, 1, VFIO_UNBIND_IOASID_FD, 5).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(e.message.contains("not the ioasid fd"), "{}", e.message);
    let c = caller(vec![], &[(5, &f1)]);
    assert_eq!(
        errno(ioctl(&node, &c, 2, VFIO_UNBIND_IOASID_FD, 5)),
        Errno::EINVAL
    );
    assert_eq!(log.closes.load(Ordering::SeqCst), 0);
    // The right one: detached, unbound, device closed.
    ioctl(&node, &c, 1, VFIO_UNBIND_IOASID_FD, 5).unwrap();
    assert_eq!(fx.engine.bound_context(DEV_A), None);
    assert!(fx.engine.info(ctx1, io).unwrap().devices.is_empty());
    assert_eq!(log.closes.load(Ordering::SeqCst), 1);
    assert_eq!(errno(node.handle_read(1, 4, &at(BAR0))), Errno::EINVAL);
    // Bind again from a new open file; release of another file does nothing.
    bind(&node, 3, &f2).unwrap();
    node.handle_release(1);
    assert!(node.bound_context().is_some());
    node.handle_release(3);
    assert_eq!(node.bound_context(), None);
    assert_eq!(fx.engine.bound_context(DEV_A), None);
    assert_eq!(log.closes.load(Ordering::SeqCst), 2);
    assert_eq!(log.opens.load(Ordering::SeqCst), 2);
    // Reusable.
    bind(&node, 4, &f1).unwrap();
}

#[test]
fn context_closed_closes_the_device() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let log = fx.opener.log(DEV_A);
    let (ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    let closed = fx.engine.close_context(ctx).unwrap();
    assert_eq!(closed.unbound, vec![DEV_A]);
    fx.nodes.on_context_closed(&closed);
    assert_eq!(log.closes.load(Ordering::SeqCst), 1);
    assert_eq!(node.bound_context(), None);
    // The old open file is now unbound; release later is harmless.
    assert_eq!(errno(node.handle_read(1, 4, &at(BAR0))), Errno::EINVAL);
    node.handle_release(1);
    assert_eq!(log.closes.load(Ordering::SeqCst), 1);
    let (_ctx2, f2) = fx.context();
    bind(&node, 2, &f2).unwrap();
}

#[test]
fn a_vanished_context_is_noticed_without_the_hook() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    fx.engine.close_context(ctx).unwrap();
    assert_eq!(errno(node.handle_read(1, 4, &at(BAR0))), Errno::EINVAL);
    assert_eq!(fx.opener.log(DEV_A).closes.load(Ordering::SeqCst), 1);
    let (_ctx2, f2) = fx.context();
    bind(&node, 2, &f2).unwrap();
}

#[test]
fn attach_and_detach() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    let io = fx.engine.alloc(ctx).unwrap();
    let run = |cmd, mem: Vec<u8>| ioctl(&node, &caller(mem, &[]), 1, cmd, ARG);
    // Unknown IOASID: ENOENT.
    assert_eq!(
        errno(run(VFIO_ATTACH_IOASID, attach_arg(io + 5, None))),
        Errno::ENOENT
    );
    // user_pasid without the flag.
    let mut bad = attach_arg(io, None);
    put32(&mut bad, 12, 9);
    assert_eq!(errno(run(VFIO_ATTACH_IOASID, bad)), Errno::EINVAL);
    // Bad argsz, unknown flag, non-zero tail.
    let mut short = attach_arg(io, None);
    put32(&mut short, 0, 15);
    assert_eq!(errno(run(VFIO_ATTACH_IOASID, short)), Errno::EINVAL);
    let mut flag = attach_arg(io, None);
    put32(&mut flag, 4, 4);
    assert_eq!(errno(run(VFIO_ATTACH_IOASID, flag)), Errno::EINVAL);
    let mut long = attach_arg(io, None);
    put32(&mut long, 0, 24);
    long.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(errno(run(VFIO_ATTACH_IOASID, long)), Errno::E2BIG);
    // RID and PASID attachments.
    run(VFIO_ATTACH_IOASID, attach_arg(io, None)).unwrap();
    assert_eq!(
        errno(run(VFIO_ATTACH_IOASID, attach_arg(io, None))),
        Errno::EBUSY
    );
    run(VFIO_ATTACH_IOASID, attach_arg(io, Some(0x42))).unwrap();
    let devices = fx.engine.info(ctx, io).unwrap().devices;
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[1].pasid, Some(0x42));
    run(VFIO_DETACH_IOASID, attach_arg(io, Some(0x42))).unwrap();
    run(VFIO_DETACH_IOASID, attach_arg(io, None)).unwrap();
    assert!(fx.engine.info(ctx, io).unwrap().devices.is_empty());
    assert_eq!(
        errno(run(VFIO_DETACH_IOASID, attach_arg(io, None))),
        Errno::ENOENT
    );
    // A freed IOASID: ENOENT.
    fx.engine.free(ctx, io).unwrap();
    assert_eq!(
        errno(run(VFIO_ATTACH_IOASID, attach_arg(io, None))),
        Errno::ENOENT
    );
}

#[test]
fn region_info_never_advertises_mmap() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (_ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    // Big enough: the type capability survives at offset 32, alone.
    let c = caller(region_info_arg(0, 256), &[]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG).unwrap();
    let m = c.mem.borrow().clone();
    let flags = get32(&m, 4);
    assert_eq!(flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_eq!(flags & (R | W), R | W);
    assert_ne!(flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(get32(&m, 0), 256, "argsz left as given");
    let first = get32(&m, 12) as usize;
    assert_eq!(first, 64, "the sparse cap (32..64) is unlinked");
    assert_eq!(
        u16::from_ne_bytes([m[first], m[first + 1]]) as u32,
        VFIO_REGION_INFO_CAP_TYPE
    );
    assert_eq!(get32(&m, first + 4), 0);
    assert!(m[32..64].iter().all(|&b| b == 0), "sparse cap zeroed");
    assert_eq!(u64::from_ne_bytes(m[16..24].try_into().unwrap()), 0x1000);
    // Too small: CAPS, cap_offset 0, argsz raised to what the kept chain needs.
    let c = caller(region_info_arg(0, 32), &[]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG).unwrap();
    let m = c.mem.borrow().clone();
    assert_eq!(get32(&m, 0), 80);
    assert_eq!(get32(&m, 12), 0);
    assert_eq!(get32(&m, 4) & VFIO_REGION_INFO_FLAG_MMAP, 0);
    // A region without caps; a missing region is the device's EINVAL.
    let c = caller(region_info_arg(7, 32), &[]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG).unwrap();
    assert_eq!(
        u64::from_ne_bytes(c.mem.borrow()[24..32].try_into().unwrap()),
        CONFIG
    );
    let c = caller(region_info_arg(8, 32), &[]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG)),
        Errno::EINVAL
    );
    // argsz rules.
    let c = caller(region_info_arg(0, 31), &[]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG)),
        Errno::EINVAL
    );
    let c = caller(region_info_arg(0, 1 << 20), &[]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_REGION_INFO, ARG)),
        Errno::E2BIG
    );
}

#[test]
fn region_access() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (_ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    assert_eq!(
        node.handle_write(1, &[1, 2, 3, 4], &at(BAR0 + 0x10))
            .unwrap(),
        4
    );
    assert_eq!(
        node.handle_read(1, 4, &at(BAR0 + 0x10)).unwrap(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        node.handle_write(1, &[0xaa; 2], &at(CONFIG + 4)).unwrap(),
        2
    );
    assert_eq!(
        fx.opener.log(DEV_A).mem.lock().unwrap().get(&(CONFIG + 5)),
        Some(&0xaa)
    );
    // Out of bounds, across the end, a missing region, a read-only one.
    assert_eq!(
        errno(node.handle_read(1, 8, &at(BAR0 + 0xffc))),
        Errno::EINVAL
    );
    assert_eq!(
        errno(node.handle_read(1, 1, &at(BAR0 + 0x1000))),
        Errno::EINVAL
    );
    assert_eq!(errno(node.handle_read(1, 1, &at(1 << 40))), Errno::EINVAL);
    assert_eq!(errno(node.handle_write(1, &[0], &at(ROM))), Errno::EINVAL);
    assert_eq!(node.handle_read(1, 2, &at(ROM)).unwrap().len(), 2);
    // No position, unknown position.
    assert_eq!(
        errno(node.handle_read(1, 4, &Offset::Stream { within: 0 })),
        Errno::ESPIPE
    );
    let unknown = Offset::Unknown {
        within: 0,
        reason: OffsetError::NotInSyscall,
    };
    assert_eq!(errno(node.handle_write(1, &[0], &unknown)), Errno::EINVAL);
    assert!(node.handle_read(1, 0, &at(BAR0)).unwrap().is_empty());
}

#[test]
fn set_irqs_passes_the_daemons_copies() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (_ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    let ev = nix::sys::eventfd::EventFd::new().unwrap();
    let ev_fd: OwnedFd = ev.into();
    let ev_ino = inode(ev_fd.as_fd());
    let mut arg = Vec::new();
    for v in [
        32u32,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        2,
        0,
        3,
    ] {
        arg.extend_from_slice(&v.to_ne_bytes());
    }
    for fd in [40i32, -1, 40] {
        arg.extend_from_slice(&fd.to_ne_bytes());
    }
    let c = caller(arg.clone(), &[(40, &ev_fd)]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_SET_IRQS, ARG).unwrap();
    let seen = fx.opener.log(DEV_A).irq_fds.lock().unwrap().pop().unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1], (-1, None), "-1 stays -1");
    for (fd, ino) in [seen[0], seen[2]] {
        assert_ne!(fd, 40, "the caller's number is not passed");
        assert!(fd >= 0);
        assert_eq!(ino, ev_ino, "the daemon's copy is the caller's eventfd");
    }
    assert_eq!(
        c.mem.borrow().as_slice(),
        arg.as_slice(),
        "nothing written back"
    );
    // An fd the caller does not have: EBADF, nothing reaches the device.
    let mut bad = arg.clone();
    put32(&mut bad, 20, 41);
    let c = caller(bad, &[(40, &ev_fd)]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_SET_IRQS, ARG)),
        Errno::EBADF
    );
    // A count that does not fit argsz.
    let mut over = arg.clone();
    put32(&mut over, 16, 4);
    let c = caller(over, &[(40, &ev_fd)]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_SET_IRQS, ARG)),
        Errno::EINVAL
    );
    assert!(fx.opener.log(DEV_A).irq_fds.lock().unwrap().is_empty());
}

#[test]
fn forwarded_info_reset_and_hot_reset() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (_ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    let mut info = vec![0u8; 24];
    put32(&mut info, 0, 24);
    let c = caller(info, &[]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_INFO, ARG).unwrap();
    assert_eq!(
        (get32(&c.mem.borrow(), 8), get32(&c.mem.borrow(), 12)),
        (9, 5)
    );
    let mut irq = vec![0u8; 16];
    put32(&mut irq, 0, 16);
    put32(&mut irq, 8, 2);
    let c = caller(irq, &[]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_GET_IRQ_INFO, ARG).unwrap();
    assert_eq!(get32(&c.mem.borrow(), 12), 8);
    let c = caller(vec![], &[]);
    ioctl(&node, &c, 1, nr::VFIO_DEVICE_RESET, 0).unwrap();
    assert_eq!(fx.opener.log(DEV_A).resets.load(Ordering::SeqCst), 1);
    // DEV_A cannot be hot reset: the device's errno passes through.
    let mut hr = vec![0u8; 12];
    put32(&mut hr, 0, 12);
    let c = caller(hr.clone(), &[]);
    assert_eq!(
        errno(ioctl(
            &node,
            &c,
            1,
            nr::VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
            ARG
        )),
        Errno::ENODEV
    );
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_PCI_HOT_RESET, ARG)),
        Errno::ENODEV
    );
    let c = caller(vec![0; 16], &[]);
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_DEVICE_FEATURE, ARG)),
        Errno::ENOTTY
    );
    // A container command on a device node: not forwarded.
    assert_eq!(
        errno(ioctl(&node, &c, 1, nr::VFIO_SET_IOMMU, 3)),
        Errno::ENOTTY
    );
}

#[test]
fn hot_reset_info_and_hot_reset_with_the_daemons_group_fds() {
    let fx = Fx::new();
    let x = fx.node(DEV_X);
    let y = fx.node(DEV_Y);
    let (ctx1, f1) = fx.context();
    bind(&x, 1, &f1).unwrap();
    // Info: ENOSPC writes the count back; with room, both devices.
    let mut hr = vec![0u8; 12];
    put32(&mut hr, 0, 12);
    let c = caller(hr, &[]);
    assert_eq!(
        errno(ioctl(
            &x,
            &c,
            1,
            nr::VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
            ARG
        )),
        Errno::ENOSPC
    );
    assert_eq!(get32(&c.mem.borrow(), 8), 2);
    let mut hr = vec![0u8; 28];
    put32(&mut hr, 0, 28);
    let c = caller(hr, &[]);
    ioctl(&x, &c, 1, nr::VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, ARG).unwrap();
    assert_eq!(
        (get32(&c.mem.borrow(), 12), get32(&c.mem.borrow(), 20)),
        (7, 7)
    );
    // The reset: Y (same group) is not bound to this context: EPERM.
    let reset = |flags: u32, count: u32| {
        let mut b = vec![0u8; 16];
        put32(&mut b, 0, 16);
        put32(&mut b, 4, flags);
        put32(&mut b, 8, count);
        caller(b, &[])
    };
    let e = ioctl(&x, &reset(0, 0), 1, nr::VFIO_DEVICE_PCI_HOT_RESET, ARG).unwrap_err();
    assert_eq!(e.errno, Errno::EPERM);
    assert!(e.message.contains("0000:01:02.0"), "{}", e.message);
    let (_ctx2, f2) = fx.context();
    assert_eq!(errno(bind(&y, 1, &f2)), Errno::EBUSY);
    bind(&y, 1, &f1).unwrap();
    // Group fds from the client, or flags: EINVAL.
    assert_eq!(
        errno(ioctl(
            &x,
            &reset(0, 1),
            1,
            nr::VFIO_DEVICE_PCI_HOT_RESET,
            ARG
        )),
        Errno::EINVAL
    );
    assert_eq!(
        errno(ioctl(
            &x,
            &reset(1, 0),
            1,
            nr::VFIO_DEVICE_PCI_HOT_RESET,
            ARG
        )),
        Errno::EINVAL
    );
    assert!(fx.opener.log(DEV_X).hot_resets.lock().unwrap().is_empty());
    // Now allowed: the daemon passes its file of group 7, once.
    ioctl(&x, &reset(0, 0), 1, nr::VFIO_DEVICE_PCI_HOT_RESET, ARG).unwrap();
    let seen = fx.opener.log(DEV_X).hot_resets.lock().unwrap().clone();
    assert_eq!(seen, vec![vec![inode(fx.opener.groups[&7].as_fd())]]);
    assert_eq!(fx.engine.bound_context(DEV_Y), Some(ctx1));
}

/// Through `cuse_server::Device` with this process as the caller: the
/// ioasid fd and the argument structs are really copied out of a process
/// (`pidfd_getfd`, `process_vm_readv`).
#[test]
fn through_the_device_trait_with_a_real_caller() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let req = Request::for_caller(nix::unistd::gettid().as_raw() as u32, 0, 0);
    let (ctx, f) = fx.context();
    let fh = node
        .open(&req, cuse_server::OpenFlags(libc::O_RDWR as u32))
        .unwrap();
    let fh2 = node
        .open(&req, cuse_server::OpenFlags(libc::O_RDWR as u32))
        .unwrap();
    assert_ne!(fh, fh2);
    let args = |cmd, arg| IoctlArgs {
        cmd,
        arg,
        input: &[],
        out_size: 0,
    };
    let raw: RawFd = f.as_raw_fd();
    assert_eq!(
        node.ioctl(&req, fh, args(VFIO_BIND_IOASID_FD, raw as u64))
            .unwrap()
            .result,
        0
    );
    assert_eq!(node.bound_context(), Some(ctx));
    let io = fx.engine.alloc(ctx).unwrap();
    let a = VfioAttachIoasid {
        argsz: 16,
        flags: 0,
        ioasid: io,
        user_pasid: 0,
    };
    node.ioctl(&req, fh, args(VFIO_ATTACH_IOASID, &a as *const _ as u64))
        .unwrap();
    assert_eq!(fx.engine.info(ctx, io).unwrap().devices.len(), 1);
    let mut ri = [0u64; 4];
    ri[0] = 32 | (7u64 << 32); // argsz 32, flags (input ignored)
    ri[1] = 7; // index 7
    node.ioctl(
        &req,
        fh,
        args(nr::VFIO_DEVICE_GET_REGION_INFO, ri.as_mut_ptr() as u64),
    )
    .unwrap();
    assert_eq!(ri[3], CONFIG, "offset written into our memory");
    assert_eq!(
        node.write(&req, fh, &[5, 6], Offset::At(CONFIG)).unwrap(),
        2
    );
    assert_eq!(
        node.read(&req, fh, 2, Offset::At(CONFIG)).unwrap(),
        vec![5, 6]
    );
    assert_eq!(
        node.read(&req, fh2, 2, Offset::At(CONFIG)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        node.ioctl(&req, fh2, args(VFIO_BIND_IOASID_FD, raw as u64))
            .unwrap_err(),
        Errno::EBUSY
    );
    assert_eq!(
        node.ioctl(&req, fh2, args(VFIO_BIND_IOASID_FD, 999_999))
            .unwrap_err(),
        Errno::EBADF
    );
    node.release(fh2);
    node.release(fh);
    assert_eq!(fx.engine.bound_context(DEV_A), None);
    assert_eq!(fx.opener.log(DEV_A).closes.load(Ordering::SeqCst), 1);
}

#[test]
fn racing_binds_and_closes_leave_one_consistent_binding() {
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    for round in 0..20 {
        let files: Vec<(ContextId, OwnedFd)> = (0..4).map(|_| fx.context()).collect();
        let wins: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, (_, f))| {
                    let node = node.clone();
                    s.spawn(move || bind(&node, 100 * round + i as u64 + 1, f).is_ok())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: {wins:?}"
        );
        let winner = wins.iter().position(|w| *w).unwrap();
        assert_eq!(node.bound_context(), Some(files[winner].0));
        assert_eq!(fx.engine.bound_context(DEV_A), Some(files[winner].0));
        // Close the winner's context while a reader hammers the node.
        std::thread::scope(|s| {
            let reader = {
                let node = node.clone();
                let fh = 100 * round + winner as u64 + 1;
                s.spawn(move || {
                    for _ in 0..50 {
                        let _ = node.handle_read(fh, 4, &at(BAR0));
                    }
                })
            };
            let closed = fx.engine.close_context(files[winner].0).unwrap();
            fx.nodes.on_context_closed(&closed);
            reader.join().unwrap();
        });
        assert_eq!(node.bound_context(), None);
        let log = fx.opener.log(DEV_A);
        assert_eq!(
            log.opens.load(Ordering::SeqCst),
            log.closes.load(Ordering::SeqCst),
            "every opened device fd is closed"
        );
    }
}

// ---- the table -------------------------------------------------------------

#[test]
fn argument_kinds_of_the_rfc_commands() {
    use crate::ioctl::DEVICE_TABLE;
    use ioctl_table::Handler;
    let row = |c| DEVICE_TABLE.find(c).unwrap();
    for c in [VFIO_BIND_IOASID_FD, VFIO_UNBIND_IOASID_FD] {
        assert!(matches!(row(c).handler, Handler::Int(_)), "{}", row(c).name);
    }
    for c in [VFIO_ATTACH_IOASID, VFIO_DETACH_IOASID] {
        let Handler::Struct(s, _) = &row(c).handler else {
            panic!("{} takes a struct", row(c).name)
        };
        assert_eq!((s.c_name, s.min_size), ("vfio_attach_ioasid", 16));
        assert_eq!(s.flags.accepted(), Some(IOASID_ATTACH_USER_PASID));
    }
    assert_eq!(DEVICE_TABLE.unknown_flags, Errno::EINVAL);
    assert!(DEVICE_TABLE.find(nr::VFIO_DEVICE_FEATURE).is_none());
}

/// TEST_LENGTH over every struct row of the device table, on a bound node:
/// one byte short of the minimum is `EINVAL`, a size past what the daemon
/// reads is `E2BIG`, and a size the reader accepts never fails for its
/// length.
#[test]
fn test_length_every_row_of_the_device_table() {
    use crate::ioctl::DEVICE_TABLE;
    let fx = Fx::new();
    let node = fx.node(DEV_A);
    let (_ctx, f) = fx.context();
    bind(&node, 1, &f).unwrap();
    for op in DEVICE_TABLE.ops {
        let Some(rules) = op.rules() else { continue };
        let run = |argsz: usize| {
            let mut mem = vec![0u8; 4096];
            mem[..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
            ioctl(&node, &caller(mem, &[]), 1, op.number, ARG)
        };
        let name = op.name;
        assert_eq!(
            errno(run(rules.min_size - 1)),
            Errno::EINVAL,
            "{name} min-1"
        );
        assert_eq!(errno(run(0)), Errno::EINVAL, "{name} argsz 0");
        assert_eq!(
            errno(run(ioctl_table::MAX_ARG + ioctl_table::MAX_TAIL + 1)),
            Errno::E2BIG,
            "{name} past the cap"
        );
        assert_eq!(
            errno(run(u32::MAX as usize)),
            Errno::E2BIG,
            "{name} u32::MAX"
        );
        for size in [rules.min_size, rules.size, rules.size + 8] {
            if let Err(e) = run(size) {
                assert!(
                    ![Errno::E2BIG, Errno::EFAULT].contains(&e.errno)
                        && !e.message.contains("argsz"),
                    "{name} argsz {size}: {e}"
                );
            }
        }
    }
}

// ---- the iommufd cdev (vfioN) -----------------------------------------------

mod cdev {
    use super::*;
    use crate::cdev::{CdevNode, CDEV_TABLE};
    use ioasid_uapi::plain::bytes_of;
    use ioasid_uapi::vfio::{
        vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_DETACH_IOMMUFD_PT,
    };

    fn cdev(fx: &Fx, id: DeviceId) -> CdevNode {
        let spec = fx.engine.device(id).unwrap().clone();
        CdevNode::new(
            fx.engine.clone(),
            spec,
            fx.opener.clone(),
            fx.lookup.clone(),
            false,
        )
    }

    fn bind_arg(fd: i32) -> Vec<u8> {
        let b = vfio_device_bind_iommufd {
            argsz: 24,
            iommufd: fd,
            ..Default::default()
        };
        let mut mem = bytes_of(&b).to_vec();
        mem.resize(4096, 0);
        mem
    }

    fn cbind(node: &CdevNode, fh: u64, file: &OwnedFd) -> Result<u32> {
        let c = caller(bind_arg(5), &[(5, file)]);
        node.handle_ioctl(&c, fh, VFIO_DEVICE_BIND_IOMMUFD, ARG)?;
        Ok(get32(&c.get(ARG, 24), 12))
    }

    /// Before bind every number, known or not, is EINVAL; after it an
    /// unknown one is ENOTTY; the devid is an object id of the iommufd.
    #[test]
    fn everything_before_bind_is_einval() {
        let fx = Fx::new();
        let node = cdev(&fx, DEV_A);
        let (ctx, file) = fx.context();
        let c = caller(vec![0; 64], &[]);
        for cmd in [
            nr::VFIO_DEVICE_GET_INFO,
            nr::VFIO_DEVICE_RESET,
            0x3b30,
            0x5801,
        ] {
            assert_eq!(errno(node.handle_ioctl(&c, 1, cmd, ARG)), Errno::EINVAL);
        }
        let off = Offset::At(CONFIG);
        assert_eq!(errno(node.handle_read(1, 4, &off)), Errno::EINVAL);
        assert_eq!(fx.engine.ioas_alloc(ctx).unwrap(), 1);
        assert_eq!(cbind(&node, 1, &file).unwrap(), 2);
        assert_eq!(errno(node.handle_ioctl(&c, 1, 0x3b30, ARG)), Errno::ENOTTY);
        assert_eq!(errno(cbind(&node, 1, &file)), Errno::EINVAL, "bound twice");
        assert_eq!(errno(cbind(&node, 2, &file)), Errno::EINVAL, "another file");
        node.handle_release(1);
        assert_eq!(
            fx.opener.log(DEV_A).closes.load(Ordering::SeqCst),
            1,
            "device closed"
        );
        assert_eq!(fx.engine.bound_context(DEV_A), None);
        assert_eq!(cbind(&node, 2, &file).unwrap(), 2, "the id is free again");
    }

    /// QEMU's migration probe, VFIO_DEVICE_FEATURE, at every device start:
    /// EINVAL before bind, ENOTTY after (the kernel's answer for a feature
    /// the device lacks), with a line that names the command; a VFIO
    /// number the cdev does not serve is named too.
    #[test]
    fn the_feature_probe_is_enotty_and_says_what_is_not_served() {
        let fx = Fx::new();
        let node = cdev(&fx, DEV_A);
        let (ctx, file) = fx.context();
        let c = caller(vec![0; 64], &[]);
        assert_eq!(
            errno(node.handle_ioctl(&c, 1, nr::VFIO_DEVICE_FEATURE, ARG)),
            Errno::EINVAL
        );
        fx.engine.ioas_alloc(ctx).unwrap();
        cbind(&node, 1, &file).unwrap();
        let e = node
            .handle_ioctl(&c, 1, nr::VFIO_DEVICE_FEATURE, ARG)
            .unwrap_err();
        assert_eq!(e.errno, Errno::ENOTTY);
        assert!(
            e.message
                .starts_with("VFIO_DEVICE_FEATURE is not served on a VFIO device cdev")
                && e.message.contains("migration"),
            "{}",
            e.message
        );
        let e = node
            .handle_ioctl(&c, 1, nr::VFIO_DEVICE_IOEVENTFD, ARG)
            .unwrap_err();
        assert_eq!(
            (e.errno, e.message.as_str()),
            (
                Errno::ENOTTY,
                "VFIO_DEVICE_IOEVENTFD is not served on a VFIO device cdev"
            )
        );
    }

    /// A device bound through one dialect is busy for the other.
    #[test]
    fn one_device_two_dialects() {
        let fx = Fx::new();
        let rfc = fx.node(DEV_A);
        let node = cdev(&fx, DEV_A);
        let (_, file) = fx.context();
        cbind(&node, 1, &file).unwrap();
        assert_eq!(errno(bind(&rfc, 1, &file)), Errno::EBUSY);
        node.handle_release(1);
        bind(&rfc, 1, &file).unwrap();
        assert_eq!(errno(cbind(&node, 1, &file)), Errno::EBUSY);
    }

    /// Attach writes the HWPT id back into pt_id.
    #[test]
    fn attach_writes_the_hwpt_back() {
        let fx = Fx::new();
        let node = cdev(&fx, DEV_A);
        let (ctx, file) = fx.context();
        cbind(&node, 1, &file).unwrap();
        let ioas = fx.engine.ioas_alloc(ctx).unwrap();
        let a = vfio_device_attach_iommufd_pt {
            argsz: 16,
            pt_id: ioas,
            ..Default::default()
        };
        let c = caller(bytes_of(&a).to_vec(), &[]);
        node.handle_ioctl(&c, 1, VFIO_DEVICE_ATTACH_IOMMUFD_PT, ARG)
            .unwrap();
        assert_eq!(get32(&c.get(ARG, 16), 8), ioas + 1);
        let c = caller(bytes_of(&a).to_vec(), &[]);
        put32(&mut c.mem.borrow_mut(), 8, 99);
        assert_eq!(
            errno(node.handle_ioctl(&c, 1, VFIO_DEVICE_ATTACH_IOMMUFD_PT, ARG)),
            Errno::ENOENT
        );
    }

    /// TEST_LENGTH over every struct row of the cdev table, on a bound
    /// file: below the minimum `EINVAL`; BIND, an extensible struct,
    /// `E2BIG` for a non-zero byte past it; the VFIO-style rows ignore
    /// what follows their struct, or refuse past the copy cap.
    #[test]
    fn test_length_every_row_of_the_cdev_table() {
        let fx = Fx::new();
        let node = cdev(&fx, DEV_A);
        let (_ctx, file) = fx.context();
        cbind(&node, 1, &file).unwrap();
        for op in CDEV_TABLE.ops {
            let Some(rules) = op.rules() else { continue };
            let run = |argsz: usize, tail: u8| {
                let mut mem = vec![0u8; 8192];
                mem[..4].copy_from_slice(&(argsz as u32).to_ne_bytes());
                if argsz > rules.size && argsz < mem.len() {
                    mem[argsz - 1] = tail;
                }
                node.handle_ioctl(&caller(mem, &[]), 1, op.number, ARG)
            };
            let name = op.name;
            assert_eq!(
                errno(run(rules.min_size - 1, 0)),
                Errno::EINVAL,
                "{name} min-1"
            );
            assert_eq!(errno(run(0, 0)), Errno::EINVAL, "{name} argsz 0");
            for size in [rules.min_size, rules.size, rules.size + 8] {
                if let Err(e) = run(size, 0) {
                    assert!(
                        ![Errno::E2BIG, Errno::EFAULT].contains(&e.errno),
                        "{name} argsz {size}: {e}"
                    );
                }
            }
            let past = run(rules.size + 8, 0xff);
            if op.number == VFIO_DEVICE_BIND_IOMMUFD {
                assert_eq!(errno(past), Errno::E2BIG, "{name}: a non-zero tail");
            } else {
                assert!(
                    past.as_ref().err().is_none_or(|e| e.errno != Errno::E2BIG),
                    "{name}: VFIO ignores what follows the struct: {past:?}"
                );
            }
        }
        assert!(CDEV_TABLE.find(VFIO_DEVICE_DETACH_IOMMUFD_PT).is_some());
        assert!(
            CDEV_TABLE.find(VFIO_BIND_IOASID_FD).is_none(),
            "no RFC bind on vfioN"
        );
    }
}
