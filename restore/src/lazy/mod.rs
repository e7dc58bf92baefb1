//! Lazy restore (`restore --lazy`): the process runs before its memory is
//! in place, and its private anonymous pages arrive on demand.
//!
//! While the stub is built, a userfaultfd is made inside it (missing mode,
//! with the fork, remap, remove and unmap events) and taken into the
//! restorer; every private anonymous mapping is registered with it instead
//! of being filled (file-backed private pages, shared memory and special
//! mappings are filled as usual). A server thread then answers each fault
//! with the chunk of the image around it (`UFFDIO_COPY`; a page the image
//! does not hold is a zero page). Before the process runs it copies only
//! what the process touches first (each thread's stack, thread area and
//! rseq area, the small mappings whole: `read.rs`, whose disk reads start
//! as soon as the image is open) and answers the restorer's own faults;
//! once the process runs ([`LazyFill::go`]) it copies every other page in
//! the background, the pages of the newest checkpoint of a chain first
//! (those written last: the working set), faults always first. Once every
//! page is in, the descriptors are closed, which unregisters the mappings:
//! holes left are ordinary untouched memory.
//!
//! What the process does to its memory meanwhile is followed through the
//! events, which the kernel delivers before it goes on (and while one is
//! unread, a copy fails with `EAGAIN` rather than land on memory that
//! changed): `mremap` moves the pages still due to their new place,
//! `munmap` and `MADV_DONTNEED` drop them (the process must read zeroes
//! there, never the image), and a `fork` gives the child a userfaultfd of
//! its own, whose pages due are copied at once.
//!
//! Each chunk's checksums are checked as it is loaded: a damaged one found
//! after the process started kills it (and its children forked meanwhile)
//! and fails the restore. The restorer waits for the fill to end before it
//! exits, and holds SIGINT and SIGTERM meanwhile; if it dies all the same
//! (SIGKILL), a guardian process (`guard.rs`) holding duplicates of the
//! userfaultfds kills the restored processes rather than let the pages
//! still due read as zeroes.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::mpsc::Receiver,
    sync::Arc,
    time::{Duration, Instant},
};

use cr_ebpf_image::Chain;

use crate::RestoreError;

mod due;
mod guard;
mod read;
mod uffd;

pub(crate) use due::{is_lazy, lazy_fills, lazy_ranges};
use due::{Index, Target};
use read::Data;
pub(crate) use read::{hot_addresses, prefetch};

use uffd::{
    kill_tree, UffdioCopy, UffdioZeropage, EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, EVENT_REMOVE,
    EVENT_UNMAP, UFFDIO_COPY, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};
pub(crate) use uffd::{register, take_uffd};

const PAGE: u64 = 4096;

/// What a lazy restore's fill did.
#[derive(Debug, Clone, Default)]
pub struct LazyReport {
    /// Pages copied in, in all (a process forked meanwhile counts again).
    pub pages: u64,
    /// Faults answered (the process waited for these).
    pub faults: u64,
    /// Longest answer to a fault.
    pub worst_fault: Duration,
    /// From the start of the server until every page was in.
    pub took: Duration,
}

type Handle = std::thread::JoinHandle<Result<LazyReport, RestoreError>>;

/// Where the fill thread says whether the guardian started.
type Guarded = Receiver<Result<(), RestoreError>>;

/// The fill of a lazily restored process, running in a thread of its own.
#[derive(Clone)]
pub struct LazyFill {
    handle: Arc<std::sync::Mutex<Option<Handle>>>,
    /// Write end of the pipe whose closing lets the background copy start
    /// (see [`LazyFill::go`]).
    go: Arc<std::sync::Mutex<Option<OwnedFd>>>,
    /// Says once whether the guardian started (see [`LazyFill::guarded`]).
    guarded: Arc<std::sync::Mutex<Option<Guarded>>>,
}

impl std::fmt::Debug for LazyFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazyFill")
    }
}

impl LazyFill {
    /// Waits until every page is in (or the fill failed, the processes
    /// killed). Once: a second call says it was waited for.
    pub fn wait(&self) -> Result<LazyReport, RestoreError> {
        self.go();
        let h = self.handle.lock().expect("not poisoned").take();
        match h {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(RestoreError::stub("the lazy fill thread panicked"))),
            None => Err(RestoreError::stub("the lazy fill was waited for already")),
        }
    }
}

impl LazyFill {
    /// Waits until the guardian holds the userfaultfd (it is started by
    /// the fill thread while the rest of the process is built): the
    /// process must not run before.
    pub(crate) fn guarded(&self) -> Result<(), RestoreError> {
        let rx = self.guarded.lock().expect("not poisoned").take();
        match rx.map(|rx| rx.recv()) {
            Some(Ok(r)) => r,
            // The fill ended first: its error says why.
            _ => Err(self.wait().err().unwrap_or_else(|| {
                RestoreError::stub("the lazy fill ended before its guardian started")
            })),
        }
    }

    /// The process runs: the background copy of every page may start.
    /// Until then only faults are answered (the restorer's own, on the
    /// pages it touches while it builds the process), so that the build
    /// shares neither the disk nor the cores with the copy.
    pub(crate) fn go(&self) {
        drop(self.go.lock().expect("not poisoned").take());
    }
}

/// The server: answers faults and copies the rest.
struct Server {
    chain: Arc<Chain>,
    /// The lazy fills, in the order they are copied in the background.
    order: Vec<usize>,
    /// Each fill's position in `order`.
    position: std::collections::HashMap<usize, usize>,
    /// What the readers have still to read, once they run.
    queue: Option<Arc<read::Queue>>,
    index: Index,
    targets: Vec<Target>,
    /// The chunk loaded last: (fill, its pages).
    cached: Option<(usize, Data)>,
    /// Addresses the process touches first, loaded before it runs.
    hot: Vec<u64>,
    /// Read end of the pipe [`LazyFill::go`] closes.
    go: OwnedFd,
    /// Where a copy last found no registered mapping (see `copy_range`).
    last_enoent: Option<u64>,
    report: LazyReport,
    /// Holds duplicates of the userfaultfds until every page is in.
    guard: Option<guard::Guard>,
    /// Where the start of the guardian is reported.
    guarded: Option<std::sync::mpsc::Sender<Result<(), RestoreError>>>,
    /// Pages due when it started (what a progress bar counts to).
    due_pages: u64,
}

/// Starts the fill of process `pid` (about to be released), whose lazy
/// fills (indices into `chain.fills()`) are registered with `uffd`: the
/// pages around the `hot` addresses at once, then faults only until
/// [`LazyFill::go`], then every page in the background, the fills of the
/// chain's newest checkpoint first when it has parents.
pub(crate) fn start(
    chain: Arc<Chain>,
    lazy: Vec<usize>,
    uffd: OwnedFd,
    pid: i32,
    hot: Vec<u64>,
) -> Result<LazyFill, RestoreError> {
    let mut pieces = BTreeMap::new();
    let mut due = BTreeMap::new();
    let fills = chain.fills();
    // The working set first: what the newest checkpoint stored.
    let mut order = lazy.clone();
    order.sort_by_key(|&i| fills[i].level);
    for &i in &order {
        let f = &fills[i];
        for &(first, n) in &f.pieces {
            let a = f.chunk.vaddr + first as u64 * PAGE;
            pieces.insert(a, (i, first, n));
            due.insert(a, (a, n as u64));
        }
    }
    let due_pages = due.values().map(|&(_, n)| n).sum();
    let (guarded_tx, guarded_rx) = std::sync::mpsc::channel();
    let mut p = [0; 2];
    // SAFETY: `p` has room for the two descriptors.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(RestoreError::Syscall {
            call: "pipe2 (lazy restore)".into(),
            err: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: just made, ours.
    let (go_r, go_w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let server = Server {
        chain,
        position: order.iter().enumerate().map(|(k, &f)| (f, k)).collect(),
        order,
        queue: None,
        index: Index { pieces },
        targets: vec![Target {
            uffd,
            pid: Some(pid),
            due,
        }],
        cached: None,
        hot,
        go: go_r,
        last_enoent: None,
        report: LazyReport::default(),
        guard: None,
        guarded: Some(guarded_tx),
        due_pages,
    };
    let handle = std::thread::Builder::new()
        .name("lazy-fill".into())
        .spawn(move || server.run())
        .map_err(|e| RestoreError::stub(format!("starting the lazy fill thread: {e}")))?;
    Ok(LazyFill {
        handle: Arc::new(std::sync::Mutex::new(Some(handle))),
        go: Arc::new(std::sync::Mutex::new(Some(go_w))),
        guarded: Arc::new(std::sync::Mutex::new(Some(guarded_rx))),
    })
}

impl Server {
    /// `n` more pages copied in (counted for the report and the progress
    /// bar).
    fn copied(&mut self, n: u64) {
        self.report.pages += n;
        cr_ebpf_image::progress::add(n);
    }

    fn run(mut self) -> Result<LazyReport, RestoreError> {
        let start = Instant::now();
        cr_ebpf_image::progress::start("copying memory in", self.due_pages);
        let r = self.fill();
        if r.is_err() {
            // Its memory cannot be completed: the process goes, with the
            // children it forked meanwhile, before their registrations do.
            if let Some(root) = self.targets.iter().find_map(|t| t.pid) {
                // SAFETY: signals to the process we restored.
                kill_tree(root, |sig| unsafe {
                    libc::kill(root, sig);
                });
            }
        }
        r?;
        self.report.took = start.elapsed();
        // The guardian's duplicates first, then ours: closing the last
        // descriptors unregisters the mappings.
        if let Some(g) = self.guard.take() {
            g.release();
        }
        self.targets.clear();
        Ok(self.report)
    }

    /// Loads the pages around the hot addresses, answers faults until the
    /// process runs, then serves events until nothing is due, copying in
    /// the background between them: chunks are read and checked ahead, in
    /// order, by threads of their own while this one copies and answers
    /// faults.
    fn fill(&mut self) -> Result<(), RestoreError> {
        // The guardian, forked here while the restorer builds the rest of
        // the process (a fork takes milliseconds), and ready (`guarded`)
        // before the process runs.
        let guard = match self.targets.first() {
            Some(Target {
                uffd,
                pid: Some(pid),
                ..
            }) => guard::Guard::start(*pid, uffd),
            _ => Err(RestoreError::stub("the process ended before it ran")),
        };
        for a in std::mem::take(&mut self.hot) {
            if self.targets.first().is_some_and(|t| t.pid.is_some()) {
                self.load_around(0, a)?;
            }
        }
        let started = guard.and_then(|g| g.ready().map(|()| self.guard = Some(g)));
        let ok = started.is_ok();
        if let Some(tx) = self.guarded.take() {
            let _ = tx.send(started);
        }
        if !ok {
            return Err(RestoreError::stub(
                "the lazy restore guardian did not start",
            ));
        }
        // Until the process runs: faults only (the pipe's end says go).
        loop {
            if self.targets.is_empty() {
                return Ok(());
            }
            if self.serve_until_go()? {
                break;
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<read::Loaded>(8);
        let queue = Arc::new(read::Queue::new(self.order.len()));
        self.queue = Some(queue.clone());
        let readers = read::spawn_readers(&self.chain, &self.order, &queue, &tx)?;
        drop(tx);
        let r = self.fill_from(&rx);
        read::stop_readers(rx, readers);
        r
    }

    fn fill_from(
        &mut self,
        rx: &std::sync::mpsc::Receiver<read::Loaded>,
    ) -> Result<(), RestoreError> {
        let mut streaming = true;
        loop {
            // Faults and events first, without waiting.
            while self.serve(0)? {}
            if streaming {
                match rx.try_recv() {
                    Ok((f, Some(data))) => {
                        self.cached = Some((f, data));
                        self.copy_fill(f)?;
                    }
                    // Damaged: read again here, which says how.
                    Ok((f, None)) => {
                        self.cached = None;
                        self.chunk(f)?;
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        self.serve(1)?;
                    }
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => streaming = false,
                }
                continue;
            }
            // What is left (moved by mremap, or skipped): run by run.
            let Some((t, start)) = self
                .targets
                .iter()
                .enumerate()
                .find_map(|(i, t)| t.due.keys().next().map(|&s| (i, s)))
            else {
                return Ok(());
            };
            let n = self.targets[t].due[&start].1.min(256);
            self.copy_range(t, start, start + n * PAGE)?;
        }
    }

    /// Copies the pieces of fill `f` (decompressed in the cache) into every
    /// target where they are due at their own address.
    fn copy_fill(&mut self, f: usize) -> Result<(), RestoreError> {
        let chain = self.chain.clone();
        let fill = &chain.fills()[f];
        for t in 0..self.targets.len() {
            for &(first, n) in &fill.pieces {
                let a = fill.chunk.vaddr + first as u64 * PAGE;
                let identity = self.targets[t]
                    .due
                    .range(..=a)
                    .next_back()
                    .is_some_and(|(&s, &(src, m))| src == s && s + m * PAGE > a);
                if identity {
                    self.copy_range(t, a, a + n as u64 * PAGE)?;
                }
            }
        }
        Ok(())
    }

    /// Reads and handles the messages of every target, waiting up to
    /// `timeout_ms`; whether there was any.
    fn serve(&mut self, timeout_ms: i32) -> Result<bool, RestoreError> {
        self.serve_with(timeout_ms, None).map(|r| r.0)
    }

    /// Handles the messages of every target, waiting for one or for the
    /// end of the go pipe; whether that end came.
    fn serve_until_go(&mut self) -> Result<bool, RestoreError> {
        let go = self.go.as_raw_fd();
        self.serve_with(-1, Some(go)).map(|r| r.1)
    }

    /// As [`Self::serve`], polling `extra` too: (any message, `extra`
    /// readable or closed).
    fn serve_with(
        &mut self,
        timeout_ms: i32,
        extra: Option<i32>,
    ) -> Result<(bool, bool), RestoreError> {
        let mut fds: Vec<libc::pollfd> = self
            .targets
            .iter()
            .map(|t| t.uffd.as_raw_fd())
            .chain(extra)
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as u64, timeout_ms) };
        if n <= 0 {
            return Ok((false, false));
        }
        let extra_ready = extra.is_some() && fds.pop().is_some_and(|p| p.revents != 0);
        let mut any = false;
        let mut gone = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                gone.push(i);
                continue;
            }
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let mut msg = [0u8; 32];
            // SAFETY: reads one `struct uffd_msg` into `msg`.
            let r = unsafe { libc::read(p.fd, msg.as_mut_ptr().cast(), msg.len()) };
            if r != 32 {
                continue;
            }
            any = true;
            self.message(i, &msg)?;
        }
        // A process gone (exited, or replaced its memory): nothing to do.
        for i in gone.into_iter().rev() {
            self.targets.remove(i);
        }
        Ok((any, extra_ready))
    }

    fn message(&mut self, t: usize, msg: &[u8; 32]) -> Result<(), RestoreError> {
        self.last_enoent = None;
        let u64_at = |o: usize| u64::from_ne_bytes(msg[o..o + 8].try_into().expect("8 bytes"));
        match msg[0] {
            EVENT_PAGEFAULT => {
                let at = Instant::now();
                let addr = u64_at(16) & !(PAGE - 1);
                self.fault(t, addr)?;
                self.report.faults += 1;
                self.report.worst_fault = self.report.worst_fault.max(at.elapsed());
            }
            EVENT_FORK => {
                let ufd = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")) as i32;
                // SAFETY: the kernel installed this descriptor for us.
                let uffd = unsafe { OwnedFd::from_raw_fd(ufd) };
                if let Some(g) = &self.guard {
                    g.hold(&uffd)?;
                }
                let due = self.targets[t].due.clone();
                self.targets.push(Target {
                    uffd,
                    pid: None,
                    due,
                });
            }
            EVENT_REMAP => {
                let (from, to, len) = (u64_at(8), u64_at(16), u64_at(24));
                let tg = &mut self.targets[t];
                let moved = tg.take(from, from + len);
                for (s, v) in moved {
                    tg.due.insert(to + (s - from), v);
                }
            }
            EVENT_REMOVE | EVENT_UNMAP => {
                let (start, end) = (u64_at(8), u64_at(16));
                self.targets[t].take(start, end);
            }
            _ => {}
        }
        Ok(())
    }

    /// Answers a fault at `addr` of target `t`: the run due around it (up
    /// to its piece), or a zero page when the image holds none there.
    fn fault(&mut self, t: usize, addr: u64) -> Result<(), RestoreError> {
        let hit = self.targets[t]
            .due
            .range(..=addr)
            .next_back()
            .map(|(&s, &(_, n))| (s, s + n * PAGE))
            .filter(|&(_, e)| e > addr);
        match hit {
            Some(_) => {
                self.load_around(t, addr)?;
                // Copied (which woke it), or put off by a change of layout:
                // woken to fault again then.
                if self.targets[t]
                    .due
                    .range(..=addr)
                    .next_back()
                    .is_some_and(|(&s, &(_, n))| s + n * PAGE > addr)
                    || self.targets[t].due.is_empty()
                {
                    self.wake(t, addr);
                }
                Ok(())
            }
            None => {
                let mut z = UffdioZeropage {
                    start: addr,
                    len: PAGE,
                    ..Default::default()
                };
                // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`.
                let r = unsafe {
                    libc::ioctl(
                        self.targets[t].uffd.as_raw_fd(),
                        UFFDIO_ZEROPAGE as _,
                        &mut z,
                    )
                };
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    _ if r >= 0 => Ok(()),
                    // Present already, or the layout is changing: the
                    // thread is woken to touch it again (a new fault if
                    // still missing).
                    Some(libc::EEXIST | libc::EAGAIN | libc::ENOENT) => {
                        self.wake(t, addr);
                        Ok(())
                    }
                    _ => Err(RestoreError::Syscall {
                        call: format!("UFFDIO_ZEROPAGE at {addr:#x} (lazy restore)"),
                        err,
                    }),
                }
            }
        }
    }

    /// Copies the piece of the image around `addr` of target `t`, whole,
    /// if the page there is due.
    fn load_around(&mut self, t: usize, addr: u64) -> Result<(), RestoreError> {
        let Some((s, e, src)) = self.targets[t]
            .due
            .range(..=addr)
            .next_back()
            .map(|(&s, &(src, n))| (s, s + n * PAGE, src))
            .filter(|&(_, e, _)| e > addr)
        else {
            return Ok(());
        };
        let ia = src + (addr - s);
        let (ps, f, _, pn) = self
            .index
            .find(ia)
            .ok_or_else(|| RestoreError::stub(format!("no page for {addr:#x}")))?;
        // The process works here: the background reads go on from here.
        if let (Some(q), Some(&k)) = (&self.queue, self.position.get(&f)) {
            q.jump(k);
        }
        let lo = s.max(addr - (ia - ps));
        let hi = e.min(addr + (ps + pn as u64 * PAGE - ia));
        self.copy_range(t, lo, hi)
    }

    /// Wakes the threads of target `t` waiting on the page at `addr`.
    fn wake(&self, t: usize, addr: u64) {
        let mut r = [addr, PAGE];
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range` (two u64).
        unsafe {
            libc::ioctl(
                self.targets[t].uffd.as_raw_fd(),
                UFFDIO_WAKE as _,
                r.as_mut_ptr(),
            )
        };
    }

    /// Copies the pages due in `[lo, hi)` of target `t` from the image.
    fn copy_range(&mut self, t: usize, lo: u64, hi: u64) -> Result<(), RestoreError> {
        let runs = self.targets[t].take(lo, hi);
        for (i, &(start, (src, n))) in runs.iter().enumerate() {
            let mut done = 0;
            while done < n {
                let ia = src + done * PAGE;
                let (ps, f, first, pn) = self
                    .index
                    .find(ia)
                    .ok_or_else(|| RestoreError::stub(format!("no page for {ia:#x}")))?;
                let k = ((ps + pn as u64 * PAGE - ia) / PAGE).min(n - done);
                let off = (first as u64 * PAGE + (ia - ps)) as usize;
                let data = self.chunk(f)?;
                let src_ptr = data[off..off + (k * PAGE) as usize].as_ptr() as u64;
                let mut c = UffdioCopy {
                    dst: start + done * PAGE,
                    src: src_ptr,
                    len: k * PAGE,
                    ..Default::default()
                };
                let uffd = self.targets[t].uffd.as_raw_fd();
                // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy` whose
                // `src` points to `len` readable bytes of ours.
                let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY as _, &mut c) };
                if r < 0 {
                    let err = std::io::Error::last_os_error();
                    match err.raw_os_error() {
                        // Part copied, the rest present already: skip it.
                        Some(libc::EEXIST) => {
                            let copied = c.copy.max(0) as u64 / PAGE;
                            done += copied + 1;
                            self.copied(copied);
                            continue;
                        }
                        // The layout is changing (EAGAIN: an event is
                        // pending; ENOENT: no registered mapping there at
                        // this moment, an mremap or munmap under way): the
                        // events first, then this run again as it is due
                        // then. An ENOENT twice at one address with no
                        // event between: nothing there to fill any more.
                        Some(e @ (libc::EAGAIN | libc::ENOENT)) => {
                            let at = start + done * PAGE;
                            if e == libc::ENOENT && self.last_enoent == Some(at) {
                                self.last_enoent = None;
                                done = n;
                                continue;
                            }
                            if e == libc::ENOENT {
                                self.last_enoent = Some(at);
                            }
                            let copied = c.copy.max(0) as u64 / PAGE;
                            self.copied(copied);
                            let rest: Vec<_> = runs[i..]
                                .iter()
                                .map(|&(s, (sr, m))| {
                                    let skip = if s == start { done + copied } else { 0 };
                                    (s + skip * PAGE, (sr + skip * PAGE, m - skip))
                                })
                                .filter(|r| r.1 .1 > 0)
                                .collect();
                            for (s, v) in rest {
                                self.targets[t].due.insert(s, v);
                            }
                            return Ok(());
                        }
                        // The process is gone (exited, or replaced its
                        // memory): nothing more is due to it.
                        Some(libc::ESRCH) => {
                            self.targets[t].due.clear();
                            return Ok(());
                        }
                        _ => {
                            return Err(RestoreError::Syscall {
                                call: format!(
                                    "UFFDIO_COPY at {:#x} (lazy restore)",
                                    start + done * PAGE
                                ),
                                err,
                            })
                        }
                    }
                }
                self.copied(k);
                done += k;
            }
        }
        Ok(())
    }

    /// The pages of fill `f`'s chunk (its checksums checked).
    fn chunk(&mut self, f: usize) -> Result<&[u8], RestoreError> {
        if self.cached.as_ref().is_none_or(|c| c.0 != f) {
            let data = read::load(&self.chain, &self.chain.fills()[f])
                .map_err(|what| RestoreError::PageData { what })?;
            self.cached = Some((f, data));
        }
        let (_, data) = self.cached.as_ref().expect("cached");
        Ok(data.bytes(&self.chain))
    }
}
