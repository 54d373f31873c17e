//! The text form of a [`Status`] (what `cuse-ioasid status` prints
//! without `--json`).

use std::fmt::Write;

use super::model::*;

/// `n` in the largest binary unit that divides it exactly (`12 KiB`,
/// `4097 B`), so no figure is rounded.
pub fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        if n >= size && n % size == 0 {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

/// `n` rounded for a figure that moves anyway (the daemon's own memory):
/// `5.2 MiB`, `300 KiB`.
fn rounded(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..0x10_0000 => format!("{} KiB", n / 1024),
        _ => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
    }
}

fn limit(l: Limit) -> String {
    match l {
        Limit::Bytes(n) => bytes(n),
        Limit::Unlimited => "unlimited".into(),
        Limit::Unknown => "unknown".into(),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// The whole status as text.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let d = &s.daemon;
    let _ = writeln!(
        out,
        "cuse-ioasid {}, pid {}, serving for {}",
        d.version,
        d.pid,
        duration(d.uptime_s)
    );
    let m = &d.memory;
    let _ = writeln!(
        out,
        "memory: {} resident, heap {} in use and {} freed but kept ({} given back so far)",
        rounded(m.rss_bytes),
        rounded(m.heap_in_use_bytes),
        rounded(m.heap_free_bytes),
        m.give_backs
    );
    let _ = writeln!(out);
    if s.processes.is_empty() {
        let _ = writeln!(out, "clients: none");
    }
    for p in &s.processes {
        render_process(&mut out, p);
    }
    let _ = writeln!(out);
    render_devices(&mut out, &s.devices);
    let _ = writeln!(out);
    render_counters(&mut out, &s.counters);
    let _ = writeln!(out);
    render_cuse(&mut out, &s.cuse);
    out
}

fn render_process(out: &mut String, p: &Process) {
    let command = if p.command.is_empty() {
        "exited".to_string()
    } else {
        p.command.clone()
    };
    let _ = write!(
        out,
        "client {} ({command}): RLIMIT_MEMLOCK {}",
        p.pid,
        limit(p.memlock_limit)
    );
    if let Some(pinned) = p.pinned_bytes {
        let _ = write!(out, ", {} pinned", bytes(pinned));
    }
    let _ = writeln!(out);
    for f in &p.files {
        render_file(out, f, p.memlock_limit);
    }
}

fn render_file(out: &mut String, f: &OpenFile, memlock: Limit) {
    let _ = write!(out, "  {} (file {})", f.node, f.handle);
    if let Some(pci) = &f.device {
        let _ = write!(out, ": device {pci}");
    }
    if f.busy {
        match f.memory {
            Some(_) => {
                let _ = write!(
                    out,
                    " [busy: a call is running; figures from {} ms ago]",
                    f.age_ms
                );
            }
            None => {
                let _ = write!(out, " [busy: a call is running; no figures yet]");
            }
        }
    }
    if let Some(m) = &f.memory {
        let _ = write!(
            out,
            ": {} pinned of {}",
            bytes(m.pinned_bytes),
            limit(memlock)
        );
        if m.registrations > 0 {
            let _ = write!(
                out,
                " ({} registered in {})",
                bytes(m.registered_bytes),
                plural(m.registrations as u64, "registration", "registrations")
            );
        }
    }
    let _ = writeln!(out);
    for o in &f.objects {
        let _ = write!(out, "    {} {}", o.kind, o.id);
        if let Some(parent) = o.parent {
            let _ = write!(out, " (child of {parent})");
        }
        let _ = write!(
            out,
            ": {}, {}",
            plural(o.mappings, "mapping", "mappings"),
            bytes(o.mapped_bytes)
        );
        if !o.attached.is_empty() {
            let _ = write!(out, "; attached: {}", o.attached.join(", "));
        }
        if !o.groups.is_empty() {
            let groups: Vec<String> = o.groups.iter().map(u32::to_string).collect();
            let _ = write!(out, "; in the domain of group {}", groups.join(", "));
        }
        let _ = writeln!(out);
        for n in &o.notes {
            let _ = writeln!(out, "      {n}");
        }
    }
    for d in &f.devices {
        let _ = write!(
            out,
            "    device {} ({}, group {}): ",
            d.pci, d.node, d.group
        );
        if d.attached.is_empty() {
            let _ = writeln!(out, "bound, not attached");
        } else {
            let _ = writeln!(out, "attached to {}", d.attached.join(", "));
        }
    }
    if f.groups_out_of_service > 0 {
        let _ = writeln!(
            out,
            "    {} out of service (an undo failed; see the log)",
            plural(
                f.groups_out_of_service as u64,
                "IOMMU group",
                "IOMMU groups"
            )
        );
    }
}

fn render_devices(out: &mut String, devices: &[Device]) {
    let _ = writeln!(out, "devices:");
    if devices.is_empty() {
        let _ = writeln!(
            out,
            "  none (no device bound to vfio-pci was given to the daemon)"
        );
        return;
    }
    let _ = writeln!(
        out,
        "  {:<26} {:<14} {:>5}  bound to",
        "node", "PCI address", "group"
    );
    for d in devices {
        let owner = match &d.bound_to {
            None => "-".to_string(),
            Some(f) => format!(
                "client {}, {} (file {})",
                f.pid.map_or("?".into(), |p| p.to_string()),
                f.node,
                f.handle
            ),
        };
        let _ = writeln!(
            out,
            "  {:<26} {:<14} {:>5}  {owner}",
            d.node, d.pci, d.group
        );
    }
}

fn render_counters(out: &mut String, c: &Counters) {
    let _ = writeln!(out, "requests:");
    if c.requests.is_empty() {
        let _ = writeln!(out, "  none");
    } else {
        let _ = writeln!(
            out,
            "  {:<8} {:<34} {:>10} {:>8}",
            "node", "command", "calls", "failed"
        );
        for r in &c.requests {
            let _ = writeln!(
                out,
                "  {:<8} {:<34} {:>10} {:>8}",
                r.kind, r.command, r.calls, r.failed
            );
        }
    }
    let errors: Vec<String> = c.errors.iter().map(|(e, n)| format!("{e} {n}")).collect();
    let _ = writeln!(
        out,
        "errors: {}",
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        }
    );
    let w = &c.walks;
    let _ = writeln!(
        out,
        "page-table walks: {}; malformed tables: {} ({} malformed entries); cut short by the budget: {}",
        w.walks, w.malformed_tables, w.malformed_entries, w.truncated
    );
}

fn render_cuse(out: &mut String, nodes: &[NodeCalls]) {
    let _ = writeln!(out, "CUSE server:");
    let _ = writeln!(
        out,
        "  {:<26} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "node", "threads", "spawned", "running", "waiting", "refused"
    );
    for n in nodes {
        let _ = writeln!(
            out,
            "  {:<26} {:>7} {:>7} {:>7} {:>7} {:>7}",
            n.node, n.threads, n.spawned, n.running, n.waiting, n.refused
        );
    }
}
