//! `cuse-ioasid`: serve the 2021 `/dev/ioasid` uAPI proposal and the
//! kernel's iommufd uAPI from user space.
//!
//! Registers `/dev/ioasid`, `/dev/iommu`, and per VFIO device
//! `/dev/vfio/devices/devN` (the RFC's dialect) and
//! `/dev/vfio/devices/vfioN` (iommufd's, N the kernel's own index) with
//! CUSE, and realises the I/O address spaces on legacy VFIO containers.

mod log_writer;
mod service;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use cuse_server::{DeviceConfig, Server};
use cuse_vfio_devices::DeviceNodes;
use ioasid_engine::{Budgets, DeviceId, DeviceSpec, Engine};
use nix::sys::signal::{SigSet, Signal};
use vfio_legacy::{PciDevice, Sysfs, VfioLegacy};

use cuse_ioasid::iommufd::IommufdNode;
use cuse_ioasid::node::IoasidNode;
use cuse_ioasid::status::{self, ServedDevice, StatusSocket, Wiring, DEFAULT_SOCKET};
use sd_notify::NotifyState;
use service::{LogFormat, NodeAccess};

/// Serve /dev/ioasid and /dev/vfio/devices/devN (the 2021 /dev/ioasid
/// proposal), and /dev/iommu and /dev/vfio/devices/vfioN (the kernel's
/// iommufd uAPI of Linux 7.1), over CUSE, on top of the legacy VFIO
/// container/group interface.
///
/// Needs root, the `cuse` module and devices bound to `vfio-pci`. Every
/// device bound to vfio-pci is served unless --device names some. Each
/// device gets two nodes, one per dialect: devN, numbered dev1, dev2, ...
/// in PCI address order, and vfioN, with the kernel's own N (the name in
/// /sys/bus/pci/devices/BDF/vfio-dev/), so that tools written for iommufd
/// find it. A device bound through one is busy for the other. `--list`
/// prints which node is which device; the daemon also logs the table at
/// start. Stop it
/// with SIGTERM or SIGINT: the nodes disappear and clients get ENODEV.
///
/// Under systemd (Type=notify) it sends READY=1 once every node exists and
/// STOPPING=1 when it receives a stop signal.
///
/// `cuse-ioasid status` asks the running daemon what it holds: clients,
/// their files, IOASIDs, mappings, pinned memory, bound devices, counters.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    after_long_help = "Shared memory a client maps for DMA (memfd, shm, hugetlbfs, a shared \
file or MAP_SHARED|MAP_ANONYMOUS) is reached through /proc/PID/map_files and pinned by the \
daemon. Private memory (the heap, stacks, MAP_PRIVATE) is pinned by the client's own thread: \
the daemon stops it with ptrace on its way out of the ioctl and has it issue the VFIO map \
itself (a client under a debugger, Yama scope 3, an LSM or a seccomp filter, or in another \
network namespace, gets EFAULT, and a daemon killed in the middle of it kills that client); \
--no-private-memory refuses private memory with EFAULT instead. Pinned memory is charged to \
the client's RLIMIT_MEMLOCK, once per process, together with what the kernel charges it \
(VmLck).\n\nThe RFC's uAPI (ioctl numbers, structs, errnos) is the C header \
uapi/include/linux/ioasid.h of the cuse-ioasid sources; the iommufd uAPI is the kernel's \
<linux/iommufd.h> (Linux 7.1) and the cdev part of <linux/vfio.h>. Both are explained, with \
every difference from the kernel, in docs/uapi.md there."
)]
struct Args {
    /// Serve only this device (PCI address such as 0000:00:03.0);
    /// repeatable. Default: every device bound to vfio-pci.
    #[arg(long = "device", value_name = "BDF")]
    devices: Vec<String>,

    /// Print the device nodes the daemon would create (node, PCI address,
    /// IOMMU group) and exit without serving.
    #[arg(long)]
    list: bool,

    /// Name of the ioasid node under /dev.
    #[arg(long, default_value = "ioasid", value_name = "NAME")]
    ioasid_name: String,

    /// Name of the iommufd node under /dev; the VFIO cdevs are
    /// /dev/vfio/devices/vfioN, the kernel's names.
    #[arg(long, default_value = "iommu", value_name = "NAME")]
    iommu_name: String,

    /// Device nodes are named PREFIX1, PREFIX2, ... under /dev.
    #[arg(long, default_value = "vfio/devices/dev", value_name = "PREFIX")]
    node_prefix: String,

    /// Permissions to give the nodes (octal, e.g. 0666). Default: 0660
    /// with --node-group, else the kernel's 0600, root only.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    node_mode: Option<u32>,

    /// Give the nodes to this group (name or number), mode 0660 unless
    /// --node-mode says otherwise: its members use the daemon without root.
    /// A Unix group only: unrelated to IOMMU groups. Each client's pinned
    /// memory is still charged to its own RLIMIT_MEMLOCK.
    #[arg(long, value_name = "GROUP")]
    node_group: Option<String>,

    /// Log filter (tracing-subscriber syntax, e.g. `debug` or
    /// `cuse_ioasid=debug,info`); RUST_LOG overrides it.
    /// `info,cuse_ioasid::requests=debug` adds one line per request (node,
    /// file, the process that opened it, command, result): what a program
    /// asks of the daemon.
    #[arg(long, default_value = "info", value_name = "FILTER")]
    log: String,

    /// Refuse private memory (MAP_PRIVATE, anonymous, heap, stack) with
    /// EFAULT instead of having the client's own thread pin it (which
    /// stops that thread with ptrace for the length of the map).
    #[arg(long)]
    no_private_memory: bool,

    /// Bound on pinning a client's private memory by its own thread, from
    /// the reply until the thread is put back; past it the map is given up
    /// (the client sees EFAULT).
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    inject_timeout_ms: u64,

    /// Open /dev/ioasid files one client process may hold (EMFILE past it).
    #[arg(long, default_value_t = Budgets::default().files, value_name = "N")]
    max_client_files: usize,

    /// IOASIDs one client process may hold over all its files (ENOSPC).
    #[arg(long, default_value_t = Budgets::default().ioasids, value_name = "N")]
    max_client_ioasids: usize,

    /// DMA mappings one client process may hold over all its IOASIDs
    /// (ENOSPC).
    #[arg(long, default_value_t = Budgets::default().mappings, value_name = "N")]
    max_client_mappings: usize,

    /// Areas of shared client memory the daemon maps into its own address
    /// space for one client process (ENOMEM past it). Each costs one of the
    /// daemon's vm.max_map_count (65530 by default): keep this times the
    /// number of clients below it.
    #[arg(long, default_value_t = Budgets::default().aliases, value_name = "N")]
    max_client_aliases: usize,

    /// How log lines are written to stderr.
    ///
    /// A thread of the daemon's own writes them, in order; the thread that
    /// logs a line waits for it at most 0.5 s. If stderr stalls (a pipe
    /// nobody reads, a stuck journal), requests go on being answered: lines
    /// wait in a 4 MiB queue, those beyond it are dropped, and a line says
    /// how many once stderr takes lines again.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, value_name = "FORMAT")]
    log_format: LogFormat,

    /// The status socket: the daemon answers `cuse-ioasid status` there
    /// (root's, mode 0600; with --node-group the group's, mode 0660).
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    status_socket: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Ask the running daemon what it holds, and print it.
    ///
    /// For each client process (pid, command name, RLIMIT_MEMLOCK): its
    /// open files; for an ioasid file its IOASIDs (mappings, bytes, attached
    /// devices, the IOMMU groups whose domain holds them), the bytes it
    /// pins and its bound devices. Then every device served (node, PCI
    /// address, IOMMU group, which file it is bound to), the daemon's
    /// requests per command, errors per errno, page-table walks and
    /// malformed tables, and the CUSE server's threads and calls per node.
    ///
    /// The daemon answers without waiting for any client's call: a file
    /// whose call is still running (a large map, a table walk) is shown
    /// busy, with the figures it had at its last look. Needs access to the
    /// status socket: root, or a member of the daemon's --node-group.
    Status {
        /// Print the daemon's answer as JSON (the same content).
        #[arg(long)]
        json: bool,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode"))
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    let format = service::init_logging(filter, args.log_format);
    if let Err(e) = run(args) {
        tracing::error!("{e:#}");
        if format != LogFormat::Journal {
            // Also without the log (`--log off`); the journal has it once.
            eprintln!("cuse-ioasid: {e:#}");
        }
        std::process::exit(1);
    }
}

/// The devices to serve, in node order.
fn select_devices(args: &Args) -> Result<Vec<PciDevice>> {
    let sysfs = Sysfs::default();
    let devices = if args.devices.is_empty() {
        sysfs
            .discover()
            .context("listing devices bound to vfio-pci")?
    } else {
        sysfs
            .devices(&args.devices)
            .context("looking up the devices given with --device")?
    };
    Ok(devices)
}

fn run(args: Args) -> Result<()> {
    if let Some(Command::Status { json }) = args.command {
        print!("{}", status::show(&args.status_socket, json)?);
        return Ok(());
    }
    // Before any thread: the allocator gives back what departed clients
    // leave (issue 17, item 4).
    cuse_ioasid::heap::configure();
    let access = NodeAccess::new(args.node_group.as_deref(), args.node_mode)?;
    let devices = select_devices(&args)?;
    let nodes: Vec<String> = (1..=devices.len())
        .map(|n| format!("{}{n}", args.node_prefix))
        .collect();
    let cdev_name = |d: &PciDevice| d.vfio_dev.as_ref().map(|n| format!("vfio/devices/{n}"));
    if args.list {
        println!(
            "{:<24} {:<14} {:>5}  {:<13}  iommufd cdev (with /dev/{})",
            "node", "PCI address", "group", "vendor:device", args.iommu_name
        );
        for (node, d) in nodes.iter().zip(&devices) {
            println!(
                "{:<24} {:<14} {:>5}  {:04x}:{:04x}      {}",
                format!("/dev/{node}"),
                d.bdf,
                d.group,
                d.vendor,
                d.device,
                cdev_name(d).map_or("-".to_string(), |n| format!("/dev/{n}"))
            );
        }
        return Ok(());
    }
    if devices.is_empty() {
        tracing::warn!(
            "no device is bound to vfio-pci: serving /dev/ioasid only (bind one with \
             `echo vfio-pci > /sys/bus/pci/devices/BDF/driver_override; \
             echo BDF > /sys/bus/pci/drivers_probe`)"
        );
    }

    // Block the stop signals in every thread (the mask is inherited by the
    // threads the server starts); one thread waits for them below.
    let mut stop_signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stop_signals.add(s);
    }
    stop_signals
        .thread_block()
        .context("blocking the stop signals")?;

    let groups: Vec<u32> = devices
        .iter()
        .map(|d| d.group)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let backend = Arc::new(VfioLegacy::new(&groups).context("setting up VFIO containers")?);
    let specs: Vec<DeviceSpec> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| DeviceSpec {
            id: DeviceId(i as u32 + 1),
            name: d.bdf.clone(),
            group: d.group,
        })
        .collect();
    let engine = Engine::new(backend.clone(), specs.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    engine.set_private_memory(!args.no_private_memory);
    engine.set_budgets(Budgets {
        files: args.max_client_files,
        ioasids: args.max_client_ioasids,
        mappings: args.max_client_mappings,
        aliases: args.max_client_aliases,
    });
    ioctl_table::set_inject_options(
        std::time::Duration::from_millis(args.inject_timeout_ms),
        false,
    );
    // A server thread never exits while it traces a client thread that
    // did not stop in time (its exit would kill that client).
    let node_config =
        |name: &str| DeviceConfig::new(name).keep_thread_while(syscall_inject::still_tracing);

    let server = Arc::new(Server::new().context("starting the CUSE server")?);
    let wiring = Wiring::default();
    let device_nodes = Arc::new(DeviceNodes::new(engine.clone(), backend.clone()));
    let hook_nodes = device_nodes.clone();
    let ioasid = server
        .register(
            node_config(&args.ioasid_name),
            wiring.ioasid_node(
                Arc::new(IoasidNode::new(
                    engine.clone(),
                    Box::new(move |closed| hook_nodes.on_context_closed(closed)),
                )),
                &format!("/dev/{}", args.ioasid_name),
            ),
        )
        .with_context(|| {
            format!(
                "registering /dev/{} (is the cuse module loaded?)",
                args.ioasid_name
            )
        })?;
    access.apply(&ioasid.path)?;
    tracing::info!(node = %ioasid.path.display(), dev = %ioasid.dev, "serving");

    device_nodes
        .set_ioasid_device(ioasid.dev)
        .map_err(|dev| anyhow::anyhow!("the ioasid device number was already set to {dev}"))?;

    let ats = specs
        .iter()
        .zip(&devices)
        .filter(|(_, d)| d.ats)
        .map(|(s, _)| s.id)
        .collect();
    let hook_nodes = device_nodes.clone();
    let iommu = server
        .register(
            node_config(&args.iommu_name),
            wiring.iommufd_node(
                Arc::new(IommufdNode::new(
                    engine.clone(),
                    ats,
                    Box::new(move |closed| hook_nodes.on_context_closed(closed)),
                )),
                &format!("/dev/{}", args.iommu_name),
            ),
        )
        .with_context(|| format!("registering /dev/{}", args.iommu_name))?;
    access.apply(&iommu.path)?;
    tracing::info!(node = %iommu.path.display(), dev = %iommu.dev, "serving (iommufd)");
    device_nodes
        .set_iommufd_device(iommu.dev)
        .map_err(|dev| anyhow::anyhow!("the iommufd device number was already set to {dev}"))?;
    for ((name, spec), dev) in nodes.iter().zip(&specs).zip(&devices) {
        let node = device_nodes
            .node(spec.id)
            .map_err(|e| anyhow::anyhow!("device node for {}: {e}", dev.bdf))?;
        let info = server
            .register(
                node_config(name),
                wiring.device_node(node, &format!("/dev/{name}"), &dev.bdf),
            )
            .with_context(|| format!("registering /dev/{name} for {}", dev.bdf))?;
        access.apply(&info.path)?;
        tracing::info!(
            node = %info.path.display(),
            device = %dev.bdf,
            group = dev.group,
            "serving {:04x}:{:04x}",
            dev.vendor,
            dev.device
        );
        let Some(cdev) = cdev_name(dev) else {
            tracing::warn!(
                device = %dev.bdf,
                "no /sys/bus/pci/devices/{}/vfio-dev entry: no iommufd cdev for it",
                dev.bdf
            );
            continue;
        };
        let node = device_nodes
            .cdev(spec.id, dev.sriov)
            .map_err(|e| anyhow::anyhow!("cdev node for {}: {e}", dev.bdf))?;
        let info = server
            .register(
                node_config(&cdev),
                wiring.cdev_node(node, &format!("/dev/{cdev}"), &dev.bdf),
            )
            .with_context(|| format!("registering /dev/{cdev} for {}", dev.bdf))?;
        access.apply(&info.path)?;
        tracing::info!(node = %info.path.display(), device = %dev.bdf, "serving (iommufd cdev)");
    }

    let served = nodes
        .iter()
        .zip(&specs)
        .map(|(name, spec)| ServedDevice {
            id: spec.id,
            pci: spec.name.clone(),
            node: format!("/dev/{name}"),
            group: spec.group,
        })
        .collect();
    let mut status_socket = StatusSocket::bind(&args.status_socket, access.group)?;
    status_socket.serve(Arc::new(wiring.sources(
        engine.clone(),
        backend.clone(),
        served,
        server.clone(),
    )))?;
    tracing::info!(socket = %status_socket.path().display(), "answering `cuse-ioasid status`");

    service::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!(
            "serving /dev/{}, /dev/{} and {} device(s)",
            args.ioasid_name,
            args.iommu_name,
            devices.len()
        )),
    ]);

    let stop = server.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || match stop_signals.wait() {
            Ok(sig) => {
                tracing::info!("{sig}: stopping");
                service::notify(&[NotifyState::Stopping]);
                stop.stop();
            }
            Err(e) => {
                tracing::error!("waiting for signals failed: {e}; stopping");
                service::notify(&[NotifyState::Stopping]);
                stop.stop();
            }
        })
        .context("starting the signal thread")?;

    server.wait();
    drop(status_socket);
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::CommandFactory;

    /// `page` must be `docs/man/NAME.8` (rewritten with `UPDATE_MAN=1`).
    fn check_page(cmd: clap::Command, name: &'static str) {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.name(name))
            .section("8")
            .render(&mut page)
            .expect("render the man page");
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../docs/man/{name}.8"));
        if std::env::var_os("UPDATE_MAN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &page).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == page,
            "{} is out of date: run `UPDATE_MAN=1 cargo test -p cuse-ioasid man_page`",
            path.display()
        );
    }

    /// The man pages `docs/man/cuse-ioasid.8` and `cuse-ioasid-status.8`
    /// are rendered from the same definitions as `--help` and `status
    /// --help`, so they cannot drift apart. Run with `UPDATE_MAN=1` to
    /// rewrite them after changing an option.
    #[test]
    fn man_page_matches_the_options() {
        let mut cmd = Args::command().name("cuse-ioasid");
        cmd.build();
        let status = cmd
            .find_subcommand("status")
            .expect("the status subcommand")
            .clone();
        check_page(cmd, "cuse-ioasid");
        check_page(status, "cuse-ioasid-status");
    }
}
