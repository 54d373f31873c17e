//! Byte views of [`ArgStruct`]s: how an argument struct is copied from a
//! caller, handed to the kernel and copied back.

use crate::structs::ArgStruct;

/// An all-zero `T`.
pub fn zeroed<T: ArgStruct>() -> T {
    // SAFETY: every bit pattern of an `ArgStruct`, all zeros included, is a
    // valid value.
    unsafe { std::mem::zeroed() }
}

/// The bytes of `value`.
pub fn bytes_of<T: ArgStruct>(value: &T) -> &[u8] {
    // SAFETY: an `ArgStruct` has no padding, so all `size_of::<T>()` bytes
    // are initialised; the slice borrows `value` for its whole life.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// The bytes of `value`, to be written.
pub fn bytes_of_mut<T: ArgStruct>(value: &mut T) -> &mut [u8] {
    // SAFETY: no padding (every byte is initialised) and every bit pattern
    // is valid, so any bytes written through the slice leave a valid `T`;
    // the slice borrows `value` mutably for its whole life.
    unsafe {
        std::slice::from_raw_parts_mut((value as *mut T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// The `T` at the start of `bytes`, if they are long enough.
pub fn read_prefix<T: ArgStruct>(bytes: &[u8]) -> Option<T> {
    let mut value = zeroed::<T>();
    let n = std::mem::size_of::<T>();
    bytes_of_mut(&mut value).copy_from_slice(bytes.get(..n)?);
    Some(value)
}

/// Write `value` over the start of `bytes`, if they are long enough.
pub fn write_prefix<T: ArgStruct>(bytes: &mut [u8], value: &T) -> Option<()> {
    let n = std::mem::size_of::<T>();
    bytes.get_mut(..n)?.copy_from_slice(bytes_of(value));
    Some(())
}
