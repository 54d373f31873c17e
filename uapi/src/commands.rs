//! The dispatch table: every command, its number and its argument, with the
//! minimum `argsz` and accepted flags of each struct argument in one place.

use crate::numbers::*;
use crate::structs::*;

/// How a command's `flags` field is checked on input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagsCheck {
    /// Bits outside the mask are `EINVAL`.
    Mask(u32),
    /// The field is output only; its input value is ignored
    /// (`IOASID_GET_INFO`).
    OutputOnly,
}

/// Facts about a struct argument that a dispatcher needs before looking
/// at the fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructArg {
    /// C name of the struct.
    pub c_name: &'static str,
    /// Smallest `argsz` accepted (`EINVAL` below).
    pub min_size: usize,
    /// Size of the struct this crate knows; bytes between it and `argsz`
    /// must be zero (`E2BIG`), unless `tail_is_output`.
    pub size: usize,
    /// Input flag check.
    pub flags: FlagsCheck,
    /// The bytes past the struct are an output buffer (the capability chain
    /// of `IOASID_GET_INFO`): not checked for zero.
    pub tail_is_output: bool,
}

impl StructArg {
    /// The entry of a struct argument with the common rules: minimum size
    /// is the whole struct, flags checked against `T::VALID_FLAGS`.
    pub const fn of<T: ArgStruct>() -> Self {
        StructArg {
            c_name: T::C_NAME,
            min_size: T::MIN_SIZE,
            size: core::mem::size_of::<T>(),
            flags: T::FLAGS,
            tail_is_output: T::TAIL_IS_OUTPUT,
        }
    }
}

/// A struct passed by pointer to a command.
pub trait ArgStruct: CStruct {
    /// Smallest `argsz` accepted. Version 1 of every struct: all of it.
    const MIN_SIZE: usize = core::mem::size_of::<Self>();
    /// Input flags check.
    const FLAGS: FlagsCheck;
    /// The bytes past the struct are output (not checked for zero).
    const TAIL_IS_OUTPUT: bool = false;
}

impl ArgStruct for IoasidRegisterMemory {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(0);
}
impl ArgStruct for IoasidInfo {
    const FLAGS: FlagsCheck = FlagsCheck::OutputOnly;
    const TAIL_IS_OUTPUT: bool = true;
}
impl ArgStruct for IoasidDmaMap {
    const FLAGS: FlagsCheck =
        FlagsCheck::Mask(IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE);
}
impl ArgStruct for IoasidDmaUnmap {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(IOASID_DMA_UNMAP_FLAG_ALL);
}
impl ArgStruct for IoasidBindPgtable {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(0);
}
impl ArgStruct for IoasidUnbindPgtable {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(0);
}
impl ArgStruct for IoasidBindPasidTable {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(0);
}
impl ArgStruct for IoasidUnbindPasidTable {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(0);
}
impl ArgStruct for IoasidInvalidateCache {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(
        IOASID_INVALIDATE_ADDR | IOASID_INVALIDATE_PASID | IOASID_INVALIDATE_PASID_CACHE,
    );
}
impl ArgStruct for VfioAttachIoasid {
    const FLAGS: FlagsCheck = FlagsCheck::Mask(IOASID_ATTACH_USER_PASID);
}

/// What the ioctl's third argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// Nothing; the value is ignored.
    None,
    /// A plain integer (extension id, IOASID, fd).
    Int,
    /// A pointer to a struct.
    Struct(StructArg),
}

/// The commands on the ioasid file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoasidCmd {
    /// `IOASID_CHECK_EXTENSION`
    CheckExtension,
    /// `IOASID_REGISTER_MEMORY`
    RegisterMemory,
    /// `IOASID_UNREGISTER_MEMORY`
    UnregisterMemory,
    /// `IOASID_ALLOC`
    Alloc,
    /// `IOASID_FREE`
    Free,
    /// `IOASID_GET_INFO`
    GetInfo,
    /// `IOASID_MAP_DMA`
    MapDma,
    /// `IOASID_UNMAP_DMA`
    UnmapDma,
    /// `IOASID_CREATE_NESTING`
    CreateNesting,
    /// `IOASID_BIND_PGTABLE`
    BindPgtable,
    /// `IOASID_UNBIND_PGTABLE`
    UnbindPgtable,
    /// `IOASID_BIND_PASID_TABLE`
    BindPasidTable,
    /// `IOASID_UNBIND_PASID_TABLE`
    UnbindPasidTable,
    /// `IOASID_INVALIDATE_CACHE`
    InvalidateCache,
    /// `IOASID_DAEMON_IDENTIFY` (daemon-private)
    DaemonIdentify,
}

impl IoasidCmd {
    /// Every command, in number order.
    pub const ALL: [IoasidCmd; 15] = [
        IoasidCmd::CheckExtension,
        IoasidCmd::RegisterMemory,
        IoasidCmd::UnregisterMemory,
        IoasidCmd::Alloc,
        IoasidCmd::Free,
        IoasidCmd::GetInfo,
        IoasidCmd::MapDma,
        IoasidCmd::UnmapDma,
        IoasidCmd::CreateNesting,
        IoasidCmd::BindPgtable,
        IoasidCmd::UnbindPgtable,
        IoasidCmd::BindPasidTable,
        IoasidCmd::UnbindPasidTable,
        IoasidCmd::InvalidateCache,
        IoasidCmd::DaemonIdentify,
    ];

    /// The ioctl number.
    pub const fn request(self) -> u32 {
        match self {
            IoasidCmd::CheckExtension => IOASID_CHECK_EXTENSION,
            IoasidCmd::RegisterMemory => IOASID_REGISTER_MEMORY,
            IoasidCmd::UnregisterMemory => IOASID_UNREGISTER_MEMORY,
            IoasidCmd::Alloc => IOASID_ALLOC,
            IoasidCmd::Free => IOASID_FREE,
            IoasidCmd::GetInfo => IOASID_GET_INFO,
            IoasidCmd::MapDma => IOASID_MAP_DMA,
            IoasidCmd::UnmapDma => IOASID_UNMAP_DMA,
            IoasidCmd::CreateNesting => IOASID_CREATE_NESTING,
            IoasidCmd::BindPgtable => IOASID_BIND_PGTABLE,
            IoasidCmd::UnbindPgtable => IOASID_UNBIND_PGTABLE,
            IoasidCmd::BindPasidTable => IOASID_BIND_PASID_TABLE,
            IoasidCmd::UnbindPasidTable => IOASID_UNBIND_PASID_TABLE,
            IoasidCmd::InvalidateCache => IOASID_INVALIDATE_CACHE,
            IoasidCmd::DaemonIdentify => IOASID_DAEMON_IDENTIFY,
        }
    }

    /// The C name of the command.
    pub const fn name(self) -> &'static str {
        match self {
            IoasidCmd::CheckExtension => "IOASID_CHECK_EXTENSION",
            IoasidCmd::RegisterMemory => "IOASID_REGISTER_MEMORY",
            IoasidCmd::UnregisterMemory => "IOASID_UNREGISTER_MEMORY",
            IoasidCmd::Alloc => "IOASID_ALLOC",
            IoasidCmd::Free => "IOASID_FREE",
            IoasidCmd::GetInfo => "IOASID_GET_INFO",
            IoasidCmd::MapDma => "IOASID_MAP_DMA",
            IoasidCmd::UnmapDma => "IOASID_UNMAP_DMA",
            IoasidCmd::CreateNesting => "IOASID_CREATE_NESTING",
            IoasidCmd::BindPgtable => "IOASID_BIND_PGTABLE",
            IoasidCmd::UnbindPgtable => "IOASID_UNBIND_PGTABLE",
            IoasidCmd::BindPasidTable => "IOASID_BIND_PASID_TABLE",
            IoasidCmd::UnbindPasidTable => "IOASID_UNBIND_PASID_TABLE",
            IoasidCmd::InvalidateCache => "IOASID_INVALIDATE_CACHE",
            IoasidCmd::DaemonIdentify => "IOASID_DAEMON_IDENTIFY",
        }
    }

    /// The argument, with the struct rules for struct arguments.
    pub const fn arg(self) -> ArgKind {
        match self {
            IoasidCmd::Alloc | IoasidCmd::DaemonIdentify => ArgKind::None,
            IoasidCmd::CheckExtension | IoasidCmd::Free | IoasidCmd::CreateNesting => ArgKind::Int,
            IoasidCmd::RegisterMemory | IoasidCmd::UnregisterMemory => {
                ArgKind::Struct(StructArg::of::<IoasidRegisterMemory>())
            }
            IoasidCmd::GetInfo => ArgKind::Struct(StructArg::of::<IoasidInfo>()),
            IoasidCmd::MapDma => ArgKind::Struct(StructArg::of::<IoasidDmaMap>()),
            IoasidCmd::UnmapDma => ArgKind::Struct(StructArg::of::<IoasidDmaUnmap>()),
            IoasidCmd::BindPgtable => ArgKind::Struct(StructArg::of::<IoasidBindPgtable>()),
            IoasidCmd::UnbindPgtable => ArgKind::Struct(StructArg::of::<IoasidUnbindPgtable>()),
            IoasidCmd::BindPasidTable => ArgKind::Struct(StructArg::of::<IoasidBindPasidTable>()),
            IoasidCmd::UnbindPasidTable => {
                ArgKind::Struct(StructArg::of::<IoasidUnbindPasidTable>())
            }
            IoasidCmd::InvalidateCache => ArgKind::Struct(StructArg::of::<IoasidInvalidateCache>()),
        }
    }

    /// The extension `IOASID_CHECK_EXTENSION` must report for the command
    /// to be available (`ENOTTY` otherwise), if it belongs to one.
    pub const fn extension(self) -> Option<u32> {
        match self {
            IoasidCmd::RegisterMemory | IoasidCmd::UnregisterMemory => {
                Some(IOASID_EXT_REGISTER_MEMORY)
            }
            IoasidCmd::MapDma | IoasidCmd::UnmapDma => Some(IOASID_EXT_TYPE1V2_DMA),
            IoasidCmd::CreateNesting => Some(IOASID_EXT_NESTING_SOFTWARE),
            IoasidCmd::BindPgtable | IoasidCmd::UnbindPgtable | IoasidCmd::InvalidateCache => {
                Some(IOASID_EXT_BIND_PGTABLE_SHADOW)
            }
            IoasidCmd::BindPasidTable | IoasidCmd::UnbindPasidTable => {
                Some(IOASID_EXT_BIND_PASID_TABLE_SHADOW)
            }
            IoasidCmd::CheckExtension
            | IoasidCmd::Alloc
            | IoasidCmd::Free
            | IoasidCmd::GetInfo
            | IoasidCmd::DaemonIdentify => None,
        }
    }

    /// The command with this ioctl number, if any.
    pub fn from_request(request: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.request() == request)
    }
}

impl TryFrom<u32> for IoasidCmd {
    type Error = u32;

    /// Unknown numbers come back as the error (answer them `ENOTTY`).
    fn try_from(request: u32) -> Result<Self, u32> {
        Self::from_request(request).ok_or(request)
    }
}

/// The commands this ABI adds to a VFIO device file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VfioDeviceCmd {
    /// `VFIO_BIND_IOASID_FD`
    BindIoasidFd,
    /// `VFIO_UNBIND_IOASID_FD`
    UnbindIoasidFd,
    /// `VFIO_ATTACH_IOASID`
    AttachIoasid,
    /// `VFIO_DETACH_IOASID`
    DetachIoasid,
}

impl VfioDeviceCmd {
    /// Every command, in number order.
    pub const ALL: [VfioDeviceCmd; 4] = [
        VfioDeviceCmd::BindIoasidFd,
        VfioDeviceCmd::UnbindIoasidFd,
        VfioDeviceCmd::AttachIoasid,
        VfioDeviceCmd::DetachIoasid,
    ];

    /// The ioctl number.
    pub const fn request(self) -> u32 {
        match self {
            VfioDeviceCmd::BindIoasidFd => VFIO_BIND_IOASID_FD,
            VfioDeviceCmd::UnbindIoasidFd => VFIO_UNBIND_IOASID_FD,
            VfioDeviceCmd::AttachIoasid => VFIO_ATTACH_IOASID,
            VfioDeviceCmd::DetachIoasid => VFIO_DETACH_IOASID,
        }
    }

    /// The C name of the command.
    pub const fn name(self) -> &'static str {
        match self {
            VfioDeviceCmd::BindIoasidFd => "VFIO_BIND_IOASID_FD",
            VfioDeviceCmd::UnbindIoasidFd => "VFIO_UNBIND_IOASID_FD",
            VfioDeviceCmd::AttachIoasid => "VFIO_ATTACH_IOASID",
            VfioDeviceCmd::DetachIoasid => "VFIO_DETACH_IOASID",
        }
    }

    /// The argument.
    pub const fn arg(self) -> ArgKind {
        match self {
            VfioDeviceCmd::BindIoasidFd | VfioDeviceCmd::UnbindIoasidFd => ArgKind::Int,
            VfioDeviceCmd::AttachIoasid | VfioDeviceCmd::DetachIoasid => {
                ArgKind::Struct(StructArg::of::<VfioAttachIoasid>())
            }
        }
    }

    /// The command with this ioctl number, if any.
    pub fn from_request(request: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.request() == request)
    }
}

impl TryFrom<u32> for VfioDeviceCmd {
    type Error = u32;

    /// Numbers that are not ours come back as the error (on a device file:
    /// forward them to VFIO or answer `ENOTTY`).
    fn try_from(request: u32) -> Result<Self, u32> {
        Self::from_request(request).ok_or(request)
    }
}
