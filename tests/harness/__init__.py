"""Python clients for the scenario tests (importable as ``harness``):
``vfio`` (legacy VFIO), ``edu`` (QEMU's DMA test device), ``topology``
(where the devices are), ``ioasid`` (the /dev/ioasid ABI), ``qtest``
(QEMU driven through its qtest protocol and QMP), ``qtest_edu`` (an edu
assigned to that QEMU, driven as its guest's driver would), ``kselftest``
(the kernel's VFIO selftests, run and their TAP read) and
``project_scripts`` (the project's scripts loaded as modules)."""
