//! The reader and the table against a fake caller: the extensible-struct
//! rules of `VFIO_ATTACH_IOASID`'s struct (moved here with the reader), the
//! bounds of a variable-length argument, and the glue of each row kind.

use ioasid_uapi::error::{Errno, Error, Result};
use ioasid_uapi::{VfioAttachIoasid, IOASID_ATTACH_USER_PASID};
use zerocopy::IntoBytes;

use crate::fake::FakeCaller;
use crate::Caller;
use crate::{ioctl_op, read_data, read_struct, Handler, Table, Ucmd, MAX_ARG};

const BASE: u64 = 0x10_0000;
const ATTACH: u32 = 0x3b7c;
const DATA: u32 = 0x3b6b;
const NONE: u32 = 1;
const INT: u32 = 2;

/// A stand-in for a struct with a variable-length tail.
#[derive(Clone, Copy)]
#[repr(C)]
struct Header32 {
    argsz: u32,
    pad: [u32; 7],
}

/// What the handlers saw.
#[derive(Default)]
struct Seen(std::cell::RefCell<Vec<String>>);

fn on_attach(seen: &Seen, u: &Ucmd<'_>, a: VfioAttachIoasid) -> Result<i32> {
    seen.0.borrow_mut().push(format!(
        "attach {} {} size {}",
        a.ioasid, a.user_pasid, u.user_size
    ));
    Ok(7)
}

fn on_data(seen: &Seen, u: &Ucmd<'_>, bytes: Vec<u8>) -> Result<i32> {
    seen.0
        .borrow_mut()
        .push(format!("data {} {}", bytes.len(), u.user_size));
    Ok(0)
}

fn on_none(seen: &Seen, u: &Ucmd<'_>) -> Result<i32> {
    seen.0.borrow_mut().push(format!("none {}", u.name));
    Ok(1)
}

fn on_int(_: &Seen, _: &Ucmd<'_>, v: u64) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::new(Errno::EINVAL, "too big"))
}

static TABLE: Table<Seen> = Table {
    node: "test",
    unknown_flags: Errno::EINVAL,
    ops: &[
        ioctl_op!(
            ATTACH,
            on_attach,
            VfioAttachIoasid,
            user_pasid,
            flags = IOASID_ATTACH_USER_PASID
        ),
        ioctl_op!(DATA, on_data, data Header32, pad),
        ioctl_op!(NONE, on_none),
        ioctl_op!(INT, on_int, int),
    ],
};

/// The same struct in a table whose unknown flags are `EOPNOTSUPP`.
static IOMMUFD_STYLE: Table<Seen> = Table {
    node: "test",
    unknown_flags: Errno::EOPNOTSUPP,
    ops: &[ioctl_op!(
        ATTACH,
        on_attach,
        VfioAttachIoasid,
        user_pasid,
        flags = 0
    )],
};

fn attach_bytes(argsz: u32, flags: u32, ioasid: u32, pasid: u32, tail: &[u8]) -> Vec<u8> {
    let mut v = VfioAttachIoasid {
        argsz,
        flags,
        ioasid,
        user_pasid: pasid,
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(tail);
    v
}

fn attach(mem: Vec<u8>) -> Result<VfioAttachIoasid> {
    let c = FakeCaller::new(BASE, mem, 1);
    let rules = TABLE.find(ATTACH).unwrap().rules().unwrap();
    read_struct::<VfioAttachIoasid>(&c, BASE, rules, Errno::EINVAL).map(|(v, _)| v)
}

#[test]
fn attach_struct_length_rules() {
    // min - 1: EINVAL.
    let e = attach(attach_bytes(15, 0, 1, 0, &[])).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(e.message.contains("below"), "{}", e.message);
    // exact.
    let a = attach(attach_bytes(16, 0, 7, 0, &[])).unwrap();
    assert_eq!((a.ioasid, a.flags, a.user_pasid), (7, 0, 0));
    // oversized with zeros: accepted.
    let a = attach(attach_bytes(16 + 24, 0, 9, 0, &[0; 24])).unwrap();
    assert_eq!(a.ioasid, 9);
    // oversized with a non-zero byte: E2BIG.
    let mut tail = [0u8; 24];
    tail[23] = 1;
    let e = attach(attach_bytes(16 + 24, 0, 9, 0, &tail)).unwrap_err();
    assert_eq!(e.errno, Errno::E2BIG);
    assert!(e.message.contains("byte 39"), "{}", e.message);
    // argsz claims more than the caller's memory holds: EFAULT.
    let e = attach(attach_bytes(16 + 64, 0, 9, 0, &[0; 8])).unwrap_err();
    assert_eq!(e.errno, Errno::EFAULT);
    // a gigantic argsz is refused without being read.
    let e = attach(attach_bytes(u32::MAX, 0, 9, 0, &[])).unwrap_err();
    assert_eq!(e.errno, Errno::E2BIG);
    // no memory at all.
    assert_eq!(attach(vec![1, 2]).unwrap_err().errno, Errno::EFAULT);
}

/// A hole in the caller's memory faults like its end: a tail that reaches
/// it is `EFAULT`, a struct that stops before it is read; the fake counts
/// every faulting access.
#[test]
fn a_hole_in_the_callers_memory_faults() {
    let mut mem = attach_bytes(16 + 8192, 0, 4, 0, &[0; 8192]);
    mem.resize(16 + 8192 + 4096, 0);
    let c = FakeCaller::new(BASE, mem, 1);
    c.holes
        .borrow_mut()
        .push(BASE + 16 + 5000..BASE + 16 + 5001);
    let rules = TABLE.find(ATTACH).unwrap().rules().unwrap();
    let read = |c: &FakeCaller| read_struct::<VfioAttachIoasid>(c, BASE, rules, Errno::EINVAL);
    assert_eq!(read(&c).unwrap_err().errno, Errno::EFAULT);
    assert_eq!(c.faults.get(), 1, "one chunk of the tail faulted");
    c.put(BASE, &5000u32.to_ne_bytes());
    assert_eq!(read(&c).unwrap().1, 5000, "the tail stops before the hole");
    assert_eq!(c.faults.get(), 1);
    c.holes.borrow_mut()[0] = BASE + 8..BASE + 12;
    assert_eq!(read(&c).unwrap_err().errno, Errno::EFAULT);
    assert!(c.write_mem(BASE + 10, &[1]).is_err());
    assert_eq!(
        c.faults.get(),
        4,
        "the whole read, the known part, the write"
    );
}

#[test]
fn attach_struct_flags() {
    let a = attach(attach_bytes(16, IOASID_ATTACH_USER_PASID, 3, 5, &[])).unwrap();
    assert_eq!((a.flags, a.user_pasid), (IOASID_ATTACH_USER_PASID, 5));
    let e = attach(attach_bytes(16, 1 << 1, 3, 0, &[])).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(e.message.contains("unknown flags 0x2"), "{}", e.message);
}

#[test]
fn vfio_arg_bounds() {
    let rules = |min| crate::StructRules {
        c_name: "x",
        min_size: min,
        size: min,
        flags: crate::Flags::Absent,
        tail: crate::Tail::Zero,
    };
    let mut mem = vec![0u8; 64];
    mem[..4].copy_from_slice(&32u32.to_ne_bytes());
    let c = FakeCaller::new(BASE, mem.clone(), 1);
    assert_eq!(read_data(&c, BASE, &rules(32)).unwrap().len(), 32);
    assert_eq!(
        read_data(&c, BASE, &rules(33)).unwrap_err().errno,
        Errno::EINVAL
    );
    mem[..4].copy_from_slice(&(MAX_ARG as u32 + 1).to_ne_bytes());
    let c = FakeCaller::new(BASE, mem.clone(), 1);
    assert_eq!(
        read_data(&c, BASE, &rules(16)).unwrap_err().errno,
        Errno::E2BIG
    );
    mem[..4].copy_from_slice(&65u32.to_ne_bytes());
    let c = FakeCaller::new(BASE, mem, 1);
    assert_eq!(
        read_data(&c, BASE, &rules(16)).unwrap_err().errno,
        Errno::EFAULT
    );
}

#[test]
fn the_unknown_flags_errno_is_the_tables() {
    let seen = Seen::default();
    let c = FakeCaller::new(BASE, attach_bytes(16, 2, 3, 0, &[]), 1);
    let op = IOMMUFD_STYLE.find(ATTACH).unwrap();
    let e = IOMMUFD_STYLE.call(op, &seen, &c, 9, BASE).unwrap_err();
    assert_eq!(e.errno, Errno::EOPNOTSUPP);
    let op = TABLE.find(ATTACH).unwrap();
    let e = TABLE.call(op, &seen, &c, 9, BASE).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(seen.0.borrow().is_empty(), "no handler ran");
}

#[test]
fn every_kind_of_row_reaches_its_handler_with_typed_values() {
    let seen = Seen::default();
    let call = |number, c: &FakeCaller, arg| {
        let op = TABLE.find(number).unwrap();
        TABLE.call(op, &seen, c, 9, arg)
    };
    let c = FakeCaller::new(BASE, attach_bytes(24, 1, 3, 5, &[0; 8]), 1);
    assert_eq!(call(ATTACH, &c, BASE), Ok(7));
    let mut data = vec![0u8; 48];
    data[..4].copy_from_slice(&40u32.to_ne_bytes());
    let c = FakeCaller::new(BASE, data, 1);
    assert_eq!(call(DATA, &c, BASE), Ok(0));
    assert_eq!(call(NONE, &c, 0xdead), Ok(1));
    assert_eq!(call(INT, &c, 42), Ok(42));
    assert_eq!(
        *seen.0.borrow(),
        ["attach 3 5 size 24", "data 40 40", "none NONE"]
    );
    // The rows describe themselves.
    let rules = TABLE.find(DATA).unwrap().rules().unwrap();
    assert_eq!(
        (rules.c_name, rules.min_size, rules.size),
        ("Header32", 32, 32)
    );
    let rules = TABLE.find(ATTACH).unwrap().rules().unwrap();
    assert_eq!((rules.c_name, rules.min_size), ("vfio_attach_ioasid", 16));
    assert!(matches!(TABLE.find(INT).unwrap().handler, Handler::Int(_)));
    assert!(TABLE.find(3).is_none());
}

#[test]
fn respond_writes_what_the_callers_size_covers() {
    let c = FakeCaller::new(BASE, vec![0xee; 32], 1);
    let u = Ucmd {
        caller: &c,
        fh: 0,
        name: "x",
        arg: BASE,
        user_size: 12,
    };
    let v = VfioAttachIoasid {
        argsz: 16,
        flags: 1,
        ioasid: 2,
        user_pasid: 3,
    };
    u.respond(&v).unwrap();
    assert_eq!(c.get(BASE, 12), v.as_bytes()[..12]);
    assert_eq!(c.get(BASE + 12, 4), [0xee; 4]);
}
