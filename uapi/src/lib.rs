//! The /dev/ioasid uAPI (RFC 2021): ioctl numbers and struct layouts, mirrored from include/linux/ioasid.h.
