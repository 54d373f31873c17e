"""cuse-ioasid's Python client: standard library only.

- ``ioasid``: the 2021 /dev/ioasid uAPI (numbers, ctypes structs, a thin
  client ``IoasidFd`` and the device-node calls);
- ``iommufd``: the kernel's iommufd uAPI (/dev/iommu, the VFIO device cdev);
- ``vfio``: legacy VFIO (containers, groups, device fds, DMA buffers);
- ``edu``: a driver for QEMU's ``edu`` DMA test device on any VFIO device;
- ``topology``: where the edu devices are (PCI address, IOMMU group);
- ``qtest``, ``qtest_edu``: QEMU driven through its qtest protocol and QMP,
  an edu assigned to it driven as its guest's driver would;
- ``pytest_plugin``: fixtures for scenarios (the daemon, an ioasid file, a
  bound edu device, an edu DMA check, the test VM), registered through the
  ``pytest11`` entry point.
"""
