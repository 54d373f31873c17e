//! The `/dev/ioasid` command table: every command in number order, what
//! each takes, and the extension that gates it (moved here from the uapi
//! crate with the table).

use cuse_ioasid::ioctl::IOASID_TABLE;
use ioasid_uapi::*;
use ioctl_table::{Flags, Handler, IoctlOp, Tail};
use nix::errno::Errno;

fn row(cmd: u32) -> &'static IoctlOp<ioasid_engine::Engine> {
    IOASID_TABLE.find(cmd).expect("a row")
}

#[derive(Debug, PartialEq)]
enum Kind {
    None,
    Int,
    Struct,
}

fn kind(cmd: u32) -> Kind {
    match row(cmd).handler {
        Handler::None(_) => Kind::None,
        Handler::Int(_) => Kind::Int,
        Handler::Struct(..) => Kind::Struct,
        Handler::Data(..) => panic!("no variable-length argument on /dev/ioasid"),
    }
}

#[test]
fn command_table_is_consistent() {
    for (i, c) in IOASID_TABLE.ops.iter().enumerate() {
        assert!(std::ptr::eq(row(c.number), c));
        if c.number != IOASID_DAEMON_IDENTIFY {
            assert_eq!(c.number, 0x3b20 + i as u32, "{} out of order", c.name);
        }
    }
    assert_eq!(IOASID_TABLE.ops.len(), 15);
    assert!(IOASID_TABLE.find(0x3b2e).is_none());
    assert!(IOASID_TABLE.find(vfio::VFIO_IOMMU_MAP_DMA).is_none());
    assert_eq!(row(IOASID_MAP_DMA).name, "IOASID_MAP_DMA");
}

#[test]
fn argument_kinds_and_minimum_sizes() {
    for c in [IOASID_ALLOC, IOASID_DAEMON_IDENTIFY] {
        assert_eq!(kind(c), Kind::None, "{}", row(c).name);
    }
    for c in [IOASID_CHECK_EXTENSION, IOASID_FREE, IOASID_CREATE_NESTING] {
        assert_eq!(kind(c), Kind::Int, "{}", row(c).name);
    }
    let sizes = [
        (IOASID_REGISTER_MEMORY, "ioasid_register_memory", 24),
        (IOASID_UNREGISTER_MEMORY, "ioasid_register_memory", 24),
        (IOASID_GET_INFO, "ioasid_info", 24),
        (IOASID_MAP_DMA, "ioasid_dma_map", 40),
        (IOASID_UNMAP_DMA, "ioasid_dma_unmap", 32),
        (IOASID_BIND_PGTABLE, "ioasid_bind_pgtable", 32),
        (IOASID_UNBIND_PGTABLE, "ioasid_unbind_pgtable", 16),
        (IOASID_BIND_PASID_TABLE, "ioasid_bind_pasid_table", 32),
        (IOASID_UNBIND_PASID_TABLE, "ioasid_unbind_pasid_table", 16),
        (IOASID_INVALIDATE_CACHE, "ioasid_invalidate_cache", 32),
    ];
    for (c, name, size) in sizes {
        assert_eq!(kind(c), Kind::Struct, "{} takes a struct", row(c).name);
        let s = row(c).rules().unwrap();
        assert_eq!(
            (s.c_name, s.min_size, s.size),
            (name, size, size),
            "{}",
            row(c).name
        );
        assert_eq!(s.tail == Tail::Output, c == IOASID_GET_INFO);
    }
    assert_eq!(IOASID_TABLE.unknown_flags, Errno::EINVAL);
    let flags = |c| row(c).rules().unwrap().flags;
    assert_eq!(flags(IOASID_GET_INFO), Flags::Output);
    assert_eq!(flags(IOASID_MAP_DMA).accepted(), Some(0b11));
    assert_eq!(flags(IOASID_UNMAP_DMA).accepted(), Some(0b10));
    assert_eq!(flags(IOASID_INVALIDATE_CACHE).accepted(), Some(0b111));
    assert_eq!(flags(IOASID_REGISTER_MEMORY).accepted(), Some(0));
}

#[test]
fn extensions_gate_the_right_commands() {
    let ext = |c| row(c).requires;
    assert_eq!(ext(IOASID_MAP_DMA), IOASID_EXT_TYPE1V2_DMA);
    assert_eq!(ext(IOASID_REGISTER_MEMORY), IOASID_EXT_REGISTER_MEMORY);
    assert_eq!(ext(IOASID_CREATE_NESTING), IOASID_EXT_NESTING_SOFTWARE);
    assert_eq!(ext(IOASID_BIND_PGTABLE), IOASID_EXT_BIND_PGTABLE_SHADOW);
    assert_eq!(ext(IOASID_INVALIDATE_CACHE), IOASID_EXT_BIND_PGTABLE_SHADOW);
    assert_eq!(
        ext(IOASID_BIND_PASID_TABLE),
        IOASID_EXT_BIND_PASID_TABLE_SHADOW
    );
    for c in [
        IOASID_CHECK_EXTENSION,
        IOASID_ALLOC,
        IOASID_FREE,
        IOASID_GET_INFO,
        IOASID_DAEMON_IDENTIFY,
    ] {
        assert_eq!(ext(c), 0, "{} is always available", row(c).name);
    }
}
