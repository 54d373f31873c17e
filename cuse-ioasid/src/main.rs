//! `cuse-ioasid`: serve the 2021 `/dev/ioasid` uAPI proposal from user space.
//!
//! Registers `/dev/ioasid` and one `/dev/vfio/devices/devN` per VFIO device
//! with CUSE and realises the I/O address spaces on legacy VFIO containers.

mod service;

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use cuse_server::{DeviceConfig, Server};
use cuse_vfio_devices::DeviceNodes;
use ioasid_engine::{Budgets, DeviceId, DeviceSpec, Engine};
use nix::sys::signal::{SigSet, Signal};
use vfio_legacy::{PciDevice, Sysfs, VfioLegacy};

use cuse_ioasid::node::IoasidNode;
use sd_notify::NotifyState;
use service::{LogFormat, NodeAccess};

/// Serve /dev/ioasid and /dev/vfio/devices/devN over CUSE, on top of the
/// legacy VFIO container/group interface.
///
/// Needs root, the `cuse` module and devices bound to `vfio-pci`. Every
/// device bound to vfio-pci is served unless --device names some; the nodes
/// are numbered dev1, dev2, ... in PCI address order. `--list` prints which
/// node is which device; the daemon also logs the table at start. Stop it
/// with SIGTERM or SIGINT: the nodes disappear and clients get ENODEV.
///
/// Under systemd (Type=notify) it sends READY=1 once every node exists and
/// STOPPING=1 when it receives a stop signal.
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
--no-private-memory refuses private memory with EFAULT instead. Pinned memory is charged to the client's RLIMIT_MEMLOCK, once per \
process, together with what the kernel charges it (VmLck).\n\nThe uAPI (ioctl numbers, structs, errnos) is the C header \
uapi/include/linux/ioasid.h of the cuse-ioasid sources, explained in docs/uapi.md there."
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
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, value_name = "FORMAT")]
    log_format: LogFormat,
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
    let access = NodeAccess::new(args.node_group.as_deref(), args.node_mode)?;
    let devices = select_devices(&args)?;
    let nodes: Vec<String> = (1..=devices.len())
        .map(|n| format!("{}{n}", args.node_prefix))
        .collect();
    if args.list {
        println!(
            "{:<24} {:<14} {:>5}  vendor:device",
            "node", "PCI address", "group"
        );
        for (node, d) in nodes.iter().zip(&devices) {
            println!(
                "{:<24} {:<14} {:>5}  {:04x}:{:04x}",
                format!("/dev/{node}"),
                d.bdf,
                d.group,
                d.vendor,
                d.device
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

    let server = Server::new().context("starting the CUSE server")?;
    let device_nodes = Arc::new(DeviceNodes::new(engine.clone(), backend.clone()));
    let hook_nodes = device_nodes.clone();
    let ioasid = server
        .register(
            node_config(&args.ioasid_name),
            Arc::new(IoasidNode::new(
                engine.clone(),
                Box::new(move |closed| hook_nodes.on_context_closed(closed)),
            )),
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
    for ((name, spec), dev) in nodes.iter().zip(&specs).zip(&devices) {
        let node = device_nodes
            .node(spec.id)
            .map_err(|e| anyhow::anyhow!("device node for {}: {e}", dev.bdf))?;
        let info = server
            .register(node_config(name), node)
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
    }

    service::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!(
            "serving /dev/{} and {} device node(s)",
            args.ioasid_name,
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
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::CommandFactory;

    /// The man page `docs/man/cuse-ioasid.8` is rendered from the same
    /// definitions as `--help`, so the two cannot drift apart. Run with
    /// `UPDATE_MAN=1` to rewrite it after changing an option.
    #[test]
    fn man_page_matches_the_options() {
        let mut page = Vec::new();
        clap_mangen::Man::new(Args::command().name("cuse-ioasid"))
            .section("8")
            .render(&mut page)
            .expect("render the man page");
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/man/cuse-ioasid.8");
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
}
