"""The project's own test helpers (importable as ``harness``): ``daemon``
(the daemon's binary and pids, the test VM's edu devices), ``kselftest``
(the kernel's VFIO selftests, run and their TAP read), ``unit`` (a systemd
unit read as systemd would), ``vm_guard`` (--require-vm) and
``project_scripts`` (the project's scripts loaded as modules). The Python
client itself (the ABIs, VFIO, the edu driver, the device topology, QEMU's
qtest) is the package ``cuse_ioasid`` in python/."""
