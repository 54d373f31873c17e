"""The README's example scenario ("Python client and pytest plugin"),
verbatim: a scenario for your own program in a few lines, with the
fixtures of the cuse_ioasid pytest plugin. tests/host/test_python_package.py
checks that the README shows this file's test as it is."""

import os
import subprocess


def test_my_program(ioasid_daemon, bound_edu, edu_dma_check):
    # bound_edu: an edu device bound to a fresh /dev/ioasid file, attached
    # to a new IOASID. The check sends bytes RAM -> device -> RAM through it.
    edu_dma_check(bound_edu)
    me = ioasid_daemon.client(os.getpid())  # cuse-ioasid status --json
    assert me["files"][0]["devices"][0]["pci"] == bound_edu.bdf

    # Your program, on another device: here the RFC's flow 5.1, in C.
    node = next(n for bdf, n in ioasid_daemon.nodes.items() if bdf != bound_edu.bdf)
    run = subprocess.run(["target/c/flow_5_1", node], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
