//! What the daemon does for the service manager around it: logs a journal
//! can hold, readiness and stop notifications (`sd_notify`), and the owner
//! and mode of the device nodes.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{Gid, Group};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, Format, Full, Writer};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::log_writer::LogWriter;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `journal` when stderr is the journal stream systemd announced in
    /// JOURNAL_STREAM, otherwise `text`.
    Auto,
    /// Time, level, target and fields; colours only when stderr is a terminal.
    Text,
    /// One line per event, led by its syslog priority (`<3>` error, `<4>`
    /// warning, `<6>` info, `<7>` debug and trace), no time (the journal
    /// adds it), no colours; line breaks inside an event are written `\n`.
    Journal,
}

impl LogFormat {
    /// `Auto` decided for this process's stderr.
    pub fn resolve(self) -> LogFormat {
        match self {
            LogFormat::Auto => {
                let journal = std::env::var("JOURNAL_STREAM")
                    .is_ok_and(|v| journal_stream_is(&v, std::io::stderr().as_fd()));
                if journal {
                    LogFormat::Journal
                } else {
                    LogFormat::Text
                }
            }
            other => other,
        }
    }
}

/// Installs the global log subscriber writing to stderr through a
/// [`LogWriter`] (a stalled stderr holds no request up); returns the format
/// chosen (never `Auto`).
pub fn init_logging(filter: EnvFilter, format: LogFormat) -> LogFormat {
    let format = format.resolve();
    let prefix = if format == LogFormat::Journal {
        "<4>"
    } else {
        ""
    };
    let writer = match LogWriter::stderr(prefix) {
        Ok(w) => BoxMakeWriter::new(w),
        Err(e) => {
            eprintln!(
                "cuse-ioasid: cannot start the log writer thread ({e}); logging straight to \
                 stderr, where a stalled stderr holds up every request that logs"
            );
            BoxMakeWriter::new(std::io::stderr)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Journal => builder
            .with_ansi(false)
            .event_format(JournalFormat::default())
            .init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    format
}

/// Whether `value` (JOURNAL_STREAM's `DEVICE:INODE`, in decimal) names the
/// file open on `fd`. systemd sets the variable when it connects stdout or
/// stderr to the journal; a child whose stderr was redirected inherits the
/// variable but not the stream, hence the comparison.
pub fn journal_stream_is(value: &str, fd: BorrowedFd<'_>) -> bool {
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(fd) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The priority prefix sd-daemon(3) defines for a line on a journal stream.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// tracing-subscriber's full format without time, level and colours, led
/// by the syslog priority and kept on one line.
pub struct JournalFormat {
    inner: Format<Full, ()>,
}

impl Default for JournalFormat {
    fn default() -> Self {
        JournalFormat {
            inner: format::format()
                .without_time()
                .with_level(false)
                .with_ansi(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        writer.write_str(&line.trim_end_matches('\n').replace('\n', "\\n"))?;
        writer.write_char('\n')
    }
}

/// Tells the service manager (`NOTIFY_SOCKET`) about a state change; does
/// nothing when the daemon was not started by one. A failure is logged, not
/// fatal: the daemon serves its nodes either way.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(
            "telling the service manager {:?} failed: {e} (NOTIFY_SOCKET={:?})",
            states
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            std::env::var_os("NOTIFY_SOCKET").unwrap_or_default()
        );
    }
}

/// Owner group and mode given to every node the daemon creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAccess {
    /// Group to own the nodes (`--node-group`); `None` leaves root's.
    pub group: Option<Gid>,
    /// Mode to set; `None` leaves the kernel's 0600.
    pub mode: Option<u32>,
}

impl NodeAccess {
    /// From `--node-group` (a name or a numeric gid) and `--node-mode`. A
    /// group without a mode gives 0660: owner and group read and write.
    pub fn new(group: Option<&str>, mode: Option<u32>) -> Result<NodeAccess> {
        let group = group.map(lookup_group).transpose()?;
        let mode = mode.or(group.map(|_| 0o660));
        if let (Some(gid), Some(mode)) = (group, mode) {
            if mode & 0o060 == 0 {
                tracing::warn!(
                    "--node-mode {mode:04o} gives group {gid} no access to the nodes; \
                     0660 would let its members open them"
                );
            }
        }
        Ok(NodeAccess { group, mode })
    }

    /// Gives `path` (a node just created) the group and mode.
    pub fn apply(&self, path: &Path) -> Result<()> {
        if self.group.is_none() && self.mode.is_none() {
            return Ok(());
        }
        if !path.exists() {
            bail!("{} did not appear", path.display());
        }
        if let Some(gid) = self.group {
            nix::unistd::chown(path, None, Some(gid)).with_context(|| {
                format!(
                    "chown :{gid} {} (changing a node's group needs CAP_CHOWN)",
                    path.display()
                )
            })?;
        }
        if let Some(mode) = self.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        }
        Ok(())
    }
}

/// A group by name, or by number if it is all digits.
fn lookup_group(name: &str) -> Result<Gid> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        let gid: u32 = name
            .parse()
            .map_err(|_| anyhow!("--node-group {name}: not a valid group id"))?;
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => bail!(
            "--node-group {name:?}: no such group (create it with `groupadd --system {name}`, \
             or name an existing one such as kvm)"
        ),
        Err(e) => bail!("--node-group {name:?}: looking the group up failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A log sink the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_every_level() {
        let span = tracing::info_span!("node", name = "ioasid");
        let _entered = span.enter();
        tracing::error!(errno = 14, "map failed:\nthe memory is private");
        tracing::warn!("warned");
        tracing::info!(device = "0000:00:0a.0", "serving");
        tracing::debug!("detail");
        tracing::trace!("more detail");
    }

    /// What `log_every_level` writes, in the journal format or in text.
    fn captured(journal: bool) -> String {
        let sink = Sink::default();
        let writer = sink.clone();
        let builder = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone());
        if journal {
            let subscriber = builder.event_format(JournalFormat::default()).finish();
            tracing::subscriber::with_default(subscriber, log_every_level);
        } else {
            tracing::subscriber::with_default(builder.finish(), log_every_level);
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn journal_format_is_one_line_per_event_led_by_its_priority() {
        let text = captured(true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "one line per event:\n{text}");
        let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"]);
        assert_eq!(
            lines[0],
            "<3>node{name=\"ioasid\"}: cuse_ioasid::service::tests: \
             map failed:\\nthe memory is private errno=14"
        );
        assert!(lines[2].ends_with("serving device=\"0000:00:0a.0\""));
        assert!(!text.contains('\x1b'), "no escape codes:\n{text:?}");
    }

    #[test]
    fn text_format_without_a_terminal_has_no_escape_codes() {
        let text = captured(false);
        assert!(text.contains("ERROR") && text.contains("serving"), "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    #[test]
    fn journal_stream_must_name_the_open_file() {
        let file = tempfile();
        let st = nix::sys::stat::fstat(file.as_fd()).unwrap();
        let other = tempfile();
        let value = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(journal_stream_is(&value, file.as_fd()));
        assert!(!journal_stream_is(&value, other.as_fd()));
        assert!(!journal_stream_is("", file.as_fd()));
        assert!(!journal_stream_is(&format!("{}", st.st_dev), file.as_fd()));
        assert!(!journal_stream_is("x:1", file.as_fd()));
    }

    fn tempfile() -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "cuse-ioasid-service-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::File::create_new(&path)
            .or_else(|_| {
                std::fs::remove_file(&path)?;
                std::fs::File::create_new(&path)
            })
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn node_group_defaults_the_mode_to_0660() {
        let root = NodeAccess::new(Some("0"), None).unwrap();
        assert_eq!(root.group, Some(Gid::from_raw(0)));
        assert_eq!(root.mode, Some(0o660));
        let explicit = NodeAccess::new(Some("0"), Some(0o640)).unwrap();
        assert_eq!(explicit.mode, Some(0o640));
        let mode_only = NodeAccess::new(None, Some(0o666)).unwrap();
        assert_eq!(
            mode_only,
            NodeAccess {
                group: None,
                mode: Some(0o666)
            }
        );
        assert_eq!(
            NodeAccess::new(None, None).unwrap(),
            NodeAccess {
                group: None,
                mode: None
            }
        );
    }

    #[test]
    fn node_group_by_name_and_unknown_names() {
        // Every Debian system has group "root" with gid 0.
        let by_name = NodeAccess::new(Some("root"), None).unwrap();
        assert_eq!(by_name.group, Some(Gid::from_raw(0)));
        let err = NodeAccess::new(Some("no-such-group-cuse-ioasid"), None).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("no such group"), "{msg}");
        assert!(msg.contains("groupadd --system"), "{msg}");
    }

    #[test]
    fn apply_sets_group_and_mode() {
        let dir = std::env::temp_dir().join(format!("cuse-ioasid-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node");
        std::fs::write(&path, b"").unwrap();
        let own_gid = nix::unistd::getegid();
        let access = NodeAccess::new(Some(&own_gid.as_raw().to_string()), None).unwrap();
        access.apply(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.gid(), own_gid.as_raw());
        assert_eq!(meta.mode() & 0o7777, 0o660);
        let missing = access.apply(&dir.join("gone")).unwrap_err();
        assert!(format!("{missing}").contains("did not appear"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
