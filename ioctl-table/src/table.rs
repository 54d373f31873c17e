//! One ioctl table per node kind: a row per command, in the shape of the
//! kernel's `IOCTL_OP(number, handler, struct, last_field)`.

use ioasid_uapi::error::Result;
use ioasid_uapi::ArgStruct;
use nix::errno::Errno;

use crate::caller::Caller;
use crate::reader::{self, Flags, StructRules, Tail};

/// One request as a handler sees it: who asked, on which open file, and
/// where its argument is. Handlers write their output through it.
#[derive(Clone, Copy)]
pub struct Ucmd<'a> {
    /// The calling process.
    pub caller: &'a dyn Caller,
    /// The open file (CUSE file handle) the request came on.
    pub fh: u64,
    /// The command's C name, for messages.
    pub name: &'static str,
    /// The ioctl's argument: the address of a struct, or an integer.
    pub arg: u64,
    /// For a struct argument, the size the caller gave (`argsz` or
    /// `size`); 0 otherwise.
    pub user_size: usize,
}

impl<'a> Ucmd<'a> {
    /// The caller as the engine's `Client`, its lines charged to the
    /// context `fh` names (an ioasid file's handle is its context).
    pub fn client(&self) -> crate::client::ClientOf<'a> {
        self.client_as(crate::log::Client::Context(self.fh))
    }

    /// The caller as the engine's `Client`, its lines charged to `log_as`.
    pub fn client_as(&self, log_as: crate::log::Client) -> crate::client::ClientOf<'a> {
        crate::client::ClientOf::new(self.caller, log_as, self.name)
    }

    /// Read `buf.len()` bytes of the caller's argument, `at` bytes into it.
    pub fn read_at(&self, at: usize, buf: &mut [u8]) -> Result<()> {
        reader::read_arg(self.caller, self.arg + at as u64, buf)
    }

    /// Write `data` into the caller's argument, `at` bytes into it.
    pub fn write_at(&self, at: usize, data: &[u8]) -> Result<()> {
        reader::write_arg(self.caller, self.arg + at as u64, data)
    }

    /// Write the bytes `range` of `value` (a struct argument's fields)
    /// back to the same place of the caller's argument.
    pub fn write_fields<T: ArgStruct>(
        &self,
        value: &T,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let start = range.start;
        self.write_at(start, &ioasid_uapi::plain::bytes_of(value)[range])
    }

    /// Write the whole of `value` back, as much of it as the caller's size
    /// covers (the kernel's `iommufd_ucmd_respond`).
    pub fn respond<T: ArgStruct>(&self, value: &T) -> Result<()> {
        let n = self.user_size.min(std::mem::size_of::<T>());
        self.write_fields(value, 0..n)
    }
}

/// The type of a struct row's generated glue: read the struct by the
/// row's rules (with the table's unknown-flags errno), call the handler.
pub type StructCall<Cx> = fn(&Cx, &Ucmd<'_>, &StructRules, Errno) -> Result<i32>;

/// What a command takes and the function that handles it.
pub enum Handler<Cx: 'static> {
    /// No argument (its value is ignored).
    None(fn(&Cx, &Ucmd<'_>) -> Result<i32>),
    /// A plain integer (an id, an fd, an extension number).
    Int(fn(&Cx, &Ucmd<'_>, u64) -> Result<i32>),
    /// An extensible struct, read by [`reader::read_struct`]; the glue,
    /// made by [`ioctl_op!`](crate::ioctl_op), hands the handler the typed
    /// value.
    Struct(StructRules, StructCall<Cx>),
    /// A variable-length struct (a VFIO struct and the array or buffer
    /// after it), read whole by [`reader::read_data`] and handed over as
    /// bytes.
    Data(StructRules, fn(&Cx, &Ucmd<'_>, Vec<u8>) -> Result<i32>),
}

/// One row of a table: one command.
pub struct IoctlOp<Cx: 'static> {
    /// The ioctl number.
    pub number: u32,
    /// Its C name.
    pub name: &'static str,
    /// A precondition the node checks before the argument is read (the
    /// node says what the number means: an extension that must be
    /// provided, a device that must be bound); 0 for none.
    pub requires: u32,
    /// The handler needs no state another call may hold (it answers from
    /// the table and the argument alone): the node may answer it on the
    /// thread that read it, without a handler slot ([`Table::is_quick`]).
    pub stateless: bool,
    /// The argument and the handler.
    pub handler: Handler<Cx>,
}

impl<Cx: 'static> IoctlOp<Cx> {
    /// A command without argument.
    pub const fn none(
        number: u32,
        name: &'static str,
        f: fn(&Cx, &Ucmd<'_>) -> Result<i32>,
    ) -> Self {
        IoctlOp {
            number,
            name,
            requires: 0,
            stateless: false,
            handler: Handler::None(f),
        }
    }

    /// A command taking an integer.
    pub const fn int(
        number: u32,
        name: &'static str,
        f: fn(&Cx, &Ucmd<'_>, u64) -> Result<i32>,
    ) -> Self {
        IoctlOp {
            number,
            name,
            requires: 0,
            stateless: false,
            handler: Handler::Int(f),
        }
    }

    /// A command taking an extensible struct (see [`ioctl_op!`](crate::ioctl_op)).
    pub const fn with_struct(
        number: u32,
        name: &'static str,
        rules: StructRules,
        f: StructCall<Cx>,
    ) -> Self {
        IoctlOp {
            number,
            name,
            requires: 0,
            stateless: false,
            handler: Handler::Struct(rules, f),
        }
    }

    /// A command taking a variable-length struct, handed over as bytes.
    pub const fn with_data(
        number: u32,
        name: &'static str,
        rules: StructRules,
        f: fn(&Cx, &Ucmd<'_>, Vec<u8>) -> Result<i32>,
    ) -> Self {
        IoctlOp {
            number,
            name,
            requires: 0,
            stateless: false,
            handler: Handler::Data(rules, f),
        }
    }

    /// The row with precondition `requires` (see [`IoctlOp::requires`]).
    pub const fn requires(self, requires: u32) -> Self {
        IoctlOp { requires, ..self }
    }

    /// The row marked stateless (see [`IoctlOp::stateless`]).
    pub const fn stateless(self) -> Self {
        IoctlOp {
            stateless: true,
            ..self
        }
    }

    /// The row with its struct's `flags` field output only.
    pub const fn output_flags(self) -> Self {
        self.with_rules(Flags::Output, None)
    }

    /// The row with the bytes past its struct an output buffer.
    pub const fn output_tail(self) -> Self {
        self.with_rules(Flags::Absent, Some(Tail::Output))
    }

    const fn with_rules(self, flags: Flags, tail: Option<Tail>) -> Self {
        let handler = match self.handler {
            Handler::Struct(r, f) => Handler::Struct(
                StructRules {
                    flags: match tail {
                        Some(_) => r.flags,
                        None => flags,
                    },
                    tail: match tail {
                        Some(t) => t,
                        None => r.tail,
                    },
                    ..r
                },
                f,
            ),
            other => other,
        };
        IoctlOp { handler, ..self }
    }

    /// The struct rules of a struct or variable-length argument.
    pub fn rules(&self) -> Option<&StructRules> {
        match &self.handler {
            Handler::Struct(r, _) | Handler::Data(r, _) => Some(r),
            Handler::None(_) | Handler::Int(_) => None,
        }
    }
}

/// The commands of one node kind (or one dialect of a node).
pub struct Table<Cx: 'static> {
    /// What the node is, for messages (`/dev/ioasid`).
    pub node: &'static str,
    /// What an unknown bit in a checked flags field answers: `EINVAL` in
    /// the RFC's ABI, `EOPNOTSUPP` in iommufd's.
    pub unknown_flags: Errno,
    /// The rows, by number.
    pub ops: &'static [IoctlOp<Cx>],
}

impl<Cx: 'static> Table<Cx> {
    /// The row of ioctl `number`, if the table has one.
    pub fn find(&self, number: u32) -> Option<&'static IoctlOp<Cx>> {
        self.ops.iter().find(|op| op.number == number)
    }

    /// Whether ioctl `number` is answered without state another call may
    /// hold: an unknown number (the node refuses it) or a stateless row.
    /// A node serves these at once, never behind other calls
    /// (`cuse_server::Device::ioctl_is_quick`).
    pub fn is_quick(&self, number: u32) -> bool {
        self.find(number).is_none_or(|op| op.stateless)
    }

    /// Run row `op` of this table for `caller` on open file `fh` with
    /// argument `arg`: read the argument by the row's kind and call the
    /// handler. The node has checked the row's precondition.
    pub fn call(
        &self,
        op: &IoctlOp<Cx>,
        cx: &Cx,
        caller: &dyn Caller,
        fh: u64,
        arg: u64,
    ) -> Result<i32> {
        let u = Ucmd {
            caller,
            fh,
            name: op.name,
            arg,
            user_size: 0,
        };
        match &op.handler {
            Handler::None(f) => f(cx, &u),
            Handler::Int(f) => f(cx, &u, arg),
            Handler::Struct(rules, f) => f(cx, &u, rules, self.unknown_flags),
            Handler::Data(rules, f) => {
                let bytes = reader::read_data(caller, arg, rules)?;
                let u = Ucmd {
                    user_size: bytes.len(),
                    ..u
                };
                f(cx, &u, bytes)
            }
        }
    }
}

impl<Cx: 'static> Table<Cx> {
    /// [`Table::call`] for the client whose context is `ctx`, the failure
    /// logged once with the command's name within that client's log budget
    /// ([`crate::log::refusal`]) and turned into its errno: the whole of a
    /// node's dispatch once the row is found.
    pub fn call_logged(
        &self,
        op: &IoctlOp<Cx>,
        cx: &Cx,
        caller: &dyn Caller,
        ctx: u64,
        arg: u64,
    ) -> std::result::Result<i32, Errno> {
        self.call(op, cx, caller, ctx, arg).map_err(|e| {
            crate::log::refusal(crate::log::Client::Context(ctx), self.node, op.name, &e);
            e.errno
        })
    }
}

/// The size of the field `field` returns a reference to (a `const` way to
/// name a field's size: `size_of_field(|s: &S| &s.f)`).
pub const fn size_of_field<S, F>(_field: fn(&S) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// Unknown-flags errno and caller of a struct row's glue (used by
/// [`ioctl_op!`](crate::ioctl_op); not for direct use).
#[doc(hidden)]
pub fn call_struct<Cx, T: ArgStruct>(
    cx: &Cx,
    u: &Ucmd<'_>,
    rules: &StructRules,
    unknown_flags: Errno,
    handler: fn(&Cx, &Ucmd<'_>, T) -> Result<i32>,
) -> Result<i32> {
    let (value, user_size) = reader::read_struct::<T>(u.caller, u.arg, rules, unknown_flags)?;
    let u = Ucmd { user_size, ..*u };
    handler(cx, &u, value)
}

/// A row of an ioctl table, written like the kernel's
/// `IOCTL_OP(number, handler, struct, last_field)`:
///
/// - `ioctl_op!(NUMBER, handler)`: no argument;
///   `handler(&Cx, &Ucmd) -> Result<i32>`.
/// - `ioctl_op!(NUMBER, handler, int)`: an integer;
///   `handler(&Cx, &Ucmd, u64)`.
/// - `ioctl_op!(NUMBER, handler, Struct, last_field)`: an extensible
///   struct whose minimum size is the end of `last_field`, with no flags
///   the daemon checks; `handler(&Cx, &Ucmd, Struct)` gets the value.
/// - `ioctl_op!(NUMBER, handler, Struct, last_field, flags = MASK)`: the
///   same with its `flags` field checked against `MASK`.
/// - `ioctl_op!(NUMBER, handler, data Struct, last_field)`: a
///   variable-length struct; `handler(&Cx, &Ucmd, Vec<u8>)` gets all the
///   bytes the caller's size covers.
///
/// `.requires(n)`, `.output_flags()` and `.output_tail()` adjust a row.
/// `Struct` must be an [`ArgStruct`](crate::ArgStruct) and `NUMBER` a
/// constant in scope (its name is the command's name).
#[macro_export]
macro_rules! ioctl_op {
    ($number:ident, $handler:path) => {
        $crate::IoctlOp::none($number, stringify!($number), $handler)
    };
    ($number:ident, $handler:path, int) => {
        $crate::IoctlOp::int($number, stringify!($number), $handler)
    };
    ($number:ident, $handler:path, data $st:ty, $last:ident) => {
        $crate::IoctlOp::with_data(
            $number,
            stringify!($number),
            $crate::StructRules {
                c_name: stringify!($st),
                min_size: ::core::mem::offset_of!($st, $last)
                    + $crate::size_of_field(|s: &$st| &s.$last),
                size: ::core::mem::size_of::<$st>(),
                flags: $crate::Flags::Absent,
                tail: $crate::Tail::Zero,
            },
            $handler,
        )
    };
    ($number:ident, $handler:path, $st:ty, $last:ident) => {
        $crate::ioctl_op!(@struct $number, $handler, $st, $last, $crate::Flags::Absent)
    };
    ($number:ident, $handler:path, $st:ty, $last:ident, flags = $mask:expr) => {
        $crate::ioctl_op!(
            @struct $number, $handler, $st, $last,
            $crate::Flags::Mask {
                at: ::core::mem::offset_of!($st, flags),
                accepted: $mask,
            }
        )
    };
    (@struct $number:ident, $handler:path, $st:ty, $last:ident, $flags:expr) => {
        $crate::IoctlOp::with_struct(
            $number,
            stringify!($number),
            $crate::StructRules {
                c_name: <$st as $crate::ArgStruct>::C_NAME,
                min_size: ::core::mem::offset_of!($st, $last)
                    + $crate::size_of_field(|s: &$st| &s.$last),
                size: ::core::mem::size_of::<$st>(),
                flags: $flags,
                tail: $crate::Tail::Zero,
            },
            |cx, u, rules, unknown| $crate::table::call_struct::<_, $st>(cx, u, rules, unknown, $handler),
        )
    };
}
