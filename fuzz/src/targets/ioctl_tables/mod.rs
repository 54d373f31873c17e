//! Every row of every node's ioctl table through the node's real dispatch:
//! `/dev/ioasid` (`cuse_ioasid::ioctl::dispatch`), `/dev/iommu`
//! (`cuse_ioasid::iommufd::ioctl::dispatch`), `devN` and `vfioN`
//! (`handle_ioctl` of `cuse_vfio_devices`' nodes), each over a fresh
//! engine on the fake backend, with the fake VFIO device of
//! `cuse_vfio_devices::testing` behind the device nodes.
//!
//! One input: a node, a state reached by a random prelude (IOASIDs or
//! IOASes, a device bound and attached, mappings, a child, a
//! registration), one command (a row of the table, or now and then a
//! number it lacks) with an argument generated from valid values and
//! mutated ([`args`]), and a caller whose memory is a byte array with
//! holes, sometimes read-only, holding file descriptors that may not
//! exist or be of the wrong kind. Then:
//!
//! - a result `>= 0` or an errno;
//! - when the row's precondition holds, the reader's outcome is the
//!   kernel's `copy_struct_from_user` (VFIO's rules for its
//!   variable-length structs), predicted from the bytes: `EFAULT` if the
//!   size or the bytes it covers cannot be read, `EINVAL` below the
//!   minimum, `E2BIG` for a non-zero byte past the struct or a tail past
//!   the cap, the table's errno for an unknown flag; nothing written then
//!   ([`expect`]);
//! - after the reader, an errno the command's documentation allows
//!   ([`commands`]); `EFAULT` only when an access of the caller's memory
//!   faulted, or for the commands that alias client memory;
//! - every byte written lies inside the argument as the caller sized it
//!   (`min(size, struct)`, the whole size for VFIO's structs and for an
//!   output tail) or inside a buffer the command's struct names;
//! - what a success wrote back is well formed where the uAPI says how
//!   ([`outputs`]): capability chains inside the caller's size, no mmap
//!   advertised by a device node, sorted IOVA ranges;
//! - once every file is closed: no alias held, no domain entry, every
//!   device file closed, no device bound.

mod args;
mod commands;
mod expect;
mod outputs;

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use cuse_ioasid::iommufd::IommufdNode;
use cuse_vfio_devices::testing::{inode, FakeLookup, FakeOpener};
use cuse_vfio_devices::{CdevNode, DeviceNode, DeviceNodes};
use ioasid_engine::backend::Prot;
use ioasid_engine::fake::FakeBackend;
use ioasid_engine::{ContextId, DeviceId, DmaMap, Engine, IoasMap, MapSource};
use ioasid_uapi::plain::bytes_of;
use ioasid_uapi::vfio::{vfio_device_bind_iommufd, VFIO_DEVICE_BIND_IOMMUFD};
use ioasid_uapi::VFIO_BIND_IOASID_FD;
use ioctl_table::fake::FakeCaller;
use nix::errno::Errno;

use super::Target;
use crate::gen::Rng;
use expect::{Expect, Row};

/// The target.
pub const IOCTL_TABLES: Target = Target {
    name: "ioctl-tables",
    about: "every row of the /dev/ioasid, /dev/iommu, devN and vfioN tables through the \
            node's dispatch, arguments mutated from valid ones, caller memory with holes: \
            the reader's errno as copy_struct_from_user's, else one the command allows, \
            EFAULT only on a fault, no byte written outside the argument, nothing leaked",
    cap: None,
    make: || {
        let mut t = Tables::new();
        Box::new(move |rng| t.one(rng))
    },
};

/// The calling thread: no such process (pid_max is at most 2^22), so the
/// one command that reads `/proc/<tid>` finds nothing.
pub(crate) const PID: i32 = 0x3fff_0001;
/// The client's shared memory, as the fake backend knows it.
pub(crate) const MEM: u64 = 0x4000_0000;
/// Its length.
pub(crate) const MEM_LEN: u64 = 16 << 20;
/// The caller's memory for arguments (a different range).
pub(crate) const BASE: u64 = 0x10_0000;
/// The caller's fds: its ioasid file, iommufd, a memory file, a pipe.
pub(crate) const FD_IOASID: i32 = 3;
pub(crate) const FD_IOMMU: i32 = 4;
pub(crate) const FD_MAP: i32 = 5;
pub(crate) const FD_PIPE: i32 = 6;
/// The open file of a device node that binds in the prelude, and another.
const FH: u64 = 1;
const OTHER_FH: u64 = 2;

const DEV_A: DeviceId = DeviceId(1);
const DEV_X: DeviceId = DeviceId(10);
const DEV_Y: DeviceId = DeviceId(11);

/// The node under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// `/dev/ioasid`.
    Ioasid,
    /// `/dev/iommu`.
    Iommufd,
    /// `/dev/vfio/devices/devN`.
    DevN,
    /// `/dev/vfio/devices/vfioN`.
    VfioN,
}

/// What lives as long as the target: the caller's files, the fake device
/// opener (its logs cleared per input) and the ioasid-file lookup.
struct Tables {
    /// The files and their inodes (the fake lookup and backend know files
    /// by inode).
    ioasid_file: OwnedFd,
    ioasid_ino: u64,
    iommu_ino: u64,
    map_ino: u64,
    iommu_file: OwnedFd,
    map_file: OwnedFd,
    pipe: OwnedFd,
    _pipe_w: OwnedFd,
    opener: Arc<FakeOpener>,
    lookup: Arc<FakeLookup>,
}

/// One input's world.
struct World {
    fake: Arc<FakeBackend>,
    engine: Arc<Engine>,
    ctx: ContextId,
}

fn memfd(name: &std::ffi::CStr) -> OwnedFd {
    nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::empty()).expect("memfd")
}

fn ino(f: &OwnedFd) -> u64 {
    inode(f.as_fd()).expect("fstat of a memfd")
}

const RW: Prot = Prot {
    read: true,
    write: true,
};

impl Tables {
    fn new() -> Self {
        let (pipe, _pipe_w) = nix::unistd::pipe().expect("pipe");
        let (ioasid_file, iommu_file, map_file) = (
            memfd(c"fuzz-ioasid"),
            memfd(c"fuzz-iommu"),
            memfd(c"fuzz-map"),
        );
        Tables {
            ioasid_ino: ino(&ioasid_file),
            iommu_ino: ino(&iommu_file),
            map_ino: ino(&map_file),
            ioasid_file,
            iommu_file,
            map_file,
            pipe,
            _pipe_w,
            opener: Arc::new(FakeOpener::default()),
            lookup: Arc::new(FakeLookup::default()),
        }
    }

    /// A caller holding the four files (copying them costs system calls:
    /// only for the commands that take fds).
    fn hold_fds(&self, c: &mut FakeCaller) {
        c.hold(FD_IOASID, &self.ioasid_file);
        c.hold(FD_IOMMU, &self.iommu_file);
        c.hold(FD_MAP, &self.map_file);
        c.hold(FD_PIPE, &self.pipe);
    }

    fn world(&self, node: Node) -> World {
        let fake = Arc::new(FakeBackend::new());
        fake.share(PID, MEM, MEM_LEN / 2);
        fake.share(PID, MEM + MEM_LEN / 2, MEM_LEN / 2);
        fake.add_file(self.map_ino, MEM_LEN);
        let devices = [
            (DEV_A, "0000:00:03.0", 3),
            (DEV_X, "0000:01:01.0", 7),
            (DEV_Y, "0000:01:02.0", 7),
        ];
        let engine = super::engine(fake.clone(), &devices, 1 << 10);
        let ctx = engine.open_context();
        let file = match node {
            Node::Ioasid | Node::DevN => self.ioasid_ino,
            Node::Iommufd | Node::VfioN => self.iommu_ino,
        };
        let mut contexts = self.lookup.contexts.lock().unwrap();
        contexts.clear();
        contexts.insert(file, ctx);
        drop(contexts);
        self.opener.logs.lock().unwrap().clear();
        World { fake, engine, ctx }
    }

    fn one(&mut self, rng: &mut Rng) {
        let node = *rng.pick(&[Node::Ioasid, Node::Iommufd, Node::DevN, Node::VfioN]);
        let w = self.world(node);
        let dev = *rng.pick(&[DEV_A, DEV_X]);
        let nodes =
            DeviceNodes::with_parts(w.engine.clone(), self.opener.clone(), self.lookup.clone());
        let devn = nodes.node(dev).expect("a device of the engine");
        let spec = w.engine.device(dev).expect("served").clone();
        let cdev = CdevNode::new(
            w.engine.clone(),
            spec,
            self.opener.clone(),
            self.lookup.clone(),
            false,
        );
        let iommufd = IommufdNode::new(w.engine.clone(), BTreeSet::new(), Box::new(|_| {}));
        let bound = match node {
            Node::Ioasid | Node::DevN => self.rfc_prelude(rng, &w, node, &devn, dev),
            Node::Iommufd | Node::VfioN => self.iommufd_prelude(rng, &w, node, &cdev, dev),
        };
        let fh = if rng.chance(7, 8) { FH } else { OTHER_FH };
        self.call(rng, &w, node, &devn, &cdev, &iommufd, bound && fh == FH, fh);
        // Close everything: the device files, then the contexts.
        devn.handle_release(FH);
        devn.handle_release(OTHER_FH);
        cdev.handle_release(FH);
        cdev.handle_release(OTHER_FH);
        for v in w.engine.snapshot() {
            let _ = w.engine.close_context(v.id);
        }
        leak_check(&w, &self.opener);
    }

    /// An RFC context: IOASIDs, the device bound (through the node when it
    /// is the one under test) and attached, mappings, a child, a
    /// registration. Whether the node's file `FH` is bound.
    fn rfc_prelude(
        &self,
        rng: &mut Rng,
        w: &World,
        node: Node,
        devn: &DeviceNode,
        dev: DeviceId,
    ) -> bool {
        let (en, ctx) = (&w.engine, w.ctx);
        for _ in 0..rng.below(4).max(u64::from(rng.chance(7, 8))) {
            let _ = en.alloc(ctx);
        }
        if rng.chance(1, 4) {
            let _ = en.register_memory(ctx, &PID, MEM, 1 << 20);
        }
        if rng.chance(1, 8) {
            // The other device of group 7 in another context (binding X
            // is refused), or the device itself bound through the other
            // dialect (refused too).
            let other = en.open_context();
            let _ = match rng.below(2) {
                0 => en.bind(DEV_Y, other),
                _ => en.iommufd_bind(dev, other).map(|_| ()),
            };
        }
        let bound = if rng.chance(3, 4) {
            if node == Node::DevN {
                let mut c = FakeCaller::new(BASE, Vec::new(), PID);
                self.hold_fds(&mut c);
                devn.handle_ioctl(&c, FH, VFIO_BIND_IOASID_FD, FD_IOASID as u64)
                    .is_ok()
            } else {
                en.bind(dev, ctx).is_ok()
            }
        } else {
            false
        };
        if bound && dev == DEV_X && rng.chance(1, 2) {
            let _ = en.bind(DEV_Y, ctx);
        }
        if bound && rng.chance(7, 8) && en.attach(dev, ctx, &PID, 1, None).is_ok() {
            for i in 0..rng.below(4) {
                let map = DmaMap {
                    iova: i << 21,
                    vaddr: MEM + (i << 20),
                    size: 1 << 20,
                    prot: RW,
                };
                let _ = en.map_dma(ctx, &PID, 1, map);
            }
            if rng.chance(1, 2) {
                if let Ok(child) = en.create_nesting(ctx, 1) {
                    if rng.chance(1, 2) {
                        let _ = en.attach(dev, ctx, &PID, child, None);
                    }
                }
            }
        }
        bound
    }

    /// An iommufd context: IOASes, the device bound (through the cdev when
    /// it is under test) and attached, mappings, a HWPT.
    fn iommufd_prelude(
        &self,
        rng: &mut Rng,
        w: &World,
        node: Node,
        cdev: &CdevNode,
        dev: DeviceId,
    ) -> bool {
        let (en, ctx) = (&w.engine, w.ctx);
        for _ in 0..rng.below(3).max(u64::from(rng.chance(7, 8))) {
            let _ = en.ioas_alloc(ctx);
        }
        if rng.chance(1, 8) {
            // The device bound through the RFC's node already, or the
            // other device of group 7 through another iommufd.
            let other = en.open_context();
            let _ = match rng.below(2) {
                0 => en.bind(dev, other),
                _ => en.iommufd_bind(DEV_Y, other).map(|_| ()),
            };
        }
        let bound = if rng.chance(3, 4) {
            if node == Node::VfioN {
                let b = vfio_device_bind_iommufd {
                    argsz: 24,
                    iommufd: FD_IOMMU,
                    ..Default::default()
                };
                let mut c = FakeCaller::new(BASE, bytes_of(&b).to_vec(), PID);
                self.hold_fds(&mut c);
                cdev.handle_ioctl(&c, FH, VFIO_DEVICE_BIND_IOMMUFD, BASE)
                    .is_ok()
            } else {
                en.iommufd_bind(dev, ctx).is_ok()
            }
        } else {
            false
        };
        for i in 0..rng.below(3) {
            let map = IoasMap {
                length: 1 << 20,
                iova: rng.chance(1, 2).then_some(i << 22),
                prot: RW,
            };
            let source = MapSource::User {
                client: &PID,
                vaddr: MEM + (i << 20),
            };
            let _ = en.ioas_map(ctx, 1, source, map);
        }
        if bound && rng.chance(3, 4) {
            let _ = en.attach_pt(dev, ctx, &PID, 1);
        }
        if rng.chance(1, 4) {
            if let Some(devid) = en.device_object_id(ctx, dev) {
                let _ = en.hwpt_alloc(ctx, devid, 1, 0, false);
            }
        }
        bound
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        rng: &mut Rng,
        w: &World,
        node: Node,
        devn: &DeviceNode,
        cdev: &CdevNode,
        iommufd: &IommufdNode,
        bound_here: bool,
        fh: u64,
    ) {
        let cmds = commands::of(node);
        let number = if rng.chance(1, 16) {
            match rng.below(3) {
                0 => 0x3b00 | rng.below(256) as u32,
                1 => (rng.below(4) as u32) << 30 | 0x3b00 | rng.below(256) as u32,
                _ => rng.next_u64() as u32,
            }
        } else {
            rng.pick(cmds).number
        };
        let cmd = cmds.iter().find(|c| c.number == number).copied();
        let row = expect::row_of(node, number);
        let (bytes, int) = match (&cmd, &row) {
            (Some(c), Some(Row::Struct(rules, data))) => {
                (args::struct_bytes(rng, c, rules, *data), 0)
            }
            (Some(c), _) => (Vec::new(), args::integer(rng, c.arg)),
            (None, _) => (rng.some_bytes(64), rng.interesting()),
        };
        let (mut c, at) = args::caller(rng, &bytes);
        if cmd.is_none_or(|c| c.fds) {
            self.hold_fds(&mut c);
        }
        // A number the table lacks gets an address or an integer.
        let arg = if matches!(row, Some(Row::Struct(..))) || (row.is_none() && rng.chance(1, 2)) {
            at
        } else {
            int
        };
        let expect = expect::expect(
            &c,
            node,
            number,
            cmd.as_ref(),
            row.as_ref(),
            bound_here,
            arg,
        );
        let result = match node {
            Node::Ioasid => cuse_ioasid::ioctl::dispatch(&w.engine, w.ctx, &c, number, arg),
            Node::Iommufd => cuse_ioasid::iommufd::ioctl::dispatch(iommufd, w.ctx, &c, number, arg),
            Node::DevN => devn.handle_ioctl(&c, fh, number, arg).map_err(|e| e.errno),
            Node::VfioN => cdev.handle_ioctl(&c, fh, number, arg).map_err(|e| e.errno),
        };
        let what = format!("{node:?} {number:#x} arg {arg:#x} fh {fh}: {result:?}");
        check(&c, node, number, arg, &expect, result, &what);
    }
}

fn check(
    c: &FakeCaller,
    node: Node,
    number: u32,
    arg: u64,
    expect: &Expect,
    result: Result<i32, Errno>,
    what: &str,
) {
    if let Ok(v) = result {
        assert!(v >= 0, "{what}: a negative result");
    }
    let writes = c.writes.borrow();
    let (cmd, inside, reader_faults, given) = match expect {
        Expect::Refused(errnos) => {
            let e = result.expect_err(what);
            assert!(errnos.contains(&e), "{what}: expected one of {errnos:?}");
            assert!(
                writes.is_empty(),
                "{what}: wrote {writes:x?} though refused unread"
            );
            return;
        }
        Expect::Handled {
            cmd,
            inside,
            reader_faults,
            given,
        } => (cmd, inside, *reader_faults, *given),
    };
    if let Err(e) = result {
        let faulted = c.faults.get() > reader_faults;
        if e == Errno::EFAULT {
            assert!(
                faulted || cmd.engine_memory,
                "{what}: EFAULT though no access of the caller's memory faulted"
            );
        } else {
            assert!(
                cmd.allowed.contains(&e),
                "{what}: the command allows {:?}",
                cmd.allowed
            );
        }
    }
    for &(addr, len) in writes.iter() {
        let w = addr..addr + len as u64;
        assert!(
            inside.iter().any(|r| r.start <= w.start && w.end <= r.end),
            "{what}: wrote {len} bytes at {addr:#x}, outside the argument {inside:x?}"
        );
    }
    outputs::check(c, node, number, arg, given, result, what);
}

/// Nothing is left once every file is closed.
fn leak_check(w: &World, opener: &FakeOpener) {
    assert_eq!(w.fake.live_aliases(), 0, "aliases leaked");
    for g in [3, 7] {
        assert!(
            w.fake.entries(g).is_empty(),
            "group {g}'s domain not emptied"
        );
    }
    for d in [DEV_A, DEV_X, DEV_Y] {
        assert_eq!(w.engine.bound_context(d), None, "device {d:?} still bound");
    }
    for (d, log) in opener.logs.lock().unwrap().iter() {
        let (opens, closes) = (
            log.opens.load(std::sync::atomic::Ordering::SeqCst),
            log.closes.load(std::sync::atomic::Ordering::SeqCst),
        );
        assert_eq!(opens, closes, "device {d:?}: a device file left open");
    }
}

#[cfg(test)]
mod tests {
    use super::commands::Arg;
    use super::*;

    /// Every row of every table has a description, and every description
    /// a row: a new command cannot slip past the target.
    #[test]
    fn every_row_is_described() {
        for node in [Node::Ioasid, Node::Iommufd, Node::DevN, Node::VfioN] {
            let numbers: Vec<u32> = match node {
                Node::Ioasid => cuse_ioasid::ioctl::IOASID_TABLE
                    .ops
                    .iter()
                    .map(|o| o.number)
                    .collect(),
                Node::Iommufd => cuse_ioasid::iommufd::ioctl::IOMMUFD_TABLE
                    .ops
                    .iter()
                    .map(|o| o.number)
                    .collect(),
                Node::DevN => cuse_vfio_devices::ioctl::DEVICE_TABLE
                    .ops
                    .iter()
                    .map(|o| o.number)
                    .collect(),
                Node::VfioN => cuse_vfio_devices::cdev::CDEV_TABLE
                    .ops
                    .iter()
                    .map(|o| o.number)
                    .collect(),
            };
            let described: Vec<u32> = commands::of(node).iter().map(|c| c.number).collect();
            let mut a = numbers.clone();
            let mut b = described.clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{node:?}");
            for c in commands::of(node) {
                let plain = matches!(expect::row_of(node, c.number), Some(Row::Plain));
                assert_eq!(
                    plain,
                    !matches!(c.arg, Arg::Struct(..)),
                    "{node:?} {:#x}",
                    c.number
                );
            }
        }
    }
}
