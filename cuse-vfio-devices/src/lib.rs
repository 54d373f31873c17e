//! The /dev/vfio/devices/devN nodes: bind, attach and the device's own VFIO ioctls, served over CUSE.
