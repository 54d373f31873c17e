//! QEMU's `edu` DMA test device driven through a VFIO device fd: BAR0
//! registers by `pread`/`pwrite` on the region, bus mastering on, one DMA
//! transfer at a time with a bounded wait. Shared by the examples.

#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vfio_legacy::{PciDevice, VfioDevice, VfioLegacy};

pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;
pub const EDU_ID: u32 = 0x0100_00ed;
pub const EDU_BUFFER: u32 = 0x40000;
pub const REG_ID: u64 = 0x00;
pub const REG_SRC: u64 = 0x80;
pub const REG_DST: u64 = 0x88;
pub const REG_COUNT: u64 = 0x90;
pub const REG_CMD: u64 = 0x98;
pub const CMD_START: u32 = 1;
pub const CMD_TO_RAM: u32 = 2;
pub const PCI_COMMAND: u64 = 4;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
pub const CONFIG_REGION: u32 = 7;

/// Bytes per transfer: below the edu's 4096-byte buffer (QEMU 7.2 aborts on
/// exactly 4096).
pub const COUNT: u32 = 4000;

/// An `edu` device opened through the backend.
pub struct Edu {
    bdf: String,
    dev: VfioDevice,
    bar0: u64,
}

impl Edu {
    pub fn open(v: &VfioLegacy, d: &PciDevice) -> Result<Self> {
        let dev = v.open_device(d.group, &d.bdf)?;
        let info = dev.info_base()?;
        ensure!(
            info.num_regions > CONFIG_REGION,
            "{}: only {} regions",
            d.bdf,
            info.num_regions
        );
        let bar0 = dev.region(0)?;
        ensure!(
            bar0.size >= 0x10_0000,
            "{}: BAR0 is {:#x} bytes",
            d.bdf,
            bar0.size
        );
        let cfg = dev.region(CONFIG_REGION)?;

        let mut cmd = [0u8; 2];
        dev.file()
            .read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)?;
        let want = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        dev.file()
            .write_all_at(&want.to_le_bytes(), cfg.offset + PCI_COMMAND)?;
        dev.file()
            .read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)?;
        ensure!(
            u16::from_le_bytes(cmd) & PCI_COMMAND_MASTER != 0,
            "{}: bus mastering did not stick",
            d.bdf
        );
        let edu = Edu {
            bdf: d.bdf.clone(),
            dev,
            bar0: bar0.offset,
        };
        let id = edu.read(REG_ID)?;
        ensure!(
            id == EDU_ID,
            "{}: id register {id:#x}, expected {EDU_ID:#x}",
            d.bdf
        );
        Ok(edu)
    }

    pub fn read(&self, reg: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.dev
            .file()
            .read_exact_at(&mut b, self.bar0 + reg)
            .with_context(|| format!("{}: read BAR0+{reg:#x}", self.bdf))?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write(&self, reg: u64, val: u32) -> Result<()> {
        self.dev
            .file()
            .write_all_at(&val.to_le_bytes(), self.bar0 + reg)
            .with_context(|| format!("{}: write BAR0+{reg:#x}", self.bdf))
    }

    /// One DMA transfer; waits (bounded) for the engine to finish.
    pub fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<()> {
        self.dma_n(src, dst, to_ram, COUNT)
    }

    /// One DMA transfer of `count` bytes (below 4096).
    pub fn dma_n(&self, src: u64, dst: u64, to_ram: bool, count: u32) -> Result<()> {
        ensure!(count > 0 && count < 4096, "edu transfer of {count} bytes");
        self.write(REG_SRC, u32::try_from(src)?)?;
        self.write(REG_DST, u32::try_from(dst)?)?;
        self.write(REG_COUNT, count)?;
        let dir = if to_ram { CMD_TO_RAM } else { 0 };
        self.write(REG_CMD, CMD_START | dir)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.read(REG_CMD)? & CMD_START != 0 {
            if Instant::now() > deadline {
                bail!("{}: DMA {src:#x} -> {dst:#x} did not finish", self.bdf);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// RAM at `src` -> the device's buffer -> RAM at `dst`, `count` bytes.
    pub fn copy(&self, src: u64, dst: u64, count: u32) -> Result<()> {
        self.dma_n(src, EDU_BUFFER.into(), false, count)?;
        self.dma_n(EDU_BUFFER.into(), dst, true, count)
    }

    /// RAM at `iova` -> the device's buffer.
    pub fn load(&self, iova: u64) -> Result<()> {
        self.dma(iova, EDU_BUFFER.into(), false)
    }

    /// The device's buffer -> RAM at `iova`.
    pub fn store(&self, iova: u64) -> Result<()> {
        self.dma(EDU_BUFFER.into(), iova, true)
    }
}
