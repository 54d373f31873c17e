"""Drive QEMU's ``edu`` device (PCI 1234:11e8) as a DMA engine.

The device copies between memory (through the IOMMU) and its own 4 KiB
buffer at device address 0x40000. The buffer cannot be read over MMIO, so a
mapping is proved by a round trip: memory at IOVA ``src`` → buffer → memory
at IOVA ``dst``, then comparing the bytes in this process's memory.

``Edu`` works on any VFIO device (``cuse_ioasid.vfio.Device``), whether its fd
came from a legacy group or from a ``/dev/vfio/devices/devN`` node.

Limits of the device: IOVAs below 256 MiB (28-bit DMA mask) and transfers
shorter than 4096 bytes (QEMU 7.2 aborts the VM on exactly 4096). A DMA
takes about 100 ms of guest time.
"""

from __future__ import annotations

import time

EDU_VENDOR = 0x1234
EDU_DEVICE = 0x11E8
EDU_ID_VALUE = 0x010000ED

REG_ID = 0x00
REG_LIVENESS = 0x04
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

DMA_CMD_START = 1 << 0
DMA_CMD_TO_RAM = 1 << 1  # direction: 0 = memory → buffer, 1 = buffer → memory
DMA_CMD_IRQ = 1 << 2

BUFFER_ADDR = 0x40000
BUFFER_SIZE = 4096
MAX_TRANSFER = BUFFER_SIZE - 1  # QEMU 7.2 aborts on a transfer of exactly 4096
DMA_LIMIT = 1 << 28  # the device's default DMA mask: 28 bits


class EduError(Exception):
    pass


class DmaTimeout(EduError):
    pass


class Edu:
    """An edu device reached through a VFIO device (``cuse_ioasid.vfio.Device``)."""

    def __init__(self, device, check_id: bool = True):
        self.device = device
        self.bar0 = device.bar(0)
        self.config = device.config()
        if check_id:
            ident = self.id()
            if ident != EDU_ID_VALUE:
                raise EduError(f"not an edu device: id register reads {ident:#x}")

    def id(self) -> int:
        return self.bar0.read32(REG_ID)

    def alive(self) -> bool:
        """The liveness register returns the complement of what was written."""
        self.bar0.write32(REG_LIVENESS, 0x12345678)
        return self.bar0.read32(REG_LIVENESS) == (~0x12345678 & 0xFFFFFFFF)

    def enable_bus_master(self) -> None:
        self.config.enable(memory=True, bus_master=True)

    def busy(self) -> bool:
        return bool(self.bar0.read32(REG_DMA_CMD) & DMA_CMD_START)

    def dma(self, src: int, dst: int, length: int, to_ram: bool, timeout: float = 10.0) -> None:
        """One transfer; waits (bounded) until the device reports it done."""
        if not 0 < length <= MAX_TRANSFER:
            raise ValueError(f"edu transfers are 1..{MAX_TRANSFER} bytes, not {length}")
        iova, dev = (dst, src) if to_ram else (src, dst)
        if not (0 <= iova and iova + length <= DMA_LIMIT):
            raise ValueError(f"IOVA {iova:#x} beyond the edu DMA mask ({DMA_LIMIT:#x})")
        if not (BUFFER_ADDR <= dev and dev + length <= BUFFER_ADDR + BUFFER_SIZE):
            raise ValueError(f"device address {dev:#x}+{length} outside the edu buffer")
        self.wait_idle(timeout)
        # The registers are 64 bits wide; a 32-bit write stores the value
        # zero-extended, which covers every address below the DMA limit.
        self.bar0.write32(REG_DMA_SRC, src)
        self.bar0.write32(REG_DMA_DST, dst)
        self.bar0.write32(REG_DMA_COUNT, length)
        self.bar0.write32(REG_DMA_CMD, DMA_CMD_START | (DMA_CMD_TO_RAM if to_ram else 0))
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.busy():
            if time.monotonic() > deadline:
                raise DmaTimeout(f"edu DMA still running after {timeout}s")
            time.sleep(0.01)

    def to_device(self, iova: int, length: int, buf_off: int = 0) -> None:
        """Memory at ``iova`` → the device buffer."""
        self.dma(iova, BUFFER_ADDR + buf_off, length, to_ram=False)

    def to_memory(self, iova: int, length: int, buf_off: int = 0) -> None:
        """The device buffer → memory at ``iova``."""
        self.dma(BUFFER_ADDR + buf_off, iova, length, to_ram=True)

    def round_trip(self, src_iova: int, dst_iova: int, length: int) -> None:
        """Copy ``length`` bytes from IOVA ``src_iova`` to IOVA ``dst_iova``
        through the device buffer. The caller compares the memory."""
        self.to_device(src_iova, length)
        self.to_memory(dst_iova, length)
