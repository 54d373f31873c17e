//! Which file an alias maps, and with what access, when the client's
//! memory map says one thing and `map_files` opens another: a procfs made of
//! plain files, where `<pid>/maps` is a text and `<pid>/map_files/<range>`
//! a symbolic link to any file the test likes. That is what a racing client
//! can make the real procfs show for a moment: its maps read before a swap,
//! its `map_files` entry opened after it.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ioasid_engine::backend::Prot;
use nix::errno::Errno;
use vfio_legacy::ClientMemory;

const PID: i32 = 4242;
const START: u64 = 0x7f00_0000_0000;
const PAGE: u64 = 4096;

struct FakeProc {
    dir: PathBuf,
}

impl FakeProc {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("alias-identity-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join(format!("proc/{PID}/map_files"))).unwrap();
        FakeProc { dir }
    }

    fn file(&self, name: &str, byte: u8) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, vec![byte; PAGE as usize]).unwrap();
        path
    }

    /// The client maps one page at START, as the maps line says (`perms`,
    /// device, inode); `map_files` opens `opens`.
    fn client_maps(&self, perms: &str, dev: (u32, u32), ino: u64, opens: &Path) {
        let end = START + PAGE;
        let line = format!(
            "{START:x}-{end:x} {perms} 00000000 {:02x}:{:02x} {ino}    /client/buffer\n",
            dev.0, dev.1
        );
        fs::write(self.dir.join(format!("proc/{PID}/maps")), line).unwrap();
        let link = self
            .dir
            .join(format!("proc/{PID}/map_files/{START:x}-{end:x}"));
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(opens, link).unwrap();
    }

    fn memory(&self) -> ClientMemory {
        ClientMemory::with_proc_root(self.dir.join("proc"))
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn dev_of(path: &Path) -> (u32, u32, u64) {
    let m = fs::metadata(path).unwrap();
    (libc::major(m.dev()), libc::minor(m.dev()), m.ino())
}

/// This process's own maps line for the daemon address `addr`.
fn own_maps_line(addr: u64) -> String {
    fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .find(|l| {
            let (s, e) = l.split_once(' ').unwrap().0.split_once('-').unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            s <= addr && addr < e
        })
        .unwrap_or_else(|| panic!("{addr:#x} is not mapped"))
        .to_string()
}

fn read_byte(addr: u64) -> u8 {
    let mut b = [0u8];
    let mem = File::open("/proc/self/mem").unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut b, addr).unwrap();
    b[0]
}

#[test]
fn a_file_with_the_listed_inode_on_another_device_is_never_mapped() {
    let p = FakeProc::new("other-device");
    let victim = p.file("victim", b'V');
    let (major, minor, ino) = dev_of(&victim);
    // The maps listed a writable file with the victim's inode number on
    // another device; map_files then opens the victim.
    p.client_maps("rw-s", (major, minor ^ 1), ino, &victim);
    let memory = p.memory();
    let e = memory.alias(PID, START, PAGE).unwrap_err();
    assert_eq!(e.errno, Errno::EAGAIN, "{}", e.message);
    assert_eq!(memory.alias_count(), 0);
    assert_eq!(
        memory.mapping_count(),
        0,
        "the victim stayed mapped in the daemon"
    );
}

#[test]
fn a_read_only_client_mapping_gives_a_read_only_alias() {
    let p = FakeProc::new("read-only");
    // A file this test could open for writing: only the client's mapping
    // decides the access.
    let file = p.file("shared", b'R');
    let (major, minor, ino) = dev_of(&file);
    p.client_maps("r--s", (major, minor), ino, &file);
    let memory = p.memory();
    let alias = memory.alias(PID, START, PAGE).unwrap();
    let addr = alias.segments[0].daemon_vaddr;
    assert_eq!(read_byte(addr), b'R');
    let perms = own_maps_line(addr).split(' ').nth(1).unwrap().to_string();
    assert_eq!(perms, "r--s", "the daemon's alias must be read-only");
    let read = Prot {
        read: true,
        write: false,
    };
    let write = Prot {
        read: true,
        write: true,
    };
    memory.check_access(addr, PAGE, read).unwrap();
    assert_eq!(
        memory.check_access(addr, PAGE, write).unwrap_err().errno,
        Errno::EFAULT
    );
    memory.release(&alias);
}

#[test]
fn the_listed_file_writable_is_aliased_writable() {
    // The control: with maps and map_files agreeing, the fake procfs gives
    // a working alias, so the refusals above are the checks at work.
    let p = FakeProc::new("control");
    let file = p.file("own", b'O');
    let (major, minor, ino) = dev_of(&file);
    p.client_maps("rw-s", (major, minor), ino, &file);
    let memory = p.memory();
    let alias = memory.alias(PID, START, PAGE).unwrap();
    let addr = alias.segments[0].daemon_vaddr;
    assert_eq!(read_byte(addr), b'O');
    assert!(own_maps_line(addr).contains(" rw-s "));
    let write = Prot {
        read: true,
        write: true,
    };
    memory.check_access(addr, PAGE, write).unwrap();
    assert_eq!(
        memory
            .check_access(addr + PAGE, PAGE, write)
            .unwrap_err()
            .errno,
        Errno::EFAULT,
        "past the alias"
    );
    memory.release(&alias);
}

/// A fresh alias opens the client's maps once: the check after mapping
/// asks the descriptor the areas were read from, and `map_files` is opened
/// once too.
#[test]
fn a_fresh_alias_opens_the_clients_maps_once() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let p = FakeProc::new("one-open");
    let file = p.file("own", b'O');
    let (major, minor, ino) = dev_of(&file);
    p.client_maps("rw-s", (major, minor), ino, &file);
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    let maps = p.dir.join(format!("proc/{PID}/maps"));
    let maps_wd = watch
        .add_watch(&maps, AddWatchFlags::IN_OPEN | AddWatchFlags::IN_ACCESS)
        .unwrap();
    let file_wd = watch.add_watch(&file, AddWatchFlags::IN_OPEN).unwrap();
    let memory = p.memory();
    let alias = memory.alias(PID, START, PAGE).unwrap();
    assert_eq!(read_byte(alias.segments[0].daemon_vaddr), b'O');
    let events = watch.read_events().unwrap();
    let count = |wd, mask| {
        events
            .iter()
            .filter(|e| e.wd == wd && e.mask.contains(mask))
            .count()
    };
    assert_eq!(count(maps_wd, AddWatchFlags::IN_OPEN), 1, "{events:?}");
    assert!(count(maps_wd, AddWatchFlags::IN_ACCESS) >= 1, "{events:?}");
    assert_eq!(count(file_wd, AddWatchFlags::IN_OPEN), 1, "{events:?}");
    memory.release(&alias);
}
