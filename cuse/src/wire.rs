//! Wire layer: the FUSE 7.38 structures and constants a CUSE server sees,
//! as `zerocopy` types, and a bounded cursor to take them apart.
//!
//! Layouts follow `include/uapi/linux/fuse.h`; every struct carries a
//! compile-time size check. Nothing here panics on bytes from the kernel.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// FUSE major protocol version spoken (the kernel refuses any other).
pub const FUSE_KERNEL_VERSION: u32 = 7;
/// FUSE minor protocol version this crate implements.
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 38;
/// The lowest minor version CUSE accepts in the CUSE_INIT reply.
pub const CUSE_MIN_MINOR_VERSION: u32 = 11;

/// `cuse_init_out.flags`: ioctls reach the server with the raw argument.
pub const CUSE_UNRESTRICTED_IOCTL: u32 = 1 << 0;

/// `fuse_ioctl_in.flags`: 32-bit compat ioctl.
pub const FUSE_IOCTL_COMPAT: u32 = 1 << 0;
/// `fuse_ioctl_in.flags`: not restricted to well-formed ioctls.
pub const FUSE_IOCTL_UNRESTRICTED: u32 = 1 << 1;
/// `fuse_ioctl_out.flags`: retry with new iovecs.
pub const FUSE_IOCTL_RETRY: u32 = 1 << 2;
/// `fuse_ioctl_in.flags`: 32-bit ioctl.
pub const FUSE_IOCTL_32BIT: u32 = 1 << 3;
/// `fuse_ioctl_in.flags`: the ioctl is on a directory.
pub const FUSE_IOCTL_DIR: u32 = 1 << 4;
/// `fuse_ioctl_in.flags`: x32 compat ioctl.
pub const FUSE_IOCTL_COMPAT_X32: u32 = 1 << 5;

/// `fuse_poll_in.flags`: the kernel wants a notification when ready.
pub const FUSE_POLL_SCHEDULE_NOTIFY: u32 = 1 << 0;

/// Notification code for a poll wake-up (`fuse_notify_code`).
pub const FUSE_NOTIFY_POLL: i32 = 1;

/// Bit set in the unique id of an INTERRUPT request.
pub const FUSE_INT_REQ_BIT: u64 = 1 << 0;

/// Largest device-info string the kernel accepts after `cuse_init_out`.
pub const CUSE_INIT_INFO_MAX: usize = 4096;

/// The kernel's minimum read buffer (`FUSE_MIN_READ_BUFFER`).
pub const FUSE_MIN_READ_BUFFER: usize = 8192;

/// Request opcodes a CUSE server may meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Opcode {
    /// `FUSE_FORGET` (never sent by CUSE; no reply).
    Forget = 2,
    /// `FUSE_OPEN`.
    Open = 14,
    /// `FUSE_READ`.
    Read = 15,
    /// `FUSE_WRITE`.
    Write = 16,
    /// `FUSE_RELEASE`.
    Release = 18,
    /// `FUSE_FLUSH` (not sent by CUSE).
    Flush = 25,
    /// `FUSE_INTERRUPT`.
    Interrupt = 36,
    /// `FUSE_DESTROY` (not sent by CUSE).
    Destroy = 38,
    /// `FUSE_IOCTL`.
    Ioctl = 39,
    /// `FUSE_POLL`.
    Poll = 40,
    /// `FUSE_BATCH_FORGET` (never sent by CUSE; no reply).
    BatchForget = 42,
    /// `CUSE_INIT`.
    CuseInit = 4096,
}

impl TryFrom<u32> for Opcode {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            2 => Opcode::Forget,
            14 => Opcode::Open,
            15 => Opcode::Read,
            16 => Opcode::Write,
            18 => Opcode::Release,
            25 => Opcode::Flush,
            36 => Opcode::Interrupt,
            38 => Opcode::Destroy,
            39 => Opcode::Ioctl,
            40 => Opcode::Poll,
            42 => Opcode::BatchForget,
            4096 => Opcode::CuseInit,
            other => return Err(other),
        })
    }
}

macro_rules! wire_struct {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        #[allow(missing_docs)]
        pub struct $name { $($(#[$fm])* pub $field: $ty),* }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
    };
}

wire_struct!(
    /// `struct fuse_in_header`: starts every request.
    FuseInHeader, 40, {
    len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32, pid: u32,
    total_extlen: u16, padding: u16,
});
wire_struct!(
    /// `struct fuse_out_header`: starts every reply and notification.
    FuseOutHeader, 16, { len: u32, error: i32, unique: u64 });
wire_struct!(
    /// `struct cuse_init_in`.
    CuseInitIn, 16, { major: u32, minor: u32, unused: u32, flags: u32 });
wire_struct!(
    /// `struct cuse_init_out`, followed by the device-info strings.
    CuseInitOut, 72, {
    major: u32, minor: u32, unused: u32, flags: u32, max_read: u32, max_write: u32,
    dev_major: u32, dev_minor: u32, spare: [u32; 10],
});
wire_struct!(
    /// `struct fuse_open_in`.
    FuseOpenIn, 8, { flags: u32, open_flags: u32 });
wire_struct!(
    /// `struct fuse_open_out`.
    FuseOpenOut, 16, { fh: u64, open_flags: u32, padding: u32 });
wire_struct!(
    /// `struct fuse_read_in`.
    FuseReadIn, 40, {
    fh: u64, offset: u64, size: u32, read_flags: u32, lock_owner: u64, flags: u32, padding: u32,
});
wire_struct!(
    /// `struct fuse_write_in`, followed by the data.
    FuseWriteIn, 40, {
    fh: u64, offset: u64, size: u32, write_flags: u32, lock_owner: u64, flags: u32, padding: u32,
});
wire_struct!(
    /// `struct fuse_write_out`.
    FuseWriteOut, 8, { size: u32, padding: u32 });
wire_struct!(
    /// `struct fuse_release_in`.
    FuseReleaseIn, 24, { fh: u64, flags: u32, release_flags: u32, lock_owner: u64 });
wire_struct!(
    /// `struct fuse_ioctl_in`, followed by `in_size` bytes of input.
    FuseIoctlIn, 32, {
    fh: u64, flags: u32, cmd: u32, arg: u64, in_size: u32, out_size: u32,
});
wire_struct!(
    /// `struct fuse_ioctl_out`, followed by the output bytes.
    FuseIoctlOut, 16, { result: i32, flags: u32, in_iovs: u32, out_iovs: u32 });
wire_struct!(
    /// `struct fuse_poll_in`.
    FusePollIn, 24, { fh: u64, kh: u64, flags: u32, events: u32 });
wire_struct!(
    /// `struct fuse_poll_out`.
    FusePollOut, 8, { revents: u32, padding: u32 });
wire_struct!(
    /// `struct fuse_notify_poll_wakeup_out`.
    FuseNotifyPollWakeupOut, 8, { kh: u64 });
wire_struct!(
    /// `struct fuse_interrupt_in`.
    FuseInterruptIn, 8, { unique: u64 });

/// Why bytes from the kernel could not be taken apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
}

/// A bounded cursor over one message: every take checks the length and
/// returns an error instead of panicking.
#[derive(Debug)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    /// Bytes not yet taken.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Take a copy of the next `T`.
    pub fn take<T: FromBytes + KnownLayout + Immutable>(
        &mut self,
        what: &'static str,
    ) -> Result<T, WireError> {
        let need = core::mem::size_of::<T>();
        match T::read_from_prefix(self.rest) {
            Ok((value, rest)) => {
                self.rest = rest;
                Ok(value)
            }
            Err(_) => Err(WireError::Truncated {
                what,
                need,
                have: self.rest.len(),
            }),
        }
    }

    /// Take the next `len` bytes.
    pub fn take_bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if len > self.rest.len() {
            return Err(WireError::Truncated {
                what,
                need: len,
                have: self.rest.len(),
            });
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip_and_unknown_is_error() {
        for op in [
            Opcode::Forget,
            Opcode::Open,
            Opcode::Read,
            Opcode::Write,
            Opcode::Release,
            Opcode::Flush,
            Opcode::Interrupt,
            Opcode::Destroy,
            Opcode::Ioctl,
            Opcode::Poll,
            Opcode::BatchForget,
            Opcode::CuseInit,
        ] {
            assert_eq!(Opcode::try_from(op as u32), Ok(op));
        }
        assert_eq!(Opcode::try_from(1), Err(1)); // FUSE_LOOKUP
        assert_eq!(Opcode::try_from(26), Err(26)); // FUSE_INIT
    }

    #[test]
    fn cursor_refuses_short_input() {
        let bytes = [1u8, 0, 0, 0, 2, 0, 0];
        let mut c = Cursor::new(&bytes);
        let e = c.take::<FuseWriteOut>("write_out").unwrap_err();
        assert_eq!(
            e,
            WireError::Truncated {
                what: "write_out",
                need: 8,
                have: 7
            }
        );
        // Nothing was consumed by the failed take.
        assert_eq!(c.remaining(), 7);
        assert_eq!(c.take_bytes(3, "x").unwrap(), &[1, 0, 0]);
        assert!(c.take_bytes(5, "y").is_err());
        assert_eq!(c.take_bytes(4, "z").unwrap(), &[0, 2, 0, 0]);
        assert_eq!(c.remaining(), 0);
    }

    #[test]
    fn field_offsets_match_fuse_h() {
        // Spot checks of offsets that matter (fuse.h, protocol 7.38).
        assert_eq!(core::mem::offset_of!(FuseInHeader, pid), 32);
        assert_eq!(core::mem::offset_of!(FuseInHeader, total_extlen), 36);
        assert_eq!(core::mem::offset_of!(CuseInitOut, dev_major), 24);
        assert_eq!(core::mem::offset_of!(FuseIoctlIn, arg), 16);
        assert_eq!(core::mem::offset_of!(FuseIoctlIn, out_size), 28);
        assert_eq!(core::mem::offset_of!(FusePollIn, events), 20);
        assert_eq!(core::mem::offset_of!(FuseReadIn, lock_owner), 24);
    }
}
