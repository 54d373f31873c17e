"""Python clients for the scenario tests (importable as ``harness``):
``vfio`` (legacy VFIO), ``edu`` (QEMU's DMA test device), ``topology``
(where the devices are), ``ioasid`` (the /dev/ioasid ABI), ``qtest``
(QEMU driven through its qtest protocol and QMP) and ``qtest_edu`` (an edu
assigned to that QEMU, driven as its guest's driver would)."""
