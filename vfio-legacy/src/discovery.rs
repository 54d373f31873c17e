//! Finding the PCI devices bound to `vfio-pci` and their IOMMU groups in
//! sysfs.

use std::path::{Path, PathBuf};

use ioasid_engine::backend::GroupId;
use nix::errno::Errno;

use crate::error::{Error, Result};

/// A PCI device bound to `vfio-pci`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// PCI address, `DDDD:BB:DD.F` (lowercase hex), which is also the name
    /// `VFIO_GROUP_GET_DEVICE_FD` takes.
    pub bdf: String,
    /// Its IOMMU group.
    pub group: GroupId,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// The kernel's name for the device's VFIO cdev, `vfioN` (the entry of
    /// `/sys/bus/pci/devices/BDF/vfio-dev/`, present even on kernels
    /// without the cdev); `None` when sysfs has none.
    pub vfio_dev: Option<String>,
    /// The device has the PCI ATS extended capability.
    pub ats: bool,
    /// The device is an SR-IOV physical or virtual function.
    pub sriov: bool,
}

/// PCI extended capability id of Address Translation Services.
const PCI_EXT_CAP_ID_ATS: u16 = 0x0f;

/// Whether PCI config space `config` (as sysfs gives it) lists extended
/// capability `id`.
fn has_ext_capability(config: &[u8], id: u16) -> bool {
    let mut at = 0x100usize;
    for _ in 0..(4096 / 4) {
        let Some(h) = config.get(at..at + 4) else {
            return false;
        };
        let h = u32::from_le_bytes(h.try_into().expect("4 bytes"));
        if h == 0 || h == u32::MAX {
            return false;
        }
        if (h & 0xffff) as u16 == id {
            return true;
        }
        at = (h >> 20) as usize & !3;
        if at < 0x100 {
            return false;
        }
    }
    false
}

/// Where sysfs is: `/sys` normally, a fake tree in tests.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/sys")
    }
}

fn is_bdf(name: &str) -> bool {
    // DDDD:BB:DD.F
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

fn read_id(path: &Path) -> Result<u16> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(&e, format!("cannot read {}", path.display())))?;
    let t = text.trim();
    u16::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16)
        .map_err(|_| Error::new(Errno::EIO, format!("bad id {t:?} in {}", path.display())))
}

fn link_name(path: &Path) -> Result<String> {
    let target = std::fs::read_link(path)
        .map_err(|e| Error::io(&e, format!("cannot read link {}", path.display())))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::new(Errno::EIO, format!("odd link {}", path.display())))
}

impl Sysfs {
    /// sysfs mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn device_dir(&self, bdf: &str) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf)
    }

    /// Every device bound to `vfio-pci`, sorted by PCI address. No driver
    /// directory (vfio-pci not loaded) gives an empty list.
    pub fn discover(&self) -> Result<Vec<PciDevice>> {
        let dir = self.root.join("bus/pci/drivers/vfio-pci");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&e, format!("cannot list {}", dir.display()))),
        };
        let mut bdfs = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io(&e, format!("cannot list {}", dir.display())))?;
            if let Some(name) = entry.file_name().to_str() {
                if is_bdf(name) {
                    bdfs.push(name.to_owned());
                }
            }
        }
        self.devices(&bdfs)
    }

    /// The given devices, which must exist and be bound to `vfio-pci`;
    /// sorted by PCI address, duplicates removed.
    pub fn devices(&self, bdfs: &[impl AsRef<str>]) -> Result<Vec<PciDevice>> {
        let mut out = Vec::with_capacity(bdfs.len());
        for bdf in bdfs {
            out.push(self.device(bdf.as_ref())?);
        }
        out.sort_by(|a, b| a.bdf.cmp(&b.bdf));
        out.dedup_by(|a, b| a.bdf == b.bdf);
        Ok(out)
    }

    /// One device, which must be bound to `vfio-pci`.
    pub fn device(&self, bdf: &str) -> Result<PciDevice> {
        let bdf = bdf.to_ascii_lowercase();
        if !is_bdf(&bdf) {
            return Err(Error::new(
                Errno::EINVAL,
                format!("{bdf:?} is not a PCI address of the form 0000:00:03.0"),
            ));
        }
        let dir = self.device_dir(&bdf);
        if !dir.exists() {
            return Err(Error::new(
                Errno::ENODEV,
                format!("no PCI device {bdf} ({} missing)", dir.display()),
            ));
        }
        let driver = link_name(&dir.join("driver")).ok();
        if driver.as_deref() != Some("vfio-pci") {
            return Err(Error::new(
                Errno::ENODEV,
                format!(
                    "PCI device {bdf} is bound to {}, not vfio-pci; bind it with \
                     `echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
                     echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; \
                     echo {bdf} > /sys/bus/pci/drivers_probe`",
                    driver.as_deref().unwrap_or("no driver")
                ),
            ));
        }
        let group = link_name(&dir.join("iommu_group"))
            .map_err(|e| {
                Error::new(
                    Errno::ENODEV,
                    format!("PCI device {bdf} has no IOMMU group (is the IOMMU on?): {e}"),
                )
            })?
            .parse::<GroupId>()
            .map_err(|_| Error::new(Errno::EIO, format!("bad iommu_group link of {bdf}")))?;
        let vfio_dev = std::fs::read_dir(dir.join("vfio-dev"))
            .ok()
            .and_then(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .find(|n| n.starts_with("vfio"))
            });
        let ats = std::fs::read(dir.join("config"))
            .map(|c| has_ext_capability(&c, PCI_EXT_CAP_ID_ATS))
            .unwrap_or(false);
        let sriov = dir.join("sriov_totalvfs").exists() || dir.join("physfn").exists();
        Ok(PciDevice {
            vendor: read_id(&dir.join("vendor"))?,
            device: read_id(&dir.join("device"))?,
            bdf,
            group,
            vfio_dev,
            ats,
            sriov,
        })
    }

    /// Every device of IOMMU group `group` with its driver (`None` if
    /// unbound), sorted by address.
    pub fn group_members(&self, group: GroupId) -> Result<Vec<(String, Option<String>)>> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&e, format!("cannot list {}", dir.display())))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let driver = link_name(&entry.path().join("driver")).ok();
            out.push((name, driver));
        }
        out.sort();
        Ok(out)
    }
}

/// Every device bound to `vfio-pci` in `/sys`, sorted by PCI address.
pub fn discover() -> Result<Vec<PciDevice>> {
    Sysfs::default().discover()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: devices under `devices/pci0000:00/`, linked from
    /// `bus/pci/devices`, drivers and groups as the kernel lays them out.
    struct FakeSys {
        root: PathBuf,
    }

    impl FakeSys {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("vfio-legacy-sysfs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for d in [
                "devices/pci0000:00",
                "bus/pci/devices",
                "bus/pci/drivers/vfio-pci",
                "bus/pci/drivers/e1000e",
                "kernel/iommu_groups",
            ] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            FakeSys { root }
        }

        fn add(&self, bdf: &str, vendor: &str, device: &str, group: u32, driver: Option<&str>) {
            let dev = self.root.join("devices/pci0000:00").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(dev.join("device"), format!("{device}\n")).unwrap();
            let g = self
                .root
                .join("kernel/iommu_groups")
                .join(group.to_string());
            std::fs::create_dir_all(g.join("devices")).unwrap();
            symlink(&g, dev.join("iommu_group")).unwrap();
            symlink(&dev, g.join("devices").join(bdf)).unwrap();
            symlink(&dev, self.root.join("bus/pci/devices").join(bdf)).unwrap();
            if let Some(drv) = driver {
                let d = self.root.join("bus/pci/drivers").join(drv);
                symlink(&d, dev.join("driver")).unwrap();
                symlink(&dev, d.join(bdf)).unwrap();
            }
        }

        fn sysfs(&self) -> Sysfs {
            Sysfs::new(&self.root)
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn fake() -> FakeSys {
        let f = FakeSys::new(&format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        f.add("0000:00:05.0", "0x1234", "0x11e8", 7, Some("vfio-pci"));
        f.add("0000:00:03.0", "0x1234", "0x11e8", 5, Some("vfio-pci"));
        f.add("0000:01:01.0", "0x1234", "0x11e8", 9, Some("vfio-pci"));
        f.add("0000:01:02.0", "0x1234", "0x11e8", 9, None);
        f.add("0000:00:02.0", "0x8086", "0x10d3", 4, Some("e1000e"));
        // The driver directory also holds non-device entries.
        std::fs::write(f.root.join("bus/pci/drivers/vfio-pci/new_id"), "").unwrap();
        f
    }

    #[test]
    fn ats_is_found_in_the_extended_capability_chain() {
        let mut config = vec![0u8; 4096];
        assert!(!has_ext_capability(&config, PCI_EXT_CAP_ID_ATS), "no chain");
        // AER (1) at 0x100, next 0x140; ATS (0xf) at 0x140, last.
        config[0x100..0x104].copy_from_slice(&(1u32 | (0x140 << 20)).to_le_bytes());
        config[0x140..0x144].copy_from_slice(&0x0001_000fu32.to_le_bytes());
        assert!(has_ext_capability(&config, PCI_EXT_CAP_ID_ATS));
        assert!(
            !has_ext_capability(&config[..256], PCI_EXT_CAP_ID_ATS),
            "256 bytes only"
        );
        // A loop (next pointing at itself) ends.
        config[0x140..0x144].copy_from_slice(&(2u32 | (0x140 << 20)).to_le_bytes());
        assert!(!has_ext_capability(&config, PCI_EXT_CAP_ID_ATS));
    }

    #[test]
    fn the_vfio_dev_name_is_read_from_sysfs() {
        let f = fake();
        let dev = f
            .root
            .join("devices/pci0000:00/0000:00:03.0/vfio-dev/vfio4");
        std::fs::create_dir_all(&dev).unwrap();
        let d = f.sysfs().device("0000:00:03.0").unwrap();
        assert_eq!(d.vfio_dev.as_deref(), Some("vfio4"));
        assert!(!d.ats && !d.sriov);
        assert_eq!(f.sysfs().device("0000:00:05.0").unwrap().vfio_dev, None);
    }

    #[test]
    fn discovers_vfio_pci_devices_sorted_with_groups_and_ids() {
        let f = fake();
        let devs = f.sysfs().discover().unwrap();
        let got: Vec<_> = devs.iter().map(|d| (d.bdf.as_str(), d.group)).collect();
        assert_eq!(
            got,
            vec![
                ("0000:00:03.0", 5),
                ("0000:00:05.0", 7),
                ("0000:01:01.0", 9)
            ]
        );
        assert!(devs
            .iter()
            .all(|d| d.vendor == 0x1234 && d.device == 0x11e8));
    }

    #[test]
    fn explicit_list_is_checked_sorted_and_deduplicated() {
        let f = fake();
        let s = f.sysfs();
        let devs = s
            .devices(&["0000:01:01.0", "0000:00:03.0", "0000:00:03.0"])
            .unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].bdf, "0000:00:03.0");
        assert_eq!(devs[1].group, 9);

        let e = s.device("0000:00:02.0").unwrap_err();
        assert_eq!(e.errno, Errno::ENODEV);
        assert!(e.message.contains("bound to e1000e"), "{}", e.message);
        assert!(e.message.contains("driver_override"), "{}", e.message);
        let e = s.device("0000:01:02.0").unwrap_err();
        assert!(e.message.contains("no driver"), "{}", e.message);
        assert_eq!(s.device("0000:09:00.0").unwrap_err().errno, Errno::ENODEV);
        assert_eq!(s.device("00:03.0").unwrap_err().errno, Errno::EINVAL);
    }

    #[test]
    fn group_members_list_drivers() {
        let f = fake();
        assert_eq!(
            f.sysfs().group_members(9).unwrap(),
            vec![
                ("0000:01:01.0".to_owned(), Some("vfio-pci".to_owned())),
                ("0000:01:02.0".to_owned(), None)
            ]
        );
    }

    #[test]
    fn no_vfio_pci_driver_means_no_devices() {
        let f = FakeSys::new("empty");
        std::fs::remove_dir(f.root.join("bus/pci/drivers/vfio-pci")).unwrap();
        assert_eq!(f.sysfs().discover().unwrap(), vec![]);
    }
}
