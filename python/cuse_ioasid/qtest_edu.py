"""An edu device assigned to a QEMU under qtest, driven as a guest driver would.

The edu (PCI 1234:11e8) of the test VM is handed to an inner QEMU with
vfio-pci (legacy ``host=``, or iommufd fds). No guest OS runs there: this
module plays the guest's driver through the qtest protocol
(``cuse_ioasid.qtest``). It assigns BAR0 an address, enables memory space and
bus mastering, points the device's MSI at a word of guest RAM, and programs
DMA between guest RAM and the device's buffer at guest-physical addresses.

Why this proves the IOMMU path: the inner QEMU maps its guest RAM for DMA
(a VFIO type1 container, or an iommufd IOAS) at IOVA = guest-physical
address. The edu is a device of the test VM; its DMA goes through the test
VM's IOMMU to the inner QEMU's RAM pages. Bytes that qtest wrote at one
guest-physical address and reads back at another crossed that mapping
twice.

Observing the MSI: vfio-pci gets the device's MSI as an eventfd and, with no
KVM, delivers it by writing the message data at the message address in the
guest's address space (``msi_notify``). With the address set to guest RAM,
the interrupt shows up as a memory write that qtest can read.
"""

from __future__ import annotations

import os

from .edu import (BUFFER_ADDR, DMA_CMD_IRQ, DMA_CMD_START, DMA_CMD_TO_RAM, DMA_LIMIT,
                         EDU_DEVICE, EDU_ID_VALUE, EDU_VENDOR, MAX_TRANSFER, REG_DMA_CMD,
                         REG_DMA_COUNT, REG_DMA_DST, REG_DMA_SRC, REG_ID, REG_LIVENESS)
from .qtest import PciConfig, Qemu, QtestError, find_functions, wait_until

REG_INTR_STATUS = 0x24
REG_INTR_ACK = 0x64
INTR_DMA_DONE = 0x100  # the status bit a finished DMA with DMA_CMD_IRQ sets

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_BAR0 = 0x10
PCI_CAP_ID_MSI = 0x05
PCI_MSI_FLAGS_ENABLE = 1 << 0
PCI_MSI_FLAGS_64BIT = 1 << 7

# Where BAR0 goes: inside q35's 32-bit PCI hole, below the IO-APIC/LAPIC.
BAR0_ADDR = 0xE000_0000


class QtestEdu:
    """The edu function ``cfg`` of ``qemu``'s machine."""

    def __init__(self, qemu: Qemu, cfg: PciConfig, bar0: int = BAR0_ADDR):
        self.qemu = qemu
        self.cfg = cfg
        self.bar0 = bar0
        self.msi_addr: int | None = None
        self.msi_data: int | None = None

    @classmethod
    def find(cls, qemu: Qemu) -> QtestEdu:
        """The one edu on the inner machine's bus 0."""
        found = find_functions(qemu, EDU_VENDOR, EDU_DEVICE)
        if len(found) != 1:
            raise QtestError(f"expected one edu on the inner machine's bus 0, found {found}")
        return cls(qemu, found[0])

    # -- set-up, as firmware and a driver would ------------------------

    def enable(self) -> None:
        """Assign BAR0, turn on memory decoding and bus mastering, check the
        device answers (ID and liveness registers)."""
        self.cfg.write32(PCI_BAR0, self.bar0)
        got = self.cfg.read32(PCI_BAR0) & ~0xF
        if got != self.bar0:
            raise QtestError(f"BAR0 reads {got:#x} after writing {self.bar0:#x}")
        cmd = self.cfg.read16(PCI_COMMAND)
        self.cfg.write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        ident = self.read32(REG_ID)
        if ident != EDU_ID_VALUE:
            raise QtestError(f"edu ID register reads {ident:#x} through BAR0, "
                             f"expected {EDU_ID_VALUE:#x}")
        self.write32(REG_LIVENESS, 0x12345678)
        if self.read32(REG_LIVENESS) != (~0x12345678 & 0xFFFFFFFF):
            raise QtestError("edu liveness register did not invert what was written")

    def enable_msi(self, addr: int, data: int) -> None:
        """Program and enable MSI with the message ``data`` at guest-physical
        ``addr`` (guest RAM, so the interrupt can be seen as a write)."""
        cap = self.cfg.capability(PCI_CAP_ID_MSI)
        if cap is None:
            raise QtestError("the assigned edu shows no MSI capability")
        flags = self.cfg.read16(cap + 2)
        self.cfg.write32(cap + 4, addr & 0xFFFF_FFFF)
        if flags & PCI_MSI_FLAGS_64BIT:
            self.cfg.write32(cap + 8, addr >> 32)
            self.cfg.write16(cap + 12, data)
        else:
            self.cfg.write16(cap + 8, data)
        self.cfg.write16(cap + 2, flags | PCI_MSI_FLAGS_ENABLE)
        if not self.cfg.read16(cap + 2) & PCI_MSI_FLAGS_ENABLE:
            raise QtestError("MSI enable bit did not stick")
        self.msi_addr, self.msi_data = addr, data

    # -- registers -----------------------------------------------------

    def read32(self, reg: int) -> int:
        return self.qemu.readl(self.bar0 + reg)

    def write32(self, reg: int, value: int) -> None:
        self.qemu.writel(self.bar0 + reg, value)

    def write64(self, reg: int, value: int) -> None:
        self.qemu.writeq(self.bar0 + reg, value)

    # -- DMA -----------------------------------------------------------

    def dma(self, src: int, dst: int, length: int, to_ram: bool, irq: bool = False,
            timeout: float = 30.0) -> None:
        """One transfer between guest-physical memory and the device buffer;
        returns once the device reports it finished. With ``irq``, also
        waits for the MSI to land in guest RAM and acknowledges it."""
        if not 0 < length <= MAX_TRANSFER:
            raise ValueError(f"edu transfers are 1..{MAX_TRANSFER} bytes, not {length}")
        gpa = dst if to_ram else src
        if gpa + length > DMA_LIMIT:
            raise ValueError(f"address {gpa:#x} beyond the edu DMA mask ({DMA_LIMIT:#x})")
        if irq:
            if self.msi_addr is None:
                raise QtestError("dma(irq=True) needs enable_msi() first")
            self.qemu.writel(self.msi_addr, 0)
        self.write64(REG_DMA_SRC, src)
        self.write64(REG_DMA_DST, dst)
        self.write64(REG_DMA_COUNT, length)
        cmd = DMA_CMD_START | (DMA_CMD_TO_RAM if to_ram else 0) | (DMA_CMD_IRQ if irq else 0)
        self.write32(REG_DMA_CMD, cmd)
        wait_until("the edu DMA to finish",
                   lambda: not self.read32(REG_DMA_CMD) & DMA_CMD_START, timeout)
        if irq:
            self.wait_msi(timeout)
            status = self.read32(REG_INTR_STATUS)
            if not status & INTR_DMA_DONE:
                raise QtestError(f"MSI arrived but the interrupt status is {status:#x}")
            self.write32(REG_INTR_ACK, status)

    def wait_msi(self, timeout: float) -> None:
        """Wait until the MSI's data appears at its address in guest RAM."""
        assert self.msi_addr is not None and self.msi_data is not None
        addr, data = self.msi_addr, self.msi_data
        wait_until(f"the MSI (data {data:#x} written at {addr:#x})",
                   lambda: self.qemu.readl(addr) == data, timeout)

    def to_device(self, gpa: int, length: int, irq: bool = False) -> None:
        """Guest RAM at ``gpa`` → the device buffer."""
        self.dma(gpa, BUFFER_ADDR, length, to_ram=False, irq=irq)

    def to_memory(self, gpa: int, length: int, irq: bool = False) -> None:
        """The device buffer → guest RAM at ``gpa``."""
        self.dma(BUFFER_ADDR, gpa, length, to_ram=True, irq=irq)

    def round_trip(self, src: int, dst: int, length: int, irq: bool = False) -> bytes:
        """Random bytes written into guest RAM at ``src`` go to the device
        and back into guest RAM at ``dst``; raises ``QtestError`` unless
        ``dst`` then holds exactly them and ``src`` is unchanged. Returns
        the bytes."""
        pattern = os.urandom(length)
        self.qemu.memwrite(src, pattern)
        self.qemu.memwrite(dst, bytes(length))
        self.to_device(src, length, irq=irq)
        self.to_memory(dst, length, irq=irq)
        got = self.qemu.memread(dst, length)
        if got != pattern:
            raise QtestError(f"guest RAM at {dst:#x} after the edu's DMA differs from the pattern "
                             f"in {sum(a != b for a, b in zip(got, pattern))} of {length} bytes")
        if self.qemu.memread(src, length) != pattern:
            raise QtestError(f"the source at {src:#x} was modified")
        return pattern
