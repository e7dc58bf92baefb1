//! `cr-ebpf dump`: a full checkpoint of a live process.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use cr_ebpf_checkpoint::{dump, DumpOptions};

/// Options of `cr-ebpf dump`.
#[derive(clap::Args)]
pub struct Args {
    /// Process to checkpoint.
    #[arg(long)]
    pub pid: i32,
    /// New directory to write the image into (must not exist).
    #[arg(long)]
    pub images_dir: PathBuf,
    /// Resume the process afterwards instead of killing it.
    #[arg(long)]
    pub leave_running: bool,
    /// Threads reading and compressing memory (default: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::args::threads)]
    pub threads: usize,
    /// Take a shell job: a process whose controlling terminal and session
    /// are its shell's (outside what is checkpointed). Without this it is
    /// refused. Its image then needs `restore --shell-job`, which puts it
    /// in the restorer's session and gives its terminal descriptors the
    /// restorer's terminal.
    #[arg(long)]
    pub shell_job: bool,
    /// Most bytes of a deleted file the process holds open or mapped that
    /// are stored in the image (its allocated size; holes are free); a
    /// larger one is refused. Suffixes K, M, G.
    #[arg(long, default_value = "64M", value_parser = crate::args::size)]
    pub ghost_limit: u64,
    /// Most bytes of one shared memory object (shared anonymous memory,
    /// memfd, System V segment, file in /dev/shm) stored: its allocated
    /// size, read into memory while the process is frozen; a larger one is
    /// refused. Suffixes K, M, G.
    #[arg(long, default_value = "4G", value_parser = crate::args::size)]
    pub shm_limit: u64,
    /// How the TCP connections of a process that is not left running are
    /// held until its restore: `bpf` (an eBPF classifier pinned in bpffs:
    /// a peer that sends meanwhile waits), `skip` (no lock: such a peer
    /// gets a reset, as with `criu --network-lock skip`).
    #[arg(long, default_value = "bpf", value_parser = ["bpf", "skip"])]
    pub network_lock: String,
    /// Take unix stream connections to named sockets outside what is
    /// checkpointed (a service's stdout to journald, a client of a local
    /// daemon): at restore each is connected to the same name again, a
    /// new connection to its peer (which sees the old one end, and cr-ebpf
    /// as the new one's peer credentials). Refused without this, as is one
    /// with bytes from its peer not read yet.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Most time the process may stay frozen before its image is
    /// published (`30s`, `5m`): past it the dump gives up, saying what it
    /// was stuck on, and the process runs on (exit status 1).
    #[arg(long, default_value = "60s", value_parser = crate::args::parse_duration)]
    pub freeze_limit: std::time::Duration,
    /// Read every page while the process is frozen. By default the pages
    /// are copied into the image while it runs first (a write tracker says
    /// which were written after their copy: only those are read while
    /// frozen, and patched into the image after), which makes the freeze
    /// short and lets the disk write while the process still runs; the
    /// copies are made in a private directory next to the image's
    /// (`.NAME.tmp-PID-precopy`), removed by the dump.
    #[arg(long)]
    pub no_precopy: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let opts = DumpOptions {
        leave_running: args.leave_running,
        threads: args.threads,
        shell_job: args.shell_job,
        ghost_limit: args.ghost_limit,
        shm_limit: args.shm_limit,
        network_lock: (args.network_lock == "bpf")
            .then(|| std::sync::Arc::new(crate::netlock::BpfLock) as _),
        ext_unix_sk: args.ext_unix_sk,
        freeze_limit: Some(args.freeze_limit).filter(|l| !l.is_zero()),
        no_precopy: args.no_precopy,
    };
    let bar = crate::progress::Bar::start(!args.json);
    let r = dump(args.pid, &args.images_dir, &opts)
        .with_context(|| format!("checkpointing process {}", args.pid));
    drop(bar);
    let r = r?;
    // What the image takes on disk, every file of it (as `track`,
    // `snapshot`, `compact` and `inspect` give it).
    let size = cr_ebpf_image::images_dir::size_on_disk(&args.images_dir);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "pid": r.pid,
                "images_dir": args.images_dir,
                "threads": r.threads,
                "mappings": r.mappings,
                "pages": r.pages,
                "bytes": r.page_bytes,
                "size_bytes": size,
                "freeze_ms": r.freeze.as_secs_f64() * 1e3,
                "stopped_ms": r.stopped.as_secs_f64() * 1e3,
                "precopied_pages": r.precopied,
                "precopy_passes": r.precopy_passes,
                "precopy_ms": r.precopy.as_secs_f64() * 1e3,
                "total_ms": r.total.as_secs_f64() * 1e3,
                "gb_per_s": r.gb_per_s(),
                "workers": r.workers,
                "left_running": args.leave_running,
                "network_lock": r.network_lock,
            })
        );
    } else {
        println!(
            "checkpointed pid {} into {}: {} thread(s), {} mappings, {} pages ({:.1} MiB), {} on disk; \
             freeze {:.2} ms (stopped {:.1} ms), total {:.1} ms ({:.2} GB/s, {} workers); \
             {} pages pre-copied in {:.1} ms ({} passes); process {}",
            r.pid,
            args.images_dir.display(),
            r.threads,
            r.mappings,
            r.pages,
            r.pages as f64 * 4096.0 / (1 << 20) as f64,
            on_disk(size),
            r.freeze.as_secs_f64() * 1e3,
            r.stopped.as_secs_f64() * 1e3,
            r.total.as_secs_f64() * 1e3,
            r.gb_per_s(),
            r.workers,
            r.precopied,
            r.precopy.as_secs_f64() * 1e3,
            r.precopy_passes,
            if args.leave_running { "left running" } else { "killed" }
        );
        if let Some(name) = &r.network_lock {
            println!(
                "its TCP connections are locked until the restore (network lock {name}; \
                 `cr-ebpf unlock --images-dir {}` lets them go)",
                args.images_dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A size on disk for people: KiB under a MiB, MiB under a GiB, GiB.
pub fn on_disk(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..0x10_0000 => format!("{:.1} KiB", b / 1024.0),
        0x10_0000..0x4000_0000 => format!("{:.1} MiB", b / f64::from(1 << 20)),
        _ => format!("{:.2} GiB", b / f64::from(1 << 30)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_on_disk_read_in_their_unit() {
        assert_eq!(super::on_disk(22_058), "21.5 KiB");
        assert_eq!(super::on_disk(3 << 20), "3.0 MiB");
        assert_eq!(super::on_disk(5 << 30), "5.00 GiB");
    }
}
