//! The wire structs and constants against the system's C header
//! `<linux/fuse.h>`, compiled with the C compiler: every struct's size and
//! every field's offset, every constant the crate defines.
//!
//! Needs `cc` and the kernel headers (Debian: `linux-libc-dev`); without them
//! the test says so and passes. (`FUSE_INT_REQ_BIT` is kernel-internal, in
//! fs/fuse/dev.c, and not checked.) The header's protocol version is checked too:
//! the layouts below are those of 7.38.

use std::mem::{offset_of, size_of};
use std::process::Command;

use cuse_server::wire::*;

/// (C name, Rust size, [(field, Rust offset)]) for each struct.
macro_rules! layouts {
    ($( $rs:ident = $c:literal { $($f:ident),* $(,)? } ),* $(,)?) => {
        vec![ $( ($c, size_of::<$rs>(), vec![ $( (stringify!($f), offset_of!($rs, $f)) ),* ]) ),* ]
    };
}

#[allow(clippy::type_complexity)]
fn rust_layouts() -> Vec<(&'static str, usize, Vec<(&'static str, usize)>)> {
    layouts!(
        FuseInHeader = "fuse_in_header" { len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding },
        FuseOutHeader = "fuse_out_header" { len, error, unique },
        CuseInitIn = "cuse_init_in" { major, minor, unused, flags },
        CuseInitOut = "cuse_init_out" {
            major, minor, unused, flags, max_read, max_write, dev_major, dev_minor, spare
        },
        FuseOpenIn = "fuse_open_in" { flags, open_flags },
        FuseOpenOut = "fuse_open_out" { fh, open_flags, padding },
        FuseReadIn = "fuse_read_in" { fh, offset, size, read_flags, lock_owner, flags, padding },
        FuseWriteIn = "fuse_write_in" { fh, offset, size, write_flags, lock_owner, flags, padding },
        FuseWriteOut = "fuse_write_out" { size, padding },
        FuseReleaseIn = "fuse_release_in" { fh, flags, release_flags, lock_owner },
        FuseIoctlIn = "fuse_ioctl_in" { fh, flags, cmd, arg, in_size, out_size },
        FuseIoctlOut = "fuse_ioctl_out" { result, flags, in_iovs, out_iovs },
        FusePollIn = "fuse_poll_in" { fh, kh, flags, events },
        FusePollOut = "fuse_poll_out" { revents, padding },
        FuseNotifyPollWakeupOut = "fuse_notify_poll_wakeup_out" { kh },
        FuseInterruptIn = "fuse_interrupt_in" { unique },
    )
}

fn rust_constants() -> Vec<(&'static str, i64)> {
    vec![
        ("FUSE_KERNEL_VERSION", FUSE_KERNEL_VERSION as i64),
        (
            "FUSE_KERNEL_MINOR_VERSION",
            FUSE_KERNEL_MINOR_VERSION as i64,
        ),
        ("CUSE_UNRESTRICTED_IOCTL", CUSE_UNRESTRICTED_IOCTL as i64),
        ("FUSE_IOCTL_COMPAT", FUSE_IOCTL_COMPAT as i64),
        ("FUSE_IOCTL_UNRESTRICTED", FUSE_IOCTL_UNRESTRICTED as i64),
        ("FUSE_IOCTL_RETRY", FUSE_IOCTL_RETRY as i64),
        ("FUSE_IOCTL_32BIT", FUSE_IOCTL_32BIT as i64),
        ("FUSE_IOCTL_DIR", FUSE_IOCTL_DIR as i64),
        ("FUSE_IOCTL_COMPAT_X32", FUSE_IOCTL_COMPAT_X32 as i64),
        (
            "FUSE_POLL_SCHEDULE_NOTIFY",
            FUSE_POLL_SCHEDULE_NOTIFY as i64,
        ),
        ("FUSE_NOTIFY_POLL", FUSE_NOTIFY_POLL as i64),
        ("CUSE_INIT_INFO_MAX", CUSE_INIT_INFO_MAX as i64),
        ("FUSE_MIN_READ_BUFFER", FUSE_MIN_READ_BUFFER as i64),
        ("FUSE_FORGET", Opcode::Forget as i64),
        ("FUSE_OPEN", Opcode::Open as i64),
        ("FUSE_READ", Opcode::Read as i64),
        ("FUSE_WRITE", Opcode::Write as i64),
        ("FUSE_RELEASE", Opcode::Release as i64),
        ("FUSE_FLUSH", Opcode::Flush as i64),
        ("FUSE_INTERRUPT", Opcode::Interrupt as i64),
        ("FUSE_DESTROY", Opcode::Destroy as i64),
        ("FUSE_IOCTL", Opcode::Ioctl as i64),
        ("FUSE_POLL", Opcode::Poll as i64),
        ("FUSE_BATCH_FORGET", Opcode::BatchForget as i64),
        ("CUSE_INIT", Opcode::CuseInit as i64),
    ]
}

fn c_program() -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/fuse.h>\nint main(void) {\n",
    );
    for (name, _, fields) in rust_layouts() {
        c += &format!("  printf(\"{name} %zu\\n\", sizeof(struct {name}));\n");
        for (f, _) in fields {
            c += &format!("  printf(\"{name}.{f} %zu\\n\", offsetof(struct {name}, {f}));\n");
        }
    }
    for (name, _) in rust_constants() {
        c += &format!("  printf(\"{name} %lld\\n\", (long long)({name}));\n");
    }
    c += "  return 0;\n}\n";
    c
}

#[test]
fn wire_layout_matches_linux_fuse_h() {
    if !std::path::Path::new("/usr/include/linux/fuse.h").exists() {
        eprintln!("SKIPPED: /usr/include/linux/fuse.h missing (install linux-libc-dev)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cuse-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("abi.c");
    let exe = dir.join("abi");
    std::fs::write(&src, c_program()).unwrap();
    let cc = match Command::new("cc").arg("-o").arg(&exe).arg(&src).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: no C compiler ({e})");
            return;
        }
    };
    assert!(
        cc.status.success(),
        "C compile failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let c: std::collections::HashMap<&str, i64> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();

    // The header must be the protocol version the layouts are for (a newer
    // header may have grown structs; then this test names what changed).
    assert_eq!(c["FUSE_KERNEL_VERSION"], 7);
    let mut mismatches = Vec::new();
    for (name, size, fields) in rust_layouts() {
        if c[name] != size as i64 {
            mismatches.push(format!("sizeof {name}: C {} Rust {size}", c[name]));
        }
        for (f, off) in fields {
            let key = format!("{name}.{f}");
            if c[key.as_str()] != off as i64 {
                mismatches.push(format!("offset {key}: C {} Rust {off}", c[key.as_str()]));
            }
        }
    }
    for (name, value) in rust_constants() {
        if name == "FUSE_KERNEL_MINOR_VERSION" {
            continue; // compared below
        }
        if c[name] != value {
            mismatches.push(format!("{name}: C {} Rust {value}", c[name]));
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert!(
        c["FUSE_KERNEL_MINOR_VERSION"] >= FUSE_KERNEL_MINOR_VERSION as i64,
        "header older than protocol 7.{FUSE_KERNEL_MINOR_VERSION}"
    );
}
