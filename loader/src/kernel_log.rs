//! Forwards `aya-log` records from the eBPF programs to `tracing`.

use aya::Ebpf;
use aya_log::EbpfLogger;

/// Target under which kernel-side log records appear.
pub const TARGET: &str = "cr_ebpf::kernel";

struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{msg}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{msg}"),
            log::Level::Info => tracing::info!(target: TARGET, "{msg}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{msg}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Reads the programs' log ring buffer.
pub struct KernelLogger(EbpfLogger<ToTracingBox>);

type ToTracingBox = &'static dyn log::Log;

static FORWARDER: ToTracing = ToTracing;

impl KernelLogger {
    /// Takes the log map of `ebpf`; `None` when the object has no log statements.
    pub fn init(ebpf: &mut Ebpf) -> Option<Self> {
        match EbpfLogger::init_with_logger(ebpf, &FORWARDER as &'static dyn log::Log) {
            Ok(l) => Some(Self(l)),
            Err(e) => {
                tracing::debug!("no kernel-side log: {e}");
                None
            }
        }
    }

    /// Forwards every pending record.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}
