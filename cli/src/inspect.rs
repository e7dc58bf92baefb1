//! `cr-ebpf inspect`: what an image holds.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use cr_ebpf_image::{pages, FdInfo, FdState, Manifest, SocketInfo};

/// Options of `cr-ebpf inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// An image directory, or an images directory of checkpoints.
    pub dir: PathBuf,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    // `inspect DIR | head`: a reader that stops early ends us quietly, as
    // it does any filter (inspect only reads; nothing is left half done).
    // SAFETY: restoring a signal's default action.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if !cr_ebpf_image::images_dir::is_image(&args.dir) {
        return chain(args);
    }
    if cr_ebpf_image::tree::is_tree(&args.dir) {
        return tree(args);
    }
    let m = Manifest::read(&args.dir).with_context(|| format!("reading {}", args.dir.display()))?;
    // Every byte checked, not only what a restore would use.
    let bar = checking(!args.json, [args.dir.as_path()]);
    let store = pages::PageStore::open(&args.dir)
        .and_then(|s| s.verify().map(|()| s))
        .with_context(|| format!("reading {}", args.dir.display()));
    drop(bar);
    let store = store?;
    let chunks = store.chunks();
    let stored = store.pages();
    let compressed = store.compressed_bytes();
    let p = &m.process;
    if args.json {
        let mappings: Vec<_> = m
            .mappings
            .iter()
            .map(|x| {
                serde_json::json!({
                    "start": format!("{:#x}", x.start), "end": format!("{:#x}", x.end),
                    "prot": x.prot, "flags": x.flags, "offset": x.offset,
                    "kind": format!("{:?}", x.kind), "path": x.path,
                    "inode": x.inode, "pages_stored": x.pages_stored,
                })
            })
            .collect();
        let threads: Vec<_> = m
            .threads
            .iter()
            .map(|t| serde_json::json!({"tid": t.tid, "sigmask": format!("{:#x}", t.sigmask), "xstate_bytes": t.xstate.len()}))
            .collect();
        let fds: Vec<_> = m
            .fds
            .iter()
            .map(|f| serde_json::json!({"fd": f.fd, "kind": format!("{:?}", f.kind), "path": f.path, "what": describe(f)}))
            .collect();
        let shmem = shmem_json(&m, chunks);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "format": format!("{}.{}", cr_ebpf_image::FORMAT_MAJOR, cr_ebpf_image::FORMAT_MINOR),
                "pid": p.pid, "exe": p.exe, "taken_unix_ns": p.taken_unix_ns,
                "freeze_ms": p.freeze_ns as f64 / 1e6,
                "threads": threads, "mappings": mappings, "fds": fds, "shared_memory": shmem,
                "pages_stored": stored, "compressed_bytes": compressed, "chunks": chunks.len(),
                "bytes": pages::bytes_on_disk(&args.dir),
                "size_bytes": cr_ebpf_image::images_dir::size_on_disk(&args.dir),
                "network_lock": m.network_lock.as_ref().map(|n| serde_json::json!({
                    "name": n, "held": cr_ebpf_loader::netlock::exists(n),
                })),
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "image {} (format {}.{})",
        args.dir.display(),
        cr_ebpf_image::FORMAT_MAJOR,
        cr_ebpf_image::FORMAT_MINOR
    );
    println!(
        "  process {} ({}), freeze {:.2} ms",
        p.pid,
        p.exe,
        p.freeze_ns as f64 / 1e6
    );
    println!(
        "  pages: {stored} stored ({:.1} MiB) in {} chunks, {:.1} MiB compressed; {} on disk",
        stored as f64 * 4096.0 / (1 << 20) as f64,
        chunks.len(),
        compressed as f64 / (1 << 20) as f64,
        crate::dump::on_disk(cr_ebpf_image::images_dir::size_on_disk(&args.dir))
    );
    if let Some(name) = &m.network_lock {
        println!(
            "  network lock: {name} ({})",
            if cr_ebpf_loader::netlock::exists(name) {
                "holding its TCP connections until the restore"
            } else {
                "gone: removed by a restore or `cr-ebpf unlock`, or the machine restarted"
            }
        );
    }
    println!("  threads:");
    for t in &m.threads {
        println!(
            "    {} (signal mask {:#x}, {} bytes of FPU state)",
            t.tid,
            t.sigmask,
            t.xstate.len()
        );
    }
    println!("  mappings:");
    for x in &m.mappings {
        let prot = format!(
            "{}{}{}",
            if x.prot & 1 != 0 { 'r' } else { '-' },
            if x.prot & 2 != 0 { 'w' } else { '-' },
            if x.prot & 4 != 0 { 'x' } else { '-' }
        );
        println!(
            "    {:#014x}-{:#014x} {prot} {:<6} {:>6} pages stored  {}",
            x.start,
            x.end,
            format!("{:?}", x.kind),
            x.pages_stored,
            x.path
        );
    }
    print_shmem(&m, chunks);
    println!("  descriptors:");
    for f in &m.fds {
        println!(
            "    {:>4} {:<10} {}",
            f.fd,
            format!("{:?}", f.kind),
            describe(f)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line on what a descriptor holds.
fn describe(f: &FdInfo) -> String {
    match &f.state {
        FdState::None if f.kind == cr_ebpf_image::FdKind::Inherited => format!(
            "{} (connected outside: a restore gives the restorer's own descriptor {})",
            f.path, f.fd
        ),
        FdState::None => f.path.clone(),
        FdState::Epoll(items) => {
            let fds: Vec<String> = items.iter().map(|i| i.fd.to_string()).collect();
            format!("epoll set of {} [{}]", items.len(), fds.join(" "))
        }
        FdState::EventFd { count, semaphore } => {
            format!(
                "eventfd count {count}{}",
                if *semaphore { " (semaphore)" } else { "" }
            )
        }
        FdState::TimerFd {
            clockid,
            value_ns,
            interval_ns,
            ..
        } => format!(
            "timerfd clock {clockid}, {:.3} s left, every {:.3} s",
            *value_ns as f64 / 1e9,
            *interval_ns as f64 / 1e9
        ),
        FdState::SignalFd { mask } => format!("signalfd mask {mask:#x}"),
        FdState::Pidfd { pid } => format!("pidfd of process {pid}"),
        FdState::Tty(t) => match t.role {
            cr_ebpf_image::TtyRole::Master => format!("pseudo-terminal master of pair {}", t.index),
            cr_ebpf_image::TtyRole::Slave => format!(
                "pseudo-terminal slave of pair {} (open file {})",
                t.index, t.open
            ),
            cr_ebpf_image::TtyRole::Controlling => "/dev/tty (its controlling terminal)".into(),
            _ => "a shell job's terminal (the restorer's at restore)".into(),
        },
        FdState::Memfd { id } => format!("{} (shared memory object {id})", f.path),
        FdState::Deleted { id } => format!("{} (stored as object {id})", f.path),
        FdState::Fifo { deleted, .. } => format!(
            "named FIFO {}{}, {} bytes buffered",
            f.path,
            if *deleted { " (made again)" } else { "" },
            f.data.len()
        ),
        FdState::Fanotify(g) => {
            let m: Vec<String> = g
                .marks
                .iter()
                .map(|m| format!("{:#x}={}", m.mask, m.path))
                .collect();
            format!("fanotify group, {} mark(s): {}", m.len(), m.join(" "))
        }
        FdState::Inotify(watches) => {
            let w: Vec<String> = watches
                .iter()
                .map(|w| format!("{}={}", w.wd, w.path))
                .collect();
            format!("inotify watching {}", w.join(" "))
        }
        FdState::Socket(s) => {
            let kind = match (s.family as i32, s.sock_type as i32) {
                (libc::AF_UNIX, libc::SOCK_STREAM) => "unix stream",
                (libc::AF_UNIX, libc::SOCK_DGRAM) => "unix datagram",
                (libc::AF_UNIX, libc::SOCK_SEQPACKET) => "unix seqpacket",
                (libc::AF_NETLINK, _) => "netlink",
                (libc::AF_PACKET, _) => "packet",
                (_, libc::SOCK_STREAM) => "TCP",
                (_, libc::SOCK_DGRAM) => "UDP",
                (_, libc::SOCK_RAW) => "raw IP",
                _ => "socket",
            };
            let queued: usize = s.queue.iter().map(Vec::len).sum();
            // Named as `restore --inherit-fd` takes it.
            let mut text = format!(
                "socket:[{}] {kind} {}",
                s.inode,
                SocketInfo::address_text(&s.local)
            );
            if s.listening {
                text += &format!(" listening (backlog {})", s.backlog);
            }
            if !s.peer.is_empty() {
                text += &format!(" -> {}", SocketInfo::address_text(&s.peer));
            }
            if s.peer_inode != 0 {
                text += &format!(" (pair with socket {})", s.peer_inode);
            }
            if queued > 0 {
                text += &format!(", {queued} bytes queued in {} messages", s.queue.len());
            }
            let carried: Vec<String> = s.in_flight.iter().flatten().map(i32::to_string).collect();
            if !carried.is_empty() {
                text += &format!(
                    ", carrying descriptors {} in flight (SCM_RIGHTS)",
                    carried.join(" ")
                );
            }
            if !s.filter.is_empty() {
                text += &format!(", a socket filter of {} instructions", s.filter.len() / 8);
            }
            if let Some(t) = &s.tcp {
                text += &format!(
                    ", established: {} bytes unread, {} unacknowledged, {} unsent",
                    t.recv_queue.len(),
                    t.send_queue.len() - t.unsent as usize,
                    t.unsent
                );
            }
            text
        }
    }
}

/// A process tree image: its processes, then each one's image.
fn tree(args: &Args) -> Result<ExitCode> {
    let t = cr_ebpf_image::tree::Tree::read(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    if args.json {
        let mut procs = Vec::new();
        for p in &t.processes {
            // Of a checkpoint in a chain: which one each process builds on.
            let chain = match p.zombie {
                Some(_) => None,
                None => Manifest::read(&args.dir.join(&p.dir))
                    .with_context(|| format!("reading {}", p.dir))?
                    .chain
                    .map(|c| serde_json::json!({"parent": c.parent, "method": c.method})),
            };
            procs.push(
                serde_json::json!({"pid": p.pid, "ppid": p.ppid, "pgid": p.pgid,
                "sid": p.sid, "zombie_status": p.zombie, "dir": p.dir, "chain": chain}),
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "processes": procs }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "process tree {} ({} processes)",
        args.dir.display(),
        t.processes.len()
    );
    println!(
        "  {:>8} {:>8} {:>8} {:>8}  what",
        "pid", "ppid", "pgid", "sid"
    );
    for p in &t.processes {
        let what = match p.zombie {
            Some(status) => format!("zombie, wait status {status:#x}"),
            None => {
                let m = Manifest::read(&args.dir.join(&p.dir))
                    .with_context(|| format!("reading {}", p.dir))?;
                format!(
                    "{} ({} threads, {} mappings, {} descriptors) in {}/{}",
                    m.process.exe,
                    m.threads.len(),
                    m.mappings.len(),
                    m.fds.len(),
                    p.dir,
                    match m.chain {
                        Some(c) if c.parent.is_empty() => format!(", {} (no parent)", c.method),
                        Some(c) => format!(", {} on {}", c.method, c.parent),
                        None => String::new(),
                    }
                )
            }
        };
        println!(
            "  {:>8} {:>8} {:>8} {:>8}  {what}",
            p.pid, p.ppid, p.pgid, p.sid
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The checkpoints of an images directory, oldest first.
fn chain(args: &Args) -> Result<ExitCode> {
    let all = cr_ebpf_image::images_dir::list(&args.dir)?;
    if all.is_empty() {
        anyhow::bail!(
            "{} holds neither an image nor checkpoints",
            args.dir.display()
        );
    }
    let mut rows = Vec::new();
    let images: Vec<PathBuf> = all
        .iter()
        .filter_map(|e| cr_ebpf_image::images_dir::processes(&e.dir).ok())
        .flat_map(|procs| procs.into_iter().map(|(_, image)| image))
        .collect();
    let bar = checking(!args.json, images.iter().map(PathBuf::as_path));
    for e in &all {
        let reading = || format!("reading {}", e.dir.display());
        // A tree's checkpoint: the root's chain and freeze, every process's pages.
        let procs = cr_ebpf_image::images_dir::processes(&e.dir).with_context(reading)?;
        let (mut pages, mut bytes) = (0, 0);
        let mut root = None;
        for (_, image) in &procs {
            let store = pages::PageStore::open(image)
                .and_then(|s| s.verify().map(|()| s))
                .with_context(reading)?;
            pages += store.pages();
            bytes += pages::bytes_on_disk(image);
            if root.is_none() {
                root = Some(Manifest::read(image).with_context(reading)?);
            }
        }
        let m = root.with_context(|| format!("{} holds no process", e.dir.display()))?;
        let c = m.chain.clone().unwrap_or_default();
        rows.push(serde_json::json!({
            "id": e.name, "seq": e.seq,
            "parent": if c.parent.is_empty() { None } else { Some(c.parent) },
            "method": c.method, "pid": m.process.pid, "processes": procs.len(),
            "pages": pages, "bytes": bytes,
            "size_bytes": cr_ebpf_image::images_dir::size_on_disk(&e.dir),
            "freeze_ms": m.process.freeze_ns as f64 / 1e6,
            "taken_unix_ns": m.process.taken_unix_ns,
        }));
    }
    drop(bar);
    // Checkpoint directories without an image: shown, never skipped.
    let damaged: Vec<String> = cr_ebpf_image::images_dir::damaged(&args.dir)
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"checkpoints": rows, "damaged": damaged})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {} checkpoint(s)", args.dir.display(), rows.len());
    for name in &damaged {
        println!(
            "  {name}: damaged, holds no image (restore refuses it; --checkpoint picks another)"
        );
    }
    println!(
        "  {:<12} {:<12} {:<10} {:>9} {:>9} {:>11} {:>10}",
        "id", "parent", "method", "processes", "pages", "size KiB", "freeze ms"
    );
    for r in &rows {
        println!(
            "  {:<12} {:<12} {:<10} {:>9} {:>9} {:>11.1} {:>10.2}",
            r["id"].as_str().unwrap_or(""),
            r["parent"].as_str().unwrap_or("-"),
            r["method"].as_str().unwrap_or(""),
            r["processes"].as_u64().unwrap_or(1),
            r["pages"].as_u64().unwrap_or(0),
            r["size_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            r["freeze_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}
/// The shared memory objects of `m`, as `inspect` prints them.
fn print_shmem(m: &Manifest, chunks: &[pages::ChunkRef]) {
    if !m.shmem.is_empty() {
        println!("  shared memory objects:");
    }
    for o in &m.shmem {
        let held = if o.elsewhere {
            "contents in another process's image".to_string()
        } else if o.base != 0 {
            format!(
                "{} pages stored{}",
                shm_pages_stored(chunks, o),
                if o.inherits {
                    ", the rest in the parent checkpoint"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "{} bytes of contents in the manifest",
                o.data.iter().map(|d| d.1.len()).sum::<usize>()
            )
        };
        println!(
            "    {} {:<10} {:>10} bytes  {held}  {}",
            o.id,
            format!("{:?}", o.kind),
            o.size,
            o.name
        );
    }
}

/// The shared memory objects of `m`, for `inspect --json`.
fn shmem_json(m: &Manifest, chunks: &[pages::ChunkRef]) -> Vec<serde_json::Value> {
    m.shmem
        .iter()
        .map(|o| {
            serde_json::json!({
                "id": o.id, "kind": format!("{:?}", o.kind), "name": o.name, "size": o.size,
                "stored_elsewhere": o.elsewhere, "inherits": o.inherits,
                "pages_stored": shm_pages_stored(chunks, o),
            })
        })
        .collect()
}

/// Pages of shared memory object `o` this image's page store holds.
fn shm_pages_stored(chunks: &[pages::ChunkRef], o: &cr_ebpf_image::ShmemObject) -> u64 {
    if o.base == 0 {
        return 0;
    }
    let end = o.base + cr_ebpf_image::SHMEM_SLOT;
    chunks
        .iter()
        .filter(|c| (o.base..end).contains(&c.vaddr))
        .map(|c| c.npages as u64)
        .sum()
}

/// A progress bar for checking the page stores of `images` (a page per
/// 4 KiB of each `pages.img`), shown if it lasts.
fn checking<'a>(
    enabled: bool,
    images: impl IntoIterator<Item = &'a std::path::Path>,
) -> crate::progress::Bar {
    let total: u64 = images
        .into_iter()
        .filter_map(|i| std::fs::metadata(i.join(cr_ebpf_image::PAGES_FILE)).ok())
        .map(|m| m.len() / pages::PAGE as u64)
        .sum();
    cr_ebpf_image::progress::start("checking page stores", total);
    crate::progress::Bar::start(enabled)
}
