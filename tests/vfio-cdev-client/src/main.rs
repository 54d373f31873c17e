//! A second real client of the iommufd uAPI: rust-vmm's `vfio-ioctls`
//! (feature `vfio_cdev`) and `iommufd-ioctls`, used as a VMM would use them,
//! drive one DMA round trip of QEMU's `edu` device (PCI 1234:11e8).
//!
//! usage: vfio-cdev-client [--map-file] BDF [NODE]
//!
//! Opens `/dev/iommu` (`IommuFd::new`), allocates an IOAS
//! (`VfioIommufd::new`), opens the device's cdev (found through
//! `/sys/bus/pci/devices/BDF/vfio-dev/vfioN` by `VfioDevice::new`, or the
//! given NODE with `VfioDevice::new_from_fd`), binds and attaches it, maps
//! two pages of a memfd (by address with IOMMU_IOAS_MAP, or by fd with
//! IOMMU_IOAS_MAP_FILE given `--map-file`), and has the edu copy page A to
//! page B through its buffer. BAR0 and config space are reached with the
//! crate's `region_read`/`region_write` (pread/pwrite): no mmap.
//!
//! Prints one `ok:` line per check and `vfio-cdev-client: PASS` at the end;
//! exits 1 with the reason otherwise.

use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommufd_ioctls::IommuFd;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vfio_ioctls::{VfioDevice, VfioIommufd};

const PAGE: usize = 4096;
const IOVA_A: u64 = 0x10_0000;
const IOVA_B: u64 = 0x20_0000;
const LENGTH: usize = 3000; // below the edu buffer's 4096 bytes

const CONFIG_REGION: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
const BAR0_REGION: u32 = 0;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

const EDU_ID: u64 = 0x00;
const EDU_ID_VALUE: u32 = 0x0100_00ed;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
const EDU_DMA_START: u32 = 1;
const EDU_DMA_TO_RAM: u32 = 2;
const EDU_BUFFER: u64 = 0x40000;

type Error = Box<dyn std::error::Error>;

/// Two pages of a memfd, mapped shared into this process.
struct Memory {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

impl Memory {
    fn new(len: usize) -> Result<Self, Error> {
        let fd = memfd_create("vfio-cdev-client", MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, len as i64)?;
        let size = NonZeroUsize::new(len).ok_or("empty memory")?;
        // SAFETY: a fresh shared mapping of our own memfd at an address the
        // kernel picks; nothing else refers to it.
        let base = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(Memory {
            fd,
            base: base.cast(),
            len,
        })
    }

    /// Bytes `[off, off + len)`, read with volatile loads: the device writes
    /// this memory behind the compiler's back.
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        (0..len)
            // SAFETY: in bounds of our mapping (asserted above).
            .map(|i| unsafe { self.base.as_ptr().add(off + i).read_volatile() })
            .collect()
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds of our mapping (asserted above).
            unsafe { self.base.as_ptr().add(off + i).write_volatile(*b) };
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        if let Err(e) = unsafe { munmap(self.base.cast(), self.len) } {
            eprintln!("munmap: {e}");
        }
    }
}

fn read32(dev: &VfioDevice, region: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(region, &mut b, off);
    u32::from_le_bytes(b)
}

fn write32(dev: &VfioDevice, region: u32, off: u64, value: u32) {
    dev.region_write(region, &value.to_le_bytes(), off);
}

/// One edu transfer; waits (bounded) until the device says it is done.
fn dma(dev: &VfioDevice, src: u64, dst: u64, to_ram: bool) -> Result<(), Error> {
    write32(dev, BAR0_REGION, EDU_DMA_SRC, src as u32);
    write32(dev, BAR0_REGION, EDU_DMA_DST, dst as u32);
    write32(dev, BAR0_REGION, EDU_DMA_COUNT, LENGTH as u32);
    let cmd = EDU_DMA_START | if to_ram { EDU_DMA_TO_RAM } else { 0 };
    write32(dev, BAR0_REGION, EDU_DMA_CMD, cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while read32(dev, BAR0_REGION, EDU_DMA_CMD) & EDU_DMA_START != 0 {
        if Instant::now() > deadline {
            return Err("edu DMA still running after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn run(bdf: &str, node: Option<&str>, map_file: bool) -> Result<(), Error> {
    let iommufd = Arc::new(IommuFd::new()?);
    let vfio = Arc::new(VfioIommufd::new(iommufd, None, None)?);
    println!("ok: /dev/iommu opened, IOAS {} allocated", vfio.ioas().id());

    let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
    let dev = match node {
        None => VfioDevice::new(&sysfs, vfio.clone(), true)?,
        Some(path) => {
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            VfioDevice::new_from_fd(file, vfio.clone(), true)?
        }
    };
    println!(
        "ok: device bound (devid {:?}) and attached to the IOAS",
        dev.iommufd_dev_id()
    );

    let mut ids = [0u8; 4];
    dev.region_read(CONFIG_REGION, &mut ids, 0);
    if ids != [0x34, 0x12, 0xe8, 0x11] {
        return Err(format!("{bdf} is not an edu device (config space starts {ids:02x?})").into());
    }
    let id = read32(&dev, BAR0_REGION, EDU_ID);
    if id != EDU_ID_VALUE {
        return Err(format!("edu ID register reads {id:#x} through region_read").into());
    }
    println!("ok: config space and BAR0 read with pread");
    let mut cmd = [0u8; 2];
    dev.region_read(CONFIG_REGION, &mut cmd, PCI_COMMAND);
    let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    dev.region_write(CONFIG_REGION, &cmd.to_le_bytes(), PCI_COMMAND);

    let mem = Memory::new(2 * PAGE)?;
    let pattern: Vec<u8> = (0..LENGTH).map(|i| (i * 7 + 3) as u8).collect();
    mem.write(0, &pattern);
    if map_file {
        let fd = mem.fd.as_fd().as_raw_fd();
        vfio.ioas().map_file(fd, 0, PAGE as u64, IOVA_A, true)?;
        vfio.ioas()
            .map_file(fd, PAGE as u64, PAGE as u64, IOVA_B, true)?;
        println!("ok: memfd pages mapped by fd (IOMMU_IOAS_MAP_FILE)");
    } else {
        // SAFETY: the two pages stay mapped until after the unmaps below,
        // and this program touches them only with volatile accesses.
        unsafe {
            vfio.vfio_dma_map(IOVA_A, PAGE, mem.base.as_ptr())?;
            vfio.vfio_dma_map(IOVA_B, PAGE, mem.base.as_ptr().add(PAGE))?;
        }
        println!("ok: memfd pages mapped by address (IOMMU_IOAS_MAP)");
    }

    dma(&dev, IOVA_A, EDU_BUFFER, false)?;
    dma(&dev, EDU_BUFFER, IOVA_B, true)?;
    if mem.read(PAGE, LENGTH) != pattern {
        return Err("page B did not receive page A through the edu".into());
    }
    println!("ok: edu copied page A to page B through the IOAS");

    vfio.vfio_dma_unmap(IOVA_A, PAGE)?;
    vfio.vfio_dma_unmap(IOVA_B, PAGE)?;
    println!("ok: both pages unmapped, the full length reported");
    drop(dev); // DETACH_IOMMUFD_PT, close
    drop(vfio); // IOMMU_DESTROY of the IOAS, close /dev/iommu
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let map_file = args.iter().any(|a| a == "--map-file");
    let rest: Vec<&str> = args
        .iter()
        .filter(|a| *a != "--map-file")
        .map(String::as_str)
        .collect();
    let (bdf, node) = match rest.as_slice() {
        [bdf] => (*bdf, None),
        [bdf, node] => (*bdf, Some(*node)),
        _ => {
            eprintln!("usage: vfio-cdev-client [--map-file] BDF [NODE]");
            std::process::exit(2);
        }
    };
    match run(bdf, node, map_file) {
        Ok(()) => println!("vfio-cdev-client: PASS"),
        Err(e) => {
            eprintln!("vfio-cdev-client: FAIL: {e}");
            std::process::exit(1);
        }
    }
}
