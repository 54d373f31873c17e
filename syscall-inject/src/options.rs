//! What the caller chooses about an injection.

use std::time::Duration;

/// How an injection behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest time from [`Seized::wait_stop`] to [`Stopped::finish`]:
    /// every wait of one injection shares it. Default 5 s.
    pub timeout: Duration,
    /// Inject into a thread that runs under a seccomp filter. Off by
    /// default: a filter can kill the process for a call it does not
    /// expect, or raise a SIGSYS whose disposition the kernel then resets
    /// (`force_sig_info_to_task`), neither of which can be undone. When
    /// on, an `ENOSYS` or `EPERM` from an injected call is the caller's
    /// sign that a filter refused it ([`Error::Blocked`]).
    pub allow_seccomp_filter: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(5),
            allow_seccomp_filter: false,
        }
    }
}
