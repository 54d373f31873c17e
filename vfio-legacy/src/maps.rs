//! Reading a process's memory map (`/proc/<pid>/maps`) and naming its
//! entries in `/proc/<pid>/map_files`.
//!
//! The areas covering a range are asked for one by one with the
//! `PROCMAP_QUERY` ioctl where the kernel has it (Linux 6.11+): a few
//! microseconds each, however many areas the process has. Older kernels
//! only offer the text, which costs the kernel a line per area of the
//! process (about 0.1 ms for a small program under emulation).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;

use crate::error::{proc_error, Error, Result};
use crate::sys;

/// One line of `/proc/<pid>/maps`: a virtual memory area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// `MAP_SHARED` (`s`) rather than private copy-on-write (`p`).
    pub shared: bool,
    /// Offset of `start` in the backing file, in bytes.
    pub offset: u64,
    /// Major number of the backing file's device.
    pub dev_major: u32,
    /// Minor number of the backing file's device.
    pub dev_minor: u32,
    /// Inode of the backing file; 0 for anonymous memory.
    pub inode: u64,
    /// The path column, verbatim (may contain spaces, may end in
    /// ` (deleted)`, may be a pseudo name like `[heap]`); empty if none.
    pub path: String,
}

impl Vma {
    /// Whether a file backs the area (memfd, shm, hugetlbfs, a regular file,
    /// or the shmem file behind `MAP_SHARED|MAP_ANONYMOUS`).
    pub fn is_file_backed(&self) -> bool {
        self.inode != 0
    }

    /// Whether another process can map the same pages: shared and backed
    /// by a file it can open through `map_files`.
    pub fn is_shareable(&self) -> bool {
        self.shared && self.is_file_backed()
    }

    /// Whether the backing file is the one with device number `dev` (as
    /// `st_dev`) and inode `ino`.
    pub fn is_file(&self, dev: u64, ino: u64) -> bool {
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        self.is_file_backed()
            && ino == self.inode
            && (major, minor) == (self.dev_major, self.dev_minor)
    }

    /// The entry's name in `/proc/<pid>/map_files`.
    pub fn map_files_name(&self) -> String {
        map_files_name(self.start, self.end)
    }
}

/// The name the kernel gives an area in `/proc/<pid>/map_files`:
/// `<start>-<end>` in lowercase hex without `0x` (`"%lx-%lx"`).
pub fn map_files_name(start: u64, end: u64) -> String {
    format!("{start:x}-{end:x}")
}

/// Split off the next whitespace-separated field.
fn field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    let end = s.find(' ').unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// Parse one line of `/proc/<pid>/maps`; `None` if it is malformed.
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let (range, rest) = field(line)?;
    let (perms, rest) = field(rest)?;
    let (offset, rest) = field(rest)?;
    let (dev, rest) = field(rest)?;
    let (inode, rest) = field(rest)?;
    // The path starts after the padding that follows the inode; only the
    // padding is stripped, so a path's own spaces survive.
    let path = rest.trim_start_matches(' ');

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start {
        return None;
    }
    let p = perms.as_bytes();
    if p.len() != 4 {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    Some(Vma {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path: path.to_string(),
    })
}

/// Parse the whole of `/proc/<pid>/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Vma>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            parse_maps_line(l)
                .ok_or_else(|| Error::new(Errno::EIO, format!("unparsable maps line {l:?}")))
        })
        .collect()
}

/// The areas covering `[start, end)`, in order. Fails with `EFAULT` if any
/// byte of the range is not mapped. `vmas` must be sorted (as the kernel
/// lists them).
pub fn covering(vmas: &[Vma], start: u64, end: u64) -> Result<Vec<&Vma>> {
    cover(vmas.iter().map(|v| (v.start, v.end, v)), start, end)
}

/// The items (areas as `(start, end, item)`, ascending) covering
/// `[start, end)`; the iterator is not consumed past the last one needed.
fn cover<T>(items: impl Iterator<Item = (u64, u64, T)>, start: u64, end: u64) -> Result<Vec<T>> {
    let mut c = Cover::new(start, end);
    for (s, e, item) in items {
        if !c.offer(s, e, || Ok(item))? {
            break;
        }
    }
    c.finish()
}

/// The areas covering `[start, end)`, gathered from areas offered one by
/// one in ascending order; says when no later area can matter.
struct Cover<T> {
    start: u64,
    end: u64,
    /// Covered up to here.
    at: u64,
    out: Vec<T>,
}

impl<T> Cover<T> {
    fn new(start: u64, end: u64) -> Self {
        Cover {
            start,
            end,
            at: start,
            out: Vec::new(),
        }
    }

    /// Offer the area `[s, e)`; `make` gives its item if it covers part of
    /// the range. `false` once the range is covered or a gap was met: no
    /// later area matters.
    fn offer(&mut self, s: u64, e: u64, make: impl FnOnce() -> Result<T>) -> Result<bool> {
        if self.at >= self.end || s > self.at {
            return Ok(false);
        }
        if e > self.at {
            self.out.push(make()?);
            self.at = e;
        }
        Ok(self.at < self.end)
    }

    /// The covering items; `EFAULT` if a byte of the range is not mapped.
    fn finish(self) -> Result<Vec<T>> {
        if self.at < self.end {
            return Err(Error::new(
                Errno::EFAULT,
                format!(
                    "address {:#x} (in {:#x}..{:#x}) is not mapped",
                    self.at, self.start, self.end
                ),
            ));
        }
        Ok(self.out)
    }
}

/// The address range at the start of a maps line (`"start-end ..."`).
fn line_range(line: &[u8]) -> Option<(u64, u64)> {
    let hex = |b: &[u8]| u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    let dash = line.iter().position(|&b| b == b'-')?;
    let space = line.iter().position(|&b| b == b' ')?;
    Some((hex(&line[..dash])?, hex(line.get(dash + 1..space)?)?))
}

/// Set once a `PROCMAP_QUERY` answered `ENOTTY`: the kernel predates it.
static NO_PROCMAP_QUERY: AtomicBool = AtomicBool::new(false);

/// The areas covering `[start, end)`, in order, of the process whose
/// `/proc/<pid>/maps` is `maps` (opened, not yet read). `EFAULT` if a byte
/// of the range is not mapped.
pub fn areas_covering(maps: &File, start: u64, end: u64) -> Result<Vec<Vma>> {
    if !NO_PROCMAP_QUERY.load(Ordering::Relaxed) {
        match query_covering(maps, start, end) {
            Err(e) if e.errno == Errno::ENOTTY => NO_PROCMAP_QUERY.store(true, Ordering::Relaxed),
            other => return other,
        }
    }
    text_covering(maps, start, end)
}

/// The first read of the maps text asks for this much; each further one
/// for twice as much, up to [`TEXT_CHUNK_MAX`].
const TEXT_CHUNK: usize = 4096;
const TEXT_CHUNK_MAX: usize = 64 * 1024;

/// [`areas_covering`] from the text, read from its start (wherever an
/// earlier read left the descriptor, so one open file answers several
/// times) in chunks, and only as far as the range needs: the lines are in
/// address order, so the read stops at the line that completes the range
/// or at the first one past a gap. The kernel writes a line per area for
/// what is read, and a new buffer is usually the lowest mapping of its
/// process, a few lines in. Only the covering lines are parsed whole.
fn text_covering(maps: &File, start: u64, end: u64) -> Result<Vec<Vma>> {
    use std::os::unix::fs::FileExt;
    thread_local! {
        /// Each thread's buffer: the chunk read and the unfinished line
        /// carried over from the last one; as large as the longest line
        /// needs, whatever the length of the text.
        static TEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    TEXT.with_borrow_mut(|buf| {
        buf.clear();
        let mut cover = Cover::new(start, end);
        let (mut pos, mut chunk) = (0u64, TEXT_CHUNK);
        loop {
            let kept = buf.len();
            buf.resize(kept + chunk, 0);
            let n = loop {
                match maps.read_at(&mut buf[kept..], pos) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(proc_error(&e, "cannot read the maps file")),
                }
            };
            buf.truncate(kept + n);
            pos += n as u64;
            chunk = (2 * chunk).min(TEXT_CHUNK_MAX);
            // The whole lines read so far (all of it at the end).
            let whole = if n == 0 {
                buf.len()
            } else {
                buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
            };
            for line in buf[..whole]
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
            {
                if !offer_line(&mut cover, line)? {
                    return cover.finish();
                }
            }
            if n == 0 {
                return cover.finish();
            }
            buf.drain(..whole);
        }
    })
}

/// Offer one maps line to `cover`, parsed whole only if it covers part of
/// the range; `EIO` for a line that is not one.
fn offer_line(cover: &mut Cover<Vma>, line: &[u8]) -> Result<bool> {
    let bad = || {
        Error::new(
            Errno::EIO,
            format!("unparsable maps line {:?}", String::from_utf8_lossy(line)),
        )
    };
    let (s, e) = line_range(line).ok_or_else(bad)?;
    cover.offer(s, e, || {
        parse_maps_line(&String::from_utf8_lossy(line)).ok_or_else(bad)
    })
}

/// The covering areas of a whole maps text.
#[cfg(test)]
fn covering_lines(text: &[u8], start: u64, end: u64) -> Result<Vec<Vma>> {
    let mut cover = Cover::new(start, end);
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if !offer_line(&mut cover, line)? {
            break;
        }
    }
    cover.finish()
}

/// [`areas_covering`] with `PROCMAP_QUERY`, one ioctl per area.
fn query_covering(maps: &File, start: u64, end: u64) -> Result<Vec<Vma>> {
    let mut out = Vec::new();
    // Most names fit; a longer one (ENAMETOOLONG) is asked again with room
    // for a whole path.
    let mut short = [0u8; 256];
    let mut long = Vec::new();
    let mut at = start;
    while at < end {
        let mut name: &mut [u8] = &mut short;
        let mut answer = sys::procmap_query(maps.as_fd(), at, name);
        if matches!(answer, Err(Errno::ENAMETOOLONG)) {
            long.resize(libc::PATH_MAX as usize, 0);
            name = &mut long;
            answer = sys::procmap_query(maps.as_fd(), at, name);
        }
        let q = match answer {
            Ok(q) => q,
            Err(Errno::ENOENT) => {
                return Err(Error::new(
                    Errno::EFAULT,
                    format!("address {at:#x} (in {start:#x}..{end:#x}) is not mapped"),
                ))
            }
            Err(errno) => {
                return Err(Error::new(
                    errno,
                    format!("PROCMAP_QUERY at {at:#x} failed"),
                ))
            }
        };
        // The name's length includes its NUL; 0 means no name.
        let len = (q.vma_name_size as usize).min(name.len());
        let path = String::from_utf8_lossy(&name[..len])
            .trim_end_matches('\0')
            .to_string();
        if q.vma_end <= at || q.vma_start > at {
            return Err(Error::new(
                Errno::EIO,
                format!(
                    "PROCMAP_QUERY at {at:#x} answered {:#x}..{:#x}",
                    q.vma_start, q.vma_end
                ),
            ));
        }
        out.push(Vma {
            start: q.vma_start,
            end: q.vma_end,
            read: q.vma_flags & sys::PROCMAP_QUERY_VMA_READABLE != 0,
            write: q.vma_flags & sys::PROCMAP_QUERY_VMA_WRITABLE != 0,
            exec: q.vma_flags & sys::PROCMAP_QUERY_VMA_EXECUTABLE != 0,
            shared: q.vma_flags & sys::PROCMAP_QUERY_VMA_SHARED != 0,
            offset: q.vma_offset,
            dev_major: q.dev_major,
            dev_minor: q.dev_minor,
            inode: q.inode,
            path,
        });
        at = q.vma_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines written in the kernel's format (show_map_vma: "%08lx-%08lx %c%c%c%c
    // %08llx %02x:%02x %lu " then padding to a column, then the path).
    const MAPS: &str = "\
55d0c5a00000-55d0c5a21000 rw-p 00000000 00:00 0                          [heap]
7f1000000000-7f1000200000 rw-s 00000000 00:01 4242                       /memfd:guest ram (deleted)
7f1000200000-7f1000400000 rw-s 00200000 00:01 4242                       /memfd:guest ram (deleted)
7f2000000000-7f2000400000 rw-s 00000000 00:10 77                         /dev/hugepages/my file
7f3000000000-7f3000001000 rw-s 00000000 00:01 5151                       /dev/zero (deleted)
7f4000000000-7f4000010000 rw-p 00000000 00:00 0 
7f5000000000-7f5000001000 r--s 00003000 fe:01 1234567                    /srv/data/shared  file.bin
7ffd1000000-7ffd1021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_heap_memfd_hugetlbfs_shared_anon_and_private_anon() {
        let v = parse_maps(MAPS).unwrap();
        assert_eq!(v.len(), 8);

        assert_eq!(v[0].path, "[heap]");
        assert!(!v[0].shared && !v[0].is_file_backed() && !v[0].is_shareable());

        assert_eq!(v[1].start, 0x7f10_0000_0000);
        assert_eq!(v[1].end, 0x7f10_0020_0000);
        assert!(v[1].read && v[1].write && !v[1].exec && v[1].shared);
        assert_eq!((v[1].dev_major, v[1].dev_minor, v[1].inode), (0, 1, 4242));
        assert_eq!(v[1].path, "/memfd:guest ram (deleted)");
        assert!(v[1].is_shareable());
        assert_eq!(v[2].offset, 0x20_0000);

        assert_eq!(v[3].path, "/dev/hugepages/my file");
        assert_eq!(v[3].dev_minor, 0x10);
        assert!(v[3].is_shareable());

        assert_eq!(v[4].path, "/dev/zero (deleted)");
        assert!(v[4].is_shareable(), "MAP_SHARED|MAP_ANONYMOUS is shmem");

        assert_eq!(v[5].path, "");
        assert!(!v[5].is_shareable());

        assert_eq!(v[6].path, "/srv/data/shared  file.bin");
        assert!(v[6].read && !v[6].write);
        assert_eq!((v[6].dev_major, v[6].dev_minor), (0xfe, 1));
        assert_eq!(v[6].inode, 1_234_567);
        assert_eq!(v[6].offset, 0x3000);

        assert_eq!(v[7].path, "[stack]");
    }

    #[test]
    fn rejects_malformed_lines() {
        assert_eq!(parse_maps_line(""), None);
        assert_eq!(parse_maps_line("zz-10 rw-p 0 00:00 0"), None);
        assert_eq!(parse_maps_line("10-0 rw-p 0 00:00 0"), None);
        assert_eq!(parse_maps_line("0-10 rw-pq 0 00:00 0"), None);
        assert_eq!(parse_maps_line("0-10 rw-p 0 0000 0"), None);
        assert_eq!(parse_maps_line("0-10 rw-p 0 00:00"), None);
        assert!(parse_maps("0-1000 rw-p 0 00:00 0\nnonsense\n").is_err());
    }

    #[test]
    fn map_files_names_are_lowercase_hex_without_prefix() {
        assert_eq!(
            map_files_name(0x7F10_0000_0000, 0x7f10_0020_0000),
            "7f1000000000-7f1000200000"
        );
        assert_eq!(map_files_name(0x1000, 0xabc000), "1000-abc000");
        let v = parse_maps(MAPS).unwrap();
        assert_eq!(v[4].map_files_name(), "7f3000000000-7f3000001000");
    }

    /// A new memfd named `name` of `len` bytes, mapped whole and shared at
    /// an address the kernel picks, with `prot`; the caller unmaps it.
    fn shared_memfd(
        name: &str,
        len: usize,
        prot: nix::sys::mman::ProtFlags,
    ) -> (File, std::ptr::NonNull<std::ffi::c_void>) {
        use nix::sys::mman::{mmap, MapFlags};
        let fd =
            nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(len as u64).unwrap();
        // SAFETY: a new shared mapping at an address the kernel picks; only
        // its address is used, never a reference into it.
        let p = unsafe {
            mmap(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                prot,
                MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .unwrap();
        (file, p)
    }

    /// Both ways of asking agree on this process: two areas of one memfd
    /// (split by protection), a hole, the ends of the range.
    #[test]
    fn query_and_text_agree_on_our_own_areas() {
        use nix::sys::mman::{mprotect, munmap, ProtFlags};
        const PAGE: u64 = 4096;
        let (_file, p) = shared_memfd(
            "maps-test",
            4 * PAGE as usize,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
        );
        let base = p.as_ptr() as u64;
        // SAFETY: pages 2 and 3 of our own mapping, no reference into them.
        unsafe {
            mprotect(
                p.byte_add(2 * PAGE as usize),
                PAGE as usize,
                ProtFlags::PROT_READ,
            )
            .unwrap();
            munmap(p.byte_add(3 * PAGE as usize), PAGE as usize).unwrap();
        }
        let maps = || File::open("/proc/self/maps").unwrap();
        let text = text_covering(&maps(), base + PAGE, base + 3 * PAGE).unwrap();
        assert_eq!(text.len(), 2);
        assert_eq!((text[0].start, text[0].end), (base, base + 2 * PAGE));
        assert!(text[0].write && text[0].shared && text[0].is_shareable());
        assert_eq!((text[1].offset, text[1].write), (2 * PAGE, false));
        assert!(
            text[1].path.starts_with("/memfd:maps-test"),
            "{}",
            text[1].path
        );
        // Below mmap_min_addr nothing is ever mapped (a hole made here could
        // be filled by another test's mapping meanwhile).
        let hole = text_covering(&maps(), PAGE, 2 * PAGE).unwrap_err();
        assert_eq!(hole.errno, Errno::EFAULT);
        match query_covering(&maps(), base + PAGE, base + 3 * PAGE) {
            Err(e) if e.errno == Errno::ENOTTY => {
                eprintln!("PROCMAP_QUERY not offered by this kernel: text path only");
            }
            got => {
                assert_eq!(got.unwrap(), text);
                let hole = query_covering(&maps(), PAGE, 2 * PAGE).unwrap_err();
                assert_eq!(hole.errno, Errno::EFAULT);
                assert!(hole.message.contains("0x1000"), "{}", hole.message);
            }
        }
        // SAFETY: the rest of the mapping made above.
        unsafe { munmap(p, 3 * PAGE as usize) }.unwrap();
    }

    /// One open maps file answers again, from its start and as the map is
    /// now: the check after an alias is made asks the descriptor the
    /// areas were first read from.
    #[test]
    fn one_open_maps_file_answers_again_as_the_map_is_now() {
        use nix::sys::mman::{mprotect, munmap, ProtFlags};
        const PAGE: u64 = 4096;
        let (_file, p) = shared_memfd(
            "maps-again",
            2 * PAGE as usize,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
        );
        let base = p.as_ptr() as u64;
        let maps = File::open("/proc/self/maps").unwrap();
        for ask in [text_covering, areas_covering] {
            let first = ask(&maps, base, base + 2 * PAGE).unwrap();
            assert_eq!(first.len(), 1);
            assert_eq!((first[0].start, first[0].end), (base, base + 2 * PAGE));
            assert_eq!(ask(&maps, base, base + 2 * PAGE).unwrap(), first);
        }
        // SAFETY: page 1 of our own mapping, no reference into it.
        unsafe {
            mprotect(
                p.byte_add(PAGE as usize),
                PAGE as usize,
                ProtFlags::PROT_READ,
            )
        }
        .unwrap();
        for ask in [text_covering, areas_covering] {
            let now = ask(&maps, base, base + 2 * PAGE).unwrap();
            assert_eq!(now.len(), 2, "the split shows through the same descriptor");
            assert_eq!((now[1].start, now[1].write), (base + PAGE, false));
        }
        // SAFETY: the mapping made above.
        unsafe { munmap(p, 2 * PAGE as usize) }.unwrap();
    }

    /// A name longer than the first buffer (the longest memfd name, shown
    /// as "/memfd:NAME (deleted)") comes back whole.
    #[test]
    fn query_and_text_agree_on_a_long_name() {
        use nix::sys::mman::{munmap, ProtFlags};
        let long = "n".repeat(249);
        let (_file, p) = shared_memfd(&long, 4096, ProtFlags::PROT_READ);
        let base = p.as_ptr() as u64;
        let maps = || File::open("/proc/self/maps").unwrap();
        let text = text_covering(&maps(), base, base + 4096).unwrap();
        assert!(text[0].path.contains(&long), "{}", text[0].path);
        assert!(text[0].path.len() > 256);
        match query_covering(&maps(), base, base + 4096) {
            Err(e) if e.errno == Errno::ENOTTY => {}
            got => assert_eq!(got.unwrap(), text),
        }
        // SAFETY: the mapping made above.
        unsafe { munmap(p, 4096) }.unwrap();
    }

    /// A maps text of `n` one-page areas from 0x10000 up, one page apart,
    /// with a `long` path on area `long_at`, in a file.
    fn long_maps_text(name: &str, n: u64, long_at: u64) -> (std::path::PathBuf, File) {
        use std::fmt::Write;
        let mut text = String::new();
        for i in 0..n {
            let start = 0x10000 + 2 * i * 4096;
            let path = if i == long_at {
                format!("/srv/{}", "x".repeat(5000))
            } else {
                format!("/memfd:buffer {i} (deleted)")
            };
            writeln!(
                text,
                "{start:08x}-{:08x} rw-s {:08x} 00:01 {}                  {path}",
                start + 4096,
                i * 4096,
                1000 + i
            )
            .unwrap();
        }
        let path = std::env::temp_dir().join(format!("maps-{name}-{}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    /// Bytes this thread has read with read(2) and its kind so far.
    fn thread_rchar() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The text is read only as far as the range needs: an area a few
    /// lines into a text of 20,000 costs a chunk, not the whole text.
    #[test]
    fn the_text_is_read_only_up_to_the_range() {
        let (path, maps) = long_maps_text("early", 20_000, u64::MAX);
        let whole = std::fs::metadata(&path).unwrap().len();
        assert!(whole > 1 << 20);
        let area = 0x10000 + 2 * 5 * 4096;
        let before = thread_rchar();
        let found = text_covering(&maps, area, area + 4096).unwrap();
        let read = thread_rchar() - before;
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].start, found[0].inode), (area, 1005));
        // The read of /proc/thread-self/io itself counts too (a few hundred
        // bytes); the whole text is over a megabyte.
        assert!(read < 2 * TEXT_CHUNK as u64, "read {read} of {whole} bytes");
        // A gap stops the read as early: the page between two areas.
        let before = thread_rchar();
        let e = text_covering(&maps, area + 4096, area + 8192).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        assert!(thread_rchar() - before < 2 * TEXT_CHUNK as u64);
        std::fs::remove_file(path).unwrap();
    }

    /// Lines cut by the chunks, and a line longer than a chunk, come
    /// whole; an area at the very end is found; a range past the last line
    /// is EFAULT.
    #[test]
    fn the_text_read_in_chunks_finds_every_line_whole() {
        let n = 3000;
        let (path, maps) = long_maps_text("chunks", n, 1500);
        let text = std::fs::read_to_string(&path).unwrap();
        let all = parse_maps(&text).unwrap();
        for i in [0, 1, 57, 1499, 1500, 1501, 2222, n - 1] {
            let area = &all[i as usize];
            let found = text_covering(&maps, area.start, area.end).unwrap();
            assert_eq!(found, vec![area.clone()], "area {i}");
        }
        assert!(all[1500].path.len() > TEXT_CHUNK);
        let past = all.last().unwrap().end + 4096;
        let e = text_covering(&maps, past, past + 4096).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_text_path_parses_only_what_covers_and_reports_gaps() {
        let c = covering_lines(MAPS.as_bytes(), 0x7f10_001f_f000, 0x7f10_0020_1000).unwrap();
        assert_eq!(c, parse_maps(MAPS).unwrap()[1..3].to_vec());
        let e = covering_lines(MAPS.as_bytes(), 0x7f10_003f_f000, 0x7f10_0040_1000).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        assert!(e.message.contains("0x7f1000400000"), "{}", e.message);
        // A malformed line before the range is reported, not skipped.
        let bad = format!("nonsense\n{MAPS}");
        let e = covering_lines(bad.as_bytes(), 0x7f30_0000_0000, 0x7f30_0000_1000).unwrap_err();
        assert_eq!(e.errno, Errno::EIO);
    }

    #[test]
    fn covering_spans_adjacent_areas_and_reports_gaps() {
        let v = parse_maps(MAPS).unwrap();
        // Across the two adjacent memfd areas.
        let c = covering(&v, 0x7f10_001f_f000, 0x7f10_0020_1000).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].start, 0x7f10_0000_0000);
        assert_eq!(c[1].start, 0x7f10_0020_0000);
        // Exactly one area.
        let c = covering(&v, 0x7f30_0000_0000, 0x7f30_0000_1000).unwrap();
        assert_eq!(c.len(), 1);
        // Running off the end of the memfd into unmapped space.
        let e = covering(&v, 0x7f10_003f_f000, 0x7f10_0040_1000).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        assert!(e.message.contains("0x7f1000400000"), "{}", e.message);
        // Starting in a hole.
        let e = covering(&v, 0x7f00_0000_0000, 0x7f00_0000_1000).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
    }
}
