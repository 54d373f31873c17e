"""Python clients for the scenario tests (importable as ``harness``):
``vfio`` (legacy VFIO), ``edu`` (QEMU's DMA test device), ``topology``
(where the devices are), ``ioasid`` (the /dev/ioasid ABI)."""
