//! Compares the Rust mirror with the C header as the C compiler sees it:
//! `tests/layout.c` is compiled against `include/linux/ioasid.h` with `cc`
//! from PATH and prints every struct size, field offset and constant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use ioasid_uapi::*;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("ioasid-uapi-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[derive(Debug, Default)]
struct CLayout {
    structs: BTreeMap<String, usize>,
    /// struct -> fields in printed (declaration) order: (name, offset, size)
    fields: BTreeMap<String, Vec<(String, usize, usize)>>,
    consts: BTreeMap<String, u64>,
}

fn c_layout() -> CLayout {
    let tmp = TempDir::new("layout");
    let exe = tmp.0.join("layout");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("tests/layout.c"))
        .arg("-o")
        .arg(&exe));
    let text = run(&mut Command::new(&exe));
    let mut l = CLayout::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["struct", name, size] => {
                assert!(l
                    .structs
                    .insert(name.to_string(), size.parse().unwrap())
                    .is_none());
            }
            ["field", s, f, off, size] => l.fields.entry(s.to_string()).or_default().push((
                f.to_string(),
                off.parse().unwrap(),
                size.parse().unwrap(),
            )),
            ["const", name, value] => {
                assert!(l
                    .consts
                    .insert(name.to_string(), value.parse().unwrap())
                    .is_none());
            }
            _ => panic!("unexpected line from layout.c: {line:?}"),
        }
    }
    l
}

/// Struct names and object-like macro names defined by the header itself.
fn header_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(crate_dir().join("include/linux/ioasid.h")).unwrap();
    let mut structs = BTreeSet::new();
    let mut macros = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("struct ") {
            if let Some(name) = rest.strip_suffix(" {") {
                structs.insert(name.to_string());
            }
        }
        if let Some(rest) = line.strip_prefix("#define ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != "_UAPI_LINUX_IOASID_H" {
                macros.insert(name);
            }
        }
    }
    (structs, macros)
}

/// Every constant of the Rust mirror, by its C name.
fn rust_consts() -> BTreeMap<&'static str, u64> {
    macro_rules! table {
        ($($n:ident),+ $(,)?) => {
            BTreeMap::from([$((stringify!($n), $n as u64)),+])
        };
    }
    table!(
        IOASID_TYPE,
        IOASID_BASE,
        IOASID_MAX_ID,
        IOASID_PASID_BITS,
        IOASID_PASID_TABLE_MAX_ENTRIES,
        IOASID_EXT_TYPE1V2_DMA,
        IOASID_EXT_REGISTER_MEMORY,
        IOASID_EXT_NESTING_SOFTWARE,
        IOASID_EXT_NESTING_HARDWARE,
        IOASID_EXT_BIND_PGTABLE_SHADOW,
        IOASID_EXT_BIND_PASID_TABLE_SHADOW,
        IOASID_EXT_USER_PASID_TRACKED,
        IOASID_EXT_PASID_DMA_ROUTING,
        IOASID_CHECK_EXTENSION,
        IOASID_REGISTER_MEMORY,
        IOASID_UNREGISTER_MEMORY,
        IOASID_ALLOC,
        IOASID_FREE,
        IOASID_GET_INFO,
        IOASID_MAP_DMA,
        IOASID_UNMAP_DMA,
        IOASID_CREATE_NESTING,
        IOASID_BIND_PGTABLE,
        IOASID_UNBIND_PGTABLE,
        IOASID_BIND_PASID_TABLE,
        IOASID_UNBIND_PASID_TABLE,
        IOASID_INVALIDATE_CACHE,
        IOASID_DAEMON_IDENTIFY,
        IOASID_INFO_PGSIZES,
        IOASID_INFO_CAPS,
        IOASID_INFO_MAP_DMA,
        IOASID_INFO_BIND_PGTABLE,
        IOASID_INFO_BIND_PASID_TABLE,
        IOASID_INFO_NESTED,
        IOASID_INFO_CAP_IOVA_RANGES,
        IOASID_INFO_CAP_NESTING,
        IOASID_INFO_CAP_PGTABLE_FORMATS,
        IOASID_INFO_CAP_PASID,
        IOASID_INFO_CAP_PARENT,
        IOASID_INFO_CAP_DMA_AVAIL,
        IOASID_INFO_CAP_SHADOW,
        IOASID_NESTING_SOFTWARE,
        IOASID_NESTING_HARDWARE,
        IOASID_PGTABLE_FORMAT_SHADOWED,
        IOASID_PASID_ATTACH_TRACKED,
        IOASID_PASID_DMA_ROUTED,
        IOASID_SHADOW_PGTABLE,
        IOASID_SHADOW_PASID_TABLE,
        IOASID_SHADOW_TRUNCATED,
        IOASID_DMA_MAP_FLAG_READ,
        IOASID_DMA_MAP_FLAG_WRITE,
        IOASID_DMA_UNMAP_FLAG_ALL,
        IOASID_PGTABLE_X86_64_4LVL,
        IOASID_PASID_TABLE_FLAT_X86_64,
        IOASID_INVALIDATE_ADDR,
        IOASID_INVALIDATE_PASID,
        IOASID_INVALIDATE_PASID_CACHE,
        VFIO_TYPE,
        VFIO_BASE,
        VFIO_BIND_IOASID_FD,
        VFIO_UNBIND_IOASID_FD,
        IOASID_ATTACH_USER_PASID,
        VFIO_ATTACH_IOASID,
        VFIO_DETACH_IOASID,
    )
}

/// `pub const` names declared in a source file of the crate.
fn pub_consts_in(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub const "))
        .map(|rest| rest.split(':').next().unwrap().trim().to_string())
        .filter(|n| {
            n.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

/// Asserts two name sets are equal, printing only the differences.
fn assert_same_names(left: &BTreeSet<String>, right: &BTreeSet<String>, what: &str) {
    let only_left: Vec<_> = left.difference(right).collect();
    let only_right: Vec<_> = right.difference(left).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty(),
        "{what}: only in the first: {only_left:?}; only in the second: {only_right:?}"
    );
}

#[test]
fn layout_c_covers_the_whole_header() {
    let c = c_layout();
    let (structs, macros) = header_names();
    let printed: BTreeSet<String> = c.structs.keys().cloned().collect();
    assert_same_names(
        &printed,
        &structs,
        "structs printed by layout.c vs defined in the header",
    );
    let printed_fields: BTreeSet<String> = c.fields.keys().cloned().collect();
    assert_same_names(
        &printed_fields,
        &structs,
        "structs with fields printed by layout.c vs the header",
    );
    let consts: BTreeSet<String> = c.consts.keys().cloned().collect();
    assert_same_names(
        &consts,
        &macros,
        "macros printed by layout.c vs defined in the header",
    );
}

#[test]
fn c_fields_tile_each_struct_without_padding() {
    // The ABI has no implicit padding: the printed fields, sorted by
    // offset, must cover [0, sizeof) exactly. This also proves layout.c
    // lists every field (a missing one leaves a gap).
    let c = c_layout();
    for (name, size) in &c.structs {
        let mut fields = c.fields[name].clone();
        fields.sort_by_key(|f| f.1);
        let mut end = 0;
        for (f, off, sz) in &fields {
            assert_eq!(*off, end, "{name}.{f}: gap or overlap before it");
            end = off + sz;
        }
        assert_eq!(
            end, *size,
            "{name}: fields do not reach the end (padding or missing field)"
        );
    }
}

#[test]
fn rust_structs_match_c() {
    let c = c_layout();
    let rust: BTreeSet<String> = ALL_STRUCTS.iter().map(|s| s.0.to_string()).collect();
    let cset: BTreeSet<String> = c.structs.keys().cloned().collect();
    assert_same_names(&rust, &cset, "structs of the Rust mirror vs C");
    for (name, size, fields) in ALL_STRUCTS {
        assert_eq!(*size, c.structs[*name], "sizeof(struct {name})");
        let cfields: Vec<(String, usize, usize)> = c.fields[*name]
            .iter()
            .map(|(f, o, s)| (f.trim_start_matches('_').to_string(), *o, *s))
            .collect();
        let rfields: Vec<(String, usize, usize)> = fields
            .iter()
            .map(|f| (f.name.to_string(), f.offset, f.size))
            .collect();
        assert_eq!(
            rfields, cfields,
            "fields of struct {name} (name, offset, size)"
        );
    }
}

#[test]
fn rust_constants_match_c() {
    let c = c_layout();
    let rust = rust_consts();
    let rnames: BTreeSet<String> = rust.keys().map(|s| s.to_string()).collect();
    let cnames: BTreeSet<String> = c.consts.keys().cloned().collect();
    assert_same_names(&rnames, &cnames, "constants of the Rust mirror vs C");
    for (name, value) in &rust {
        assert_eq!(*value, c.consts[*name], "value of {name}");
    }
    // Every public constant of the mirror is in the table above, so a
    // constant added on the Rust side only fails here.
    let declared = pub_consts_in(&crate_dir().join("src/numbers.rs"));
    let missing: Vec<_> = declared.iter().filter(|n| !rnames.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "constants of src/numbers.rs not in C: {missing:?}"
    );
}

#[test]
fn header_compiles_as_cxx_and_next_to_vfio_h() {
    let tmp = TempDir::new("cxx");
    let src = tmp.0.join("both.c");
    // linux/vfio.h defines VFIO_TYPE and VFIO_BASE too; either order must work.
    std::fs::write(
        &src,
        "#include <linux/ioasid.h>\n#include <linux/vfio.h>\n#include <linux/ioasid.h>\n\
         int main(void) { struct ioasid_dma_map m; m.argsz = sizeof(m); return (int)m.argsz - 40; }\n",
    )
    .unwrap();
    let src2 = tmp.0.join("vfio_first.c");
    std::fs::write(
        &src2,
        "#include <linux/vfio.h>\n#include <linux/ioasid.h>\nint main(void) { return 0; }\n",
    )
    .unwrap();
    for file in [&src, &src2] {
        run(Command::new("cc")
            .args([
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-pedantic",
                "-Werror",
                "-fsyntax-only",
                "-I",
            ])
            .arg(crate_dir().join("include"))
            .arg(file));
        run(Command::new("c++")
            .args([
                "-x",
                "c++",
                "-std=c++17",
                "-Wall",
                "-Wextra",
                "-pedantic",
                "-Werror",
                "-fsyntax-only",
                "-I",
            ])
            .arg(crate_dir().join("include"))
            .arg(file));
    }
}
