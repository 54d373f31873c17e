//! Host tests of the status: the snapshot of a known state through
//! watched nodes (the real `/dev/ioasid` front end over the fake
//! backend), its text and JSON forms, and the socket.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cuse_server::{Device, IoctlArgs, OpenFlags, Request};
use ioasid_engine::backend::Prot;
use ioasid_engine::fake::FakeBackend;
use ioasid_engine::{DeviceId, DeviceSpec, DmaMap, Engine};
use ioasid_uapi::{IOASID_CHECK_EXTENSION, IOASID_EXT_TYPE1V2_DMA, IOASID_FREE};

use super::model::*;
use super::render::{bytes, render};
use super::*;
use crate::node::IoasidNode;

const CLIENT: i32 = 100;
const MEM: u64 = 0x1000_0000;
const K4: u64 = 4096;
const DEV1: DeviceId = DeviceId(1);
const DEV2: DeviceId = DeviceId(2);

fn me() -> Request {
    Request::for_caller(nix::unistd::gettid().as_raw() as u32, 0, 0)
}

/// A device node that does nothing: what matters is the watching.
struct Quiet;
impl Device for Quiet {
    fn open(&self, _req: &Request, _flags: OpenFlags) -> Result<u64, cuse_server::Errno> {
        Ok(7)
    }
}

fn served() -> Vec<ServedDevice> {
    vec![
        ServedDevice {
            id: DEV1,
            pci: "0000:00:0a.0".into(),
            node: "/dev/vfio/devices/dev1".into(),
            group: 4,
        },
        ServedDevice {
            id: DEV2,
            pci: "0000:00:0b.0".into(),
            node: "/dev/vfio/devices/dev2".into(),
            group: 5,
        },
    ]
}

struct Wired {
    engine: Arc<Engine>,
    ioasid: Arc<dyn Device>,
    dev1: Arc<dyn Device>,
    sources: Sources,
}

/// The daemon's wiring over the fake backend: `/dev/ioasid` (the real
/// front end) and a quiet node for dev1, both watched.
fn daemon() -> Wired {
    let fake = Arc::new(FakeBackend::new());
    fake.share(CLIENT, MEM, 1 << 20);
    let specs = served()
        .iter()
        .map(|d| DeviceSpec {
            id: d.id,
            name: d.pci.clone(),
            group: d.group,
        })
        .collect();
    let engine = Engine::new(fake, specs).unwrap();
    let wiring = Wiring::default();
    let ioasid = wiring.ioasid_node(
        Arc::new(IoasidNode::new(engine.clone(), Box::new(|_| {}))),
        "/dev/ioasid",
    );
    let dev1 = wiring.device_node(Arc::new(Quiet), "/dev/vfio/devices/dev1", "0000:00:0a.0");
    let sources = Sources {
        engine: engine.clone(),
        clients: wiring.clients,
        counters: vec![wiring.ioasid, wiring.device],
        errors: wiring.errors,
        devices: served(),
        memlock: Box::new(|_| Limit::Bytes(64 << 20)),
        command: Box::new(|_| "client".into()),
        cuse: Box::new(|| {
            vec![NodeCalls {
                node: "ioasid".into(),
                threads: 2,
                spawned: 3,
                running: 1,
                waiting: 0,
                refused: 0,
            }]
        }),
        started: Instant::now(),
    };
    Wired {
        engine,
        ioasid,
        dev1,
        sources,
    }
}

fn ioctl(node: &Arc<dyn Device>, fh: u64, cmd: u32, arg: u64) -> Result<i32, cuse_server::Errno> {
    let args = IoctlArgs {
        cmd,
        arg,
        input: &[],
        out_size: 0,
    };
    node.ioctl(&me(), fh, args).map(|r| r.result)
}

/// The state the scenario checks too: one client with an ioasid file
/// (IOASID 1 with two mappings and dev1 attached, IOASID 2 empty), a
/// device file of dev1, and a few requests, two of them refused.
fn known_state(d: &Wired) -> u64 {
    let fh = d.ioasid.open(&me(), OpenFlags(2)).unwrap();
    let ctx = ioasid_engine::ContextId(fh);
    d.dev1.open(&me(), OpenFlags(2)).unwrap();
    let en = &d.engine;
    let io = en.alloc(ctx).unwrap();
    en.alloc(ctx).unwrap();
    en.bind(DEV1, ctx).unwrap();
    en.attach(DEV1, ctx, &CLIENT, io, None).unwrap();
    let rw = Prot {
        read: true,
        write: true,
    };
    for i in 0..2 {
        en.map_dma(
            ctx,
            &CLIENT,
            io,
            DmaMap {
                iova: i * K4,
                vaddr: MEM + i * K4,
                size: K4,
                prot: rw,
            },
        )
        .unwrap();
    }
    assert_eq!(
        ioctl(
            &d.ioasid,
            fh,
            IOASID_CHECK_EXTENSION,
            u64::from(IOASID_EXT_TYPE1V2_DMA)
        ),
        Ok(1)
    );
    assert_eq!(
        ioctl(&d.ioasid, fh, IOASID_FREE, 99),
        Err(cuse_server::Errno::ENOENT)
    );
    assert_eq!(
        ioctl(&d.ioasid, fh, 0xdead, 0),
        Err(cuse_server::Errno::ENOTTY)
    );
    fh
}

fn requests(kind: &str, command: &str, calls: u64, failed: u64) -> Requests {
    Requests {
        kind: kind.into(),
        command: command.into(),
        calls,
        failed,
    }
}

#[test]
fn the_status_of_a_known_state_is_exactly_that_state() {
    let d = daemon();
    let fh = known_state(&d);
    let s = d.sources.status();

    assert_eq!(s.daemon.pid, std::process::id());
    assert_eq!(s.daemon.version, env!("CARGO_PKG_VERSION"));
    let ioasid_file = OpenFile {
        node: "/dev/ioasid".into(),
        kind: "ioasid".into(),
        handle: fh,
        device: None,
        busy: false,
        age_ms: 0,
        memory: Some(Memory {
            pinned_bytes: 2 * K4,
            registrations: 0,
            registered_bytes: 0,
        }),
        objects: vec![
            Object {
                kind: "IOASID".into(),
                id: 1,
                parent: None,
                mappings: 2,
                mapped_bytes: 2 * K4,
                attached: vec!["0000:00:0a.0".into()],
                groups: vec![4],
                notes: vec![],
            },
            Object {
                kind: "IOASID".into(),
                id: 2,
                parent: None,
                mappings: 0,
                mapped_bytes: 0,
                attached: vec![],
                groups: vec![],
                notes: vec!["no device attached yet: map refused".into()],
            },
        ],
        devices: vec![BoundDevice {
            pci: "0000:00:0a.0".into(),
            node: "/dev/vfio/devices/dev1".into(),
            group: 4,
            attached: vec!["IOASID 1".into()],
        }],
        groups_out_of_service: 0,
    };
    let device_file = OpenFile {
        node: "/dev/vfio/devices/dev1".into(),
        kind: "device".into(),
        handle: 7,
        device: Some("0000:00:0a.0".into()),
        ..OpenFile::default()
    };
    assert_eq!(
        s.processes,
        [Process {
            pid: std::process::id(),
            command: "client".into(),
            memlock_limit: Limit::Bytes(64 << 20),
            pinned_bytes: None,
            files: vec![ioasid_file, device_file],
        }]
    );
    assert_eq!(s.devices[0].bound_to.as_ref().unwrap().node, "/dev/ioasid");
    assert_eq!(s.devices[0].bound_to.as_ref().unwrap().handle, fh);
    assert_eq!(
        s.devices[0].bound_to.as_ref().unwrap().pid,
        Some(std::process::id())
    );
    assert_eq!(s.devices[1].bound_to, None);
    assert_eq!(
        s.counters.requests,
        [
            requests("ioasid", "open", 1, 0),
            requests("ioasid", "unknown ioctl", 1, 1),
            requests("ioasid", "IOASID_CHECK_EXTENSION", 1, 0),
            requests("ioasid", "IOASID_FREE", 1, 1),
            requests("device", "open", 1, 0),
        ]
    );
    assert_eq!(
        s.counters.errors,
        [("ENOENT".to_string(), 1), ("ENOTTY".to_string(), 1)].into()
    );
    assert_eq!(s.counters.walks, Walks::default());
    assert_eq!(s.cuse[0].threads, 2);

    // Closed, nothing is left but the counters.
    d.ioasid.release(fh);
    d.dev1.release(7);
    let s = d.sources.status();
    assert!(s.processes.is_empty(), "{:?}", s.processes);
    assert!(s.devices.iter().all(|d| d.bound_to.is_none()));
    assert!(d.engine.snapshot().is_empty());
    assert!(s
        .counters
        .requests
        .contains(&requests("ioasid", "release", 1, 0)));
}

fn sample() -> Status {
    Status {
        daemon: Daemon {
            pid: 42,
            version: "0.1.0".into(),
            uptime_s: 125,
        },
        processes: vec![Process {
            pid: 4000,
            command: "flow_5_1".into(),
            memlock_limit: Limit::Bytes(8 << 20),
            pinned_bytes: None,
            files: vec![
                OpenFile {
                    node: "/dev/ioasid".into(),
                    kind: "ioasid".into(),
                    handle: 3,
                    memory: Some(Memory {
                        pinned_bytes: 3 * K4 + 1,
                        registrations: 1,
                        registered_bytes: 1 << 20,
                    }),
                    objects: vec![Object {
                        kind: "IOASID".into(),
                        id: 1,
                        mappings: 3,
                        mapped_bytes: 3 * K4,
                        attached: vec!["0000:00:0a.0".into()],
                        groups: vec![4],
                        ..Object::default()
                    }],
                    devices: vec![BoundDevice {
                        pci: "0000:00:0a.0".into(),
                        node: "/dev/vfio/devices/dev1".into(),
                        group: 4,
                        attached: vec!["IOASID 1".into()],
                    }],
                    ..OpenFile::default()
                },
                OpenFile {
                    node: "/dev/ioasid".into(),
                    kind: "ioasid".into(),
                    handle: 4,
                    busy: true,
                    ..OpenFile::default()
                },
            ],
        }],
        devices: vec![model::Device {
            node: "/dev/vfio/devices/dev1".into(),
            pci: "0000:00:0a.0".into(),
            group: 4,
            bound_to: Some(FileRef {
                pid: Some(4000),
                node: "/dev/ioasid".into(),
                handle: 3,
            }),
        }],
        counters: Counters {
            requests: vec![requests("ioasid", "IOASID_MAP_DMA", 3, 1)],
            errors: [("EINVAL".to_string(), 1)].into(),
            walks: Walks {
                walks: 2,
                malformed_tables: 1,
                malformed_entries: 5,
                truncated: 0,
            },
        },
        cuse: vec![NodeCalls {
            node: "ioasid".into(),
            threads: 1,
            spawned: 1,
            running: 0,
            waiting: 0,
            refused: 0,
        }],
    }
}

#[test]
fn the_text_form_says_everything_once() {
    let want = "\
cuse-ioasid 0.1.0, pid 42, serving for 2m 5s

client 4000 (flow_5_1): RLIMIT_MEMLOCK 8 MiB
  /dev/ioasid (file 3): 12289 B pinned of 8 MiB (1 MiB registered in 1 registration)
    IOASID 1: 3 mappings, 12 KiB; attached: 0000:00:0a.0; in the domain of group 4
    device 0000:00:0a.0 (/dev/vfio/devices/dev1, group 4): attached to IOASID 1
  /dev/ioasid (file 4) [busy: a call is running; no figures yet]

devices:
  node                       PCI address    group  bound to
  /dev/vfio/devices/dev1     0000:00:0a.0       4  client 4000, /dev/ioasid (file 3)

requests:
  node     command                                 calls   failed
  ioasid   IOASID_MAP_DMA                              3        1
errors: EINVAL 1
page-table walks: 2; malformed tables: 1 (5 malformed entries); cut short by the budget: 0

CUSE server:
  node                       threads spawned running waiting refused
  ioasid                           1       1       0       0       0
";
    assert_eq!(render(&sample()), want);
}

#[test]
fn bytes_are_never_rounded() {
    assert_eq!(bytes(0), "0 B");
    assert_eq!(bytes(4096), "4 KiB");
    assert_eq!(bytes(4097), "4097 B");
    assert_eq!(bytes(3 << 20), "3 MiB");
    assert_eq!(bytes((1 << 30) + 4096), "1048580 KiB");
    assert_eq!(bytes(1 << 40), "1 TiB");
}

#[test]
fn the_json_form_has_the_same_content() {
    let s = sample();
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(serde_json::from_value::<Status>(json.clone()).unwrap(), s);
    // Field names a script reads.
    let p = &json["processes"][0];
    assert_eq!(p["pid"], 4000);
    assert_eq!(p["memlock_limit"], serde_json::json!({ "bytes": 8 << 20 }));
    assert_eq!(p["pinned_bytes"], serde_json::Value::Null);
    assert_eq!(p["files"][0]["objects"][0]["kind"], "IOASID");
    assert_eq!(p["files"][0]["memory"]["pinned_bytes"], 3 * K4 + 1);
    assert_eq!(p["files"][1]["busy"], true);
    assert_eq!(json["counters"]["errors"]["EINVAL"], 1);
    assert_eq!(json["counters"]["walks"]["malformed_tables"], 1);
    assert_eq!(
        serde_json::to_value(Limit::Unlimited).unwrap(),
        serde_json::json!("unlimited")
    );
    // A newer daemon's extra fields are ignored, missing ones defaulted.
    let mut newer = json.clone();
    newer["processes"][0]["files"][0]["hwpts"] = serde_json::json!([]);
    newer["daemon"].as_object_mut().unwrap().remove("uptime_s");
    let read: Status = serde_json::from_value(newer).unwrap();
    assert_eq!(read.daemon.uptime_s, 0);
    assert_eq!(read.processes, s.processes);
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("cuse-ioasid-status-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn the_socket_answers_with_the_status() {
    let d = daemon();
    known_state(&d);
    let dir = scratch("answers");
    let path = dir.join("run/status.sock");
    let mut socket = StatusSocket::bind(&path, None).unwrap();
    // Root's only; the directory was created for it.
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let want = d.sources.status();
    socket.serve(Arc::new(d.sources)).unwrap();

    let json = show(&path, true).unwrap();
    let got: Status = serde_json::from_str(&json).unwrap();
    assert_eq!(got.processes, want.processes);
    assert_eq!(got.devices, want.devices);
    assert_eq!(got.counters, want.counters);
    let text = show(&path, false).unwrap();
    assert_eq!(text, render(&got));

    // A request that is not "status" is refused, by name.
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    c.write_all(b"dump\n").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("unknown request"), "{answer}");

    // A second daemon on the same socket is refused; the socket goes with
    // the first.
    let err = StatusSocket::bind(&path, None).err().unwrap();
    assert!(err.to_string().contains("another cuse-ioasid"), "{err}");
    drop(socket);
    assert!(!path.exists());
    let err = show(&path, false).unwrap_err();
    assert!(
        err.to_string().contains("no cuse-ioasid daemon answers"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stale_socket_is_replaced_and_a_group_gets_0660() {
    let dir = scratch("stale");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("status.sock");
    // A socket nobody listens on (a daemon killed by SIGKILL).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let gid = nix::unistd::getgid();
    let socket = StatusSocket::bind(&path, Some(gid)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid.as_raw());
    drop(socket);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A writer for a test's log: every line the subscriber writes, kept.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with the daemon's log at `filter`; returns the lines written.
fn log_of(filter: &str, f: impl FnOnce()) -> Vec<String> {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_string).collect()
}

#[test]
fn every_request_writes_one_debug_line_when_asked_and_none_otherwise() {
    let requests_of = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.split_once("cuse_ioasid::requests: request "))
            .map(|(_, fields)| fields.to_string())
            .collect()
    };
    let d = daemon();
    let lines = log_of("info,cuse_ioasid::requests=debug", || {
        known_state(&d);
    });
    let pid = std::process::id();
    let fh = 1;
    assert_eq!(
        requests_of(&lines),
        [
            format!("node=/dev/ioasid fh={fh} pid={pid} cmd=open nr=- result=ok"),
            format!("node=/dev/vfio/devices/dev1 fh=7 pid={pid} cmd=open nr=- result=ok"),
            format!(
                "node=/dev/ioasid fh={fh} pid={pid} cmd=IOASID_CHECK_EXTENSION nr={IOASID_CHECK_EXTENSION:#x} result=ok"
            ),
            format!(
                "node=/dev/ioasid fh={fh} pid={pid} cmd=IOASID_FREE nr={IOASID_FREE:#x} result=ENOENT"
            ),
            format!("node=/dev/ioasid fh={fh} pid={pid} cmd=unknown ioctl nr=0xdead result=ENOTTY"),
        ]
    );
    // A released file's line still names its process; then it is
    // forgotten.
    let lines = log_of("info,cuse_ioasid::requests=debug", || {
        d.dev1.release(7);
    });
    assert_eq!(
        requests_of(&lines),
        [format!(
            "node=/dev/vfio/devices/dev1 fh=7 pid={pid} cmd=release nr=- result=ok"
        )]
    );

    // Off by default: the same requests at info write no such line.
    let d = daemon();
    let lines = log_of("info", || {
        known_state(&d);
    });
    assert!(requests_of(&lines).is_empty(), "{lines:?}");
}
