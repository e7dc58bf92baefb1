//! `cr-ebpf track`: the always-on service. Keeps the eBPF programs and the
//! dirty tracker attached to one process, takes an incremental checkpoint
//! every interval and whenever `cr-ebpf snapshot` asks over the control
//! socket, and keeps the chain bounded.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_checkpoint::{CheckpointReport, Session, SessionOptions};
use cr_ebpf_loader::{Event, Tracer, TracerOptions};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

mod first;
mod log;
mod metrics;
mod report;
mod retention;

use log::Log;
use report::{report_json, report_text};

/// Name of the control socket inside the images directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Options of `cr-ebpf track`.
#[derive(clap::Args)]
pub struct Args {
    /// The process to track.
    #[arg(long)]
    pub pid: i32,
    /// Where checkpoints go (`ckpt-000001`, … and the control socket).
    #[arg(long)]
    pub images_dir: PathBuf,
    /// Time between checkpoints (`500ms`, `1s`, `2.5s`, `1m`); `0` for
    /// checkpoints only on request.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Keep the newest K checkpoints (older ones are merged away in batches:
    /// at most 2K are on disk at any time); `all`: no bound by count
    /// (`--keep-for forever` too keeps every one).
    #[arg(long, default_value = "20", value_name = "K|all", value_parser = crate::args::keep_or_all)]
    pub keep: crate::args::Keep,
    /// Also merge away checkpoints older than this (`30m`, `1h`, at most
    /// `30d`; the newest is always kept), in batches: once as many are
    /// older as younger; `forever` keeps them whatever their age.
    #[arg(long, default_value = "7d", value_name = "AGE|forever", value_parser = crate::args::keep_for_or_forever)]
    pub keep_for: crate::args::KeepFor,
    /// Also keep the images directory under this size (`500M`, `2G`): a
    /// checkpoint that takes it over has the older ones merged away until
    /// the newest fit in half of it.
    #[arg(long, value_name = "SIZE", value_parser = crate::args::size)]
    pub max_disk: Option<u64>,
    /// Do not copy dirty pages before the freeze.
    #[arg(long)]
    pub no_precopy: bool,
    /// Take unix stream connections to named sockets outside the tracked
    /// tree (a stdout to journald): connected to the same name again at
    /// restore, a new connection to the peer (as `dump --ext-unix-sk`).
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Most bytes of one shared memory object stored (`dump --shm-limit`).
    #[arg(long, default_value = "4G", value_parser = crate::args::size)]
    pub shm_limit: u64,
    /// Serve the service's counters (checkpoints, failures, freeze
    /// histogram, bytes, tracked processes, lost fault records) in
    /// Prometheus' text format over HTTP at this address (`127.0.0.1:9464`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// CPU priority of the service's own work (compressing, writing,
    /// pre-copying), as `nice`: the tracked process takes precedence.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: i32,
    /// Stop after this many checkpoints (for scripted runs).
    #[arg(long)]
    pub count: Option<u64>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// A service `run` forked, waiting at its exec: let go once the
    /// programs track its pid (not an option).
    #[arg(skip)]
    pub gate: std::sync::Mutex<Option<crate::gate::Gate>>,
}

pub use crate::args::parse_duration;

pub fn run(args: &Args) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(track(args)).map(ExitCode::from)
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Binds the control socket, refusing if another service answers there.
async fn bind_control(dir: &Path) -> Result<UnixListener> {
    let path = socket_path(dir);
    if path.as_os_str().len() >= 107 {
        bail!(
            "the images directory path is too long for its control socket ({}): \
             use a shorter --images-dir",
            path.display()
        );
    }
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            bail!(
                "another `cr-ebpf track` already serves {} (its control socket answers)",
                dir.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Most pre-copy passes before a freeze.
const PRECOPY_PASSES: usize = 3;
/// A pre-copy pass that copied at least this many pages is followed by
/// another (the pages written meanwhile would otherwise be copied frozen).
const PRECOPY_AGAIN_PAGES: u64 = 1024;

struct Service {
    pid: i32,
    /// Fault records lost so far (all processes), as last seen.
    fault_losses: u64,
    session: Session,
    tracer: Tracer,
    log: Log,
    keep: Option<usize>,
    keep_for: Option<Duration>,
    max_disk: Option<u64>,
    taken: u64,
    precopy: bool,
    retention: Option<std::thread::JoinHandle<()>>,
    /// When to give new processes of the tree their trackers: a little
    /// after their fork, so that short-lived children (a shell command, a
    /// helper that execs and exits) cost nothing.
    follow_at: Option<std::time::Instant>,
    metrics: metrics::Metrics,
}

/// How long a new child must have run before it gets a tracker (and its
/// memory is pre-copied); a younger one alive at a checkpoint is stored
/// whole.
const FOLLOW_DELAY: Duration = Duration::from_millis(100);

impl Service {
    fn fold(&mut self, batch: &[Result<Event, cr_ebpf_loader::DecodeError>]) {
        for e in batch.iter().flatten() {
            self.log.fold(self.pid as u32, e);
        }
    }

    /// Gives the processes of the tree that have none a tracker, and
    /// pre-copies the memory of those that just got one.
    fn follow(&mut self) -> Result<()> {
        let before = self.session.pids();
        let f = self.session.follow(FOLLOW_DELAY);
        // Children too young for now are looked at again a little later.
        self.follow_at = (f.too_young > 0).then(|| std::time::Instant::now() + FOLLOW_DELAY);
        for p in f.new.iter().filter(|p| !before.contains(p)) {
            eprintln!("cr-ebpf: process {p} joined the tree; it is checkpointed with it");
        }
        if self.precopy && !f.new.is_empty() {
            self.session.prime()?;
        }
        Ok(())
    }

    /// [`Service::follow`] once the delay after a fork has passed.
    fn follow_when_due(&mut self) -> Result<()> {
        if self
            .follow_at
            .is_some_and(|at| std::time::Instant::now() >= at)
        {
            self.follow()?;
        }
        Ok(())
    }

    /// Applies what the log showed while the tree runs: a fork schedules
    /// [`Service::follow`] ([`FOLLOW_DELAY`] later), a followed process that
    /// called `execve` gets a new tracker, new mappings are registered
    /// early, held connections on closed descriptors are let go.
    fn follow_log(&mut self) -> Result<()> {
        let children = std::mem::take(&mut self.log.children);
        let exec: Vec<u32> = self
            .log
            .procs
            .iter_mut()
            .filter_map(|(&p, l)| std::mem::take(&mut l.exec).then_some(p))
            .collect();
        let followed = self.session.pids();
        let mut replaced = false;
        for &pid in &exec {
            if let Some(l) = self.log.procs.get_mut(&pid) {
                l.new_mappings.clear();
            }
            // A new address space: a new userfaultfd for it (a process not
            // followed yet gets one when it is).
            if followed.contains(&(pid as i32)) {
                let wp = cr_ebpf_dirty_tracker::attach::attach(pid as i32).ok();
                self.session.replace_tracker(pid as i32, wp);
                replaced = true;
            }
        }
        if replaced && self.precopy {
            self.session.prime()?;
        }
        if !children.is_empty() {
            self.follow_at
                .get_or_insert(std::time::Instant::now() + FOLLOW_DELAY);
        }
        for (&pid, l) in &mut self.log.procs {
            for (s, e) in std::mem::take(&mut l.new_mappings) {
                self.session.register_early(pid as i32, s, e);
            }
        }
        self.release_closed();
        Ok(())
    }

    /// A checkpoint now, counted in the metrics.
    fn checkpoint(&mut self, events: &mut cr_ebpf_loader::EventStream) -> Result<CheckpointReport> {
        let r = self.take_checkpoint(events);
        match &r {
            Ok(r) => self.metrics.taken(r),
            Err(_) => self.metrics.failed(),
        }
        r
    }

    fn take_checkpoint(
        &mut self,
        events: &mut cr_ebpf_loader::EventStream,
    ) -> Result<CheckpointReport> {
        // Before the freeze: what is there now, bounded (a process writing
        // records faster than they are folded must not hold the checkpoint
        // off; what is left is drained while the processes are stopped).
        let mut batch = Vec::new();
        events.drain_some(&mut batch, cr_ebpf_loader::BATCH_MAX);
        self.fold(&batch);
        self.follow_log()?;
        // Fault records lost (the ring buffer filled while a long write ran)
        // mean many pages were written: as good a trigger as counted faults.
        let fault_losses = self.tracer.fault_losses()?;
        let faults_lost = fault_losses > self.fault_losses;
        self.fault_losses = fault_losses;
        if self.precopy && (self.log.faults >= 256 || faults_lost) {
            // Passes while they shrink and are large: each copies what was
            // written during the one before, so the freeze copies the rest.
            let mut last = u64::MAX;
            for _ in 0..PRECOPY_PASSES {
                let r = self.session.precopy()?;
                if r.pages < PRECOPY_AGAIN_PAGES || r.pages >= last {
                    break;
                }
                last = r.pages;
            }
        }
        // What piled up during the pre-copy is folded now, while the
        // processes run, so that little is left to fold while they are frozen.
        let mut batch = Vec::new();
        events.drain_some(&mut batch, cr_ebpf_loader::BATCH_MAX);
        self.fold(&batch);
        // Events up to the freeze: the session drains them once the
        // processes are stopped, so nothing they did before is missed.
        let root = self.pid as u32;
        let pids = self.session.pids();
        let lost: Vec<i32> = self
            .tracer
            .losses()?
            .iter()
            .filter(|l| l.dropped > 0)
            .map(|l| l.tgid as i32)
            .collect();
        let log = &mut self.log;
        let r = self.session.checkpoint_with(|| {
            let mut batch = Vec::new();
            events.drain(&mut batch);
            for e in batch.iter().flatten() {
                log.fold(root, e);
            }
            let undecodable = batch.iter().any(|e| e.is_err());
            tracing::debug!(?lost, undecodable, "log up to the freeze");
            log.take_changes(&pids, &lost, undecodable)
        });
        self.log.faults = 0;
        for l in self.log.procs.values_mut() {
            l.new_mappings.clear();
            // Closed before the freeze: the checkpoint's connections reflect it.
            l.closed.clear();
        }
        for &pid in &lost {
            self.tracer.acknowledge_loss(pid as u32)?;
        }
        let r = r?;
        self.log.ours.push(r.stopped_window);
        // The warm-up's stops are before this checkpoint's freeze: no event
        // folded from now on can fall in them.
        self.log.ours_of.clear();
        if self.log.ours.len() > 4 {
            self.log.ours.remove(0);
        }
        self.taken += 1;
        // Processes that appeared while frozen (or that could not be
        // attached before) get their trackers now. The checkpoint is
        // published whatever happens here.
        if let Err(e) = self.follow() {
            eprintln!("cr-ebpf: following the tree: {e:#}");
        }
        self.retain(false);
        Ok(r)
    }

    /// Lets go of held connections on descriptors the processes closed.
    fn release_closed(&mut self) {
        for (&pid, l) in &mut self.log.procs {
            for (a, b) in std::mem::take(&mut l.closed) {
                self.session.release_connections(pid as i32, a..=b);
            }
        }
    }
}

/// The service: tracks `args.pid` until it is gone (exit status
/// [`crate::exit::TARGET_GONE`]) or it is told to stop ([`crate::exit::OK`]).
pub(crate) async fn track(args: &Args) -> Result<u8> {
    let pid = args.pid;
    if !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process {pid} (check the pid with `ps`)");
    }
    // A zombie, a kernel thread, pid 1: refused before the images
    // directory is made.
    cr_ebpf_checkpoint::checkable(pid)?;
    cr_ebpf_image::trust::check_destination(&args.images_dir)?;
    cr_ebpf_image::trust::create_private_dir(&args.images_dir)
        .with_context(|| format!("creating {}", args.images_dir.display()))?;
    let listener = bind_control(&args.images_dir).await?;
    let _cleanup = RemoveOnDrop(socket_path(&args.images_dir));
    let _ = cr_ebpf_checkpoint::clean_leftovers(&args.images_dir);

    let (mut svc, mut events, tracked) = start(args)?;
    eprintln!(
        "cr-ebpf: tracking pid {pid} ({} process{}) into {}, every {:?}; \
         `cr-ebpf snapshot --incremental --images-dir {}` for one now; Ctrl-C detaches",
        tracked,
        if tracked == 1 { "" } else { "es" },
        args.images_dir.display(),
        args.interval,
        args.images_dir.display(),
    );
    let mut out = std::io::stdout();
    let mut print = |r: &CheckpointReport| {
        let line = if args.json {
            report_json(r).to_string()
        } else {
            report_text(r)
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    first::prepare(&mut svc)?;
    let bar = crate::progress::Bar::start(!args.json);
    let first = svc.checkpoint(&mut events);
    drop(bar);
    let first = first?;
    print(&first);
    let mut tick = tokio::time::interval(if args.interval.is_zero() {
        Duration::from_secs(86400)
    } else {
        args.interval
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut alive = tokio::time::interval(Duration::from_millis(200));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut batch = Vec::new();
    let ours = nix::unistd::geteuid().as_raw();
    let metrics = match args.metrics {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics address {a}"))?,
        ),
        None => None,
    };
    let scrape = || async {
        match &metrics {
            Some(l) => l.accept().await.ok(),
            None => std::future::pending().await,
        }
    };
    let status = loop {
        if args.count.is_some_and(|n| svc.taken >= n) {
            break format!("took {} checkpoints as asked", svc.taken);
        }
        // In this order: a due checkpoint is never put off by a process
        // whose records keep the event branch ready (each turn folds at
        // most BATCH_MAX of them).
        tokio::select! {
            biased;
            _ = &mut ctrl_c => break "interrupted".to_string(),
            _ = term.recv() => break "terminated".to_string(),
            _ = tick.tick(), if !args.interval.is_zero() => {
                match svc.checkpoint(&mut events) {
                    Ok(r) => print(&r),
                    Err(e) if gone(pid) => break format!("process {pid} exited ({e:#})"),
                    Err(e) => eprintln!("cr-ebpf: checkpoint failed, process left running: {e:#}"),
                }
            }
            Some((stream, _)) = scrape() => {
                let body = svc.metrics.render(svc.session.pids().len(), svc.fault_losses);
                tokio::spawn(metrics::answer(stream, body));
            }
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let allowed = stream.peer_cred().is_ok_and(|c| c.uid() == ours || c.uid() == 0);
                serve(stream, allowed, &mut svc, &mut events, &mut print).await;
            }
            r = events.next_batch(&mut batch) => {
                r.context("reading the event ring buffer")?;
                let got = std::mem::take(&mut batch);
                svc.fold(&got);
                if svc.log.exited {
                    break format!("process {pid} exited");
                }
                if let Err(e) = svc.follow_log() {
                    eprintln!("cr-ebpf: following the tree: {e:#}");
                }
                // A process that logs without pause keeps this branch
                // ready: without a yield the runtime never turns its
                // timers, and no checkpoint came due (seen: seconds late).
                tokio::task::yield_now().await;
            }
            _ = alive.tick() => {
                // Fault records do not wake us one by one: count them here.
                events.drain_some(&mut batch, cr_ebpf_loader::BATCH_MAX);
                let got = std::mem::take(&mut batch);
                svc.fold(&got);
                svc.release_closed();
                if gone(pid) {
                    break format!("process {pid} exited");
                }
                if let Err(e) = svc.follow_log().and_then(|()| svc.follow_when_due()) {
                    eprintln!("cr-ebpf: following the tree: {e:#}");
                }
            }
        }
    };
    let gone = finish(svc, args, &status);
    Ok(if gone {
        crate::exit::TARGET_GONE
    } else {
        crate::exit::OK
    })
}

/// Loads the programs, tracks `args.pid`, attaches its dirty tracker and
/// starts the session: the service, its event stream and how many
/// processes are tracked.
fn start(args: &Args) -> Result<(Service, cr_ebpf_loader::EventStream, usize)> {
    let pid = args.pid;
    let mut tracer = Tracer::load(&TracerOptions::default())
        .context("loading the eBPF programs (see `cr-ebpf check`)")?;
    let tracked = tracer.track(pid as u32)?;
    let events = tracer.events()?;
    // A service `run` started: it execs now, and the log has it from its
    // first instruction on.
    let gate = args.gate.lock().expect("not poisoned").take();
    if let Some(g) = gate {
        eprintln!("cr-ebpf: the programs follow pid {pid}: letting the service start");
        g.open()?;
    }
    let wp = match cr_ebpf_dirty_tracker::attach::attach(pid) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!(
                "cr-ebpf: uffd-wp tracking unavailable ({}); pages are compared by content",
                crate::error_chain(&e)
            );
            None
        }
    };
    // Every thread started from here on (the session's workers) inherits it.
    // SAFETY: setpriority on the calling thread.
    unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::syscall(libc::SYS_gettid) as libc::id_t,
            args.nice,
        )
    };
    let opts = SessionOptions {
        ext_unix_sk: args.ext_unix_sk,
        shm_limit: args.shm_limit,
        ..SessionOptions::default()
    };
    let session = Session::new(pid, &args.images_dir, wp, opts)
        .with_context(|| format!("starting to checkpoint process {pid}"))?;
    let svc = Service {
        pid,
        fault_losses: 0,
        session,
        tracer,
        log: Log::default(),
        keep: args.keep.0,
        keep_for: args.keep_for.0,
        max_disk: args.max_disk,
        taken: 0,
        precopy: !args.no_precopy,
        retention: None,
        follow_at: None,
        metrics: metrics::Metrics::default(),
    };
    Ok((svc, events, tracked.len()))
}

/// What the service does when it stops: a dead process's connections
/// closed silently, retention run, the last word printed.
/// Ends the service; whether it ended because the process is gone.
fn finish(mut svc: Service, args: &Args, status: &str) -> bool {
    let pid = args.pid;
    // The exit event comes before /proc shows the process dead.
    let dead = svc.log.exited || gone(pid);
    if dead {
        // Its connections were kept open by us: closed silently now, the
        // peers wait for a restored process instead of seeing a reset.
        let n = svc.session.silence_connections();
        if n > 0 {
            eprintln!(
                "cr-ebpf: {n} established TCP connection(s) of process {pid} kept for a restore \
                 (closed silently; restore the newest checkpoint to resume them)"
            );
        }
    }
    svc.retain(true);
    if let Some(h) = svc.retention.take() {
        let _ = h.join();
    }
    let all = cr_ebpf_image::images_dir::list(&args.images_dir).unwrap_or_default();
    eprintln!(
        "cr-ebpf: {status}; detached{}; {} checkpoint(s) taken, {} in {}, newest {}",
        if dead {
            String::new()
        } else {
            format!(", process {pid} runs on untouched")
        },
        svc.taken,
        all.len(),
        args.images_dir.display(),
        all.last().map_or("none", |e| e.name.as_str())
    );
    dead
}

fn gone(pid: i32) -> bool {
    // A zombie has exited too.
    cr_ebpf_resources::proc::stat(pid).map_or(true, |s| matches!(s.state, 'Z' | 'X'))
}

async fn serve(
    stream: UnixStream,
    allowed: bool,
    svc: &mut Service,
    events: &mut cr_ebpf_loader::EventStream,
    print: &mut impl FnMut(&CheckpointReport),
) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r);
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let reply = if !allowed {
        serde_json::json!({"ok": false, "error": "only the owner of the service may use its control socket"})
    } else {
        match (read, line.trim()) {
            (Ok(Ok(_)), "snapshot") => match svc.checkpoint(events) {
                Ok(r) => {
                    print(&r);
                    report_json(&r)
                }
                Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            },
            (Ok(Ok(_)), "status") => serde_json::json!({
                "ok": true, "pid": svc.pid, "checkpoints": svc.taken,
                "images_dir": svc.session.dir().display().to_string(),
            }),
            (_, other) => {
                serde_json::json!({"ok": false, "error": format!("unknown request {other:?} (snapshot, status)")})
            }
        }
    };
    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
}

/// Asks a running service for a checkpoint now. `None` when no service
/// answers on the images directory's control socket.
pub fn request_snapshot(dir: &Path) -> Result<Option<serde_json::Value>> {
    use std::io::{BufRead as _, BufReader};
    let path = socket_path(dir);
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "the service serving {} belongs to another user: only its owner may ask it \
             for checkpoints",
            dir.display()
        ),
        // No socket, or nobody listening on it: no service runs.
        Err(_) => return Ok(None),
    };
    s.write_all(b"snapshot\n").context("asking the service")?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the service's answer")?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).context("the service answered nonsense")?;
    Ok(Some(v))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
