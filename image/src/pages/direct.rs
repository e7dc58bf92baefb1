//! Writing a page store past the page cache (`O_DIRECT`): bytes gathered
//! into aligned blocks, written by threads of their own (several blocks in
//! flight) while the next fills. A large store made this way costs no
//! page-cache pages and no write-back work; on a machine whose fresh memory
//! is slow to get (a virtual machine whose host takes freed memory back)
//! that was most of a buffered write's time, and its variance.

use crate::aligned::Aligned;
use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

/// Bytes of a block: one write.
const BLOCK: usize = 2 << 20;
/// Alignment of an `O_DIRECT` write's buffer, offset and length.
const ALIGN: usize = 4096;
/// Blocks in flight at once (one per thread).
const WRITERS: usize = 8;

/// A block to write: its buffer, file offset and length (aligned).
type Job = (Aligned, u64, usize);

/// Appends bytes to a file from an aligned offset on, with `O_DIRECT`.
pub(super) struct DirectSink {
    block: Aligned,
    /// Bytes of `block` used.
    fill: usize,
    /// File offset of `block`.
    at: u64,
    jobs: Option<crossbeam_channel::Sender<Job>>,
    free: crossbeam_channel::Receiver<Aligned>,
    threads: Vec<JoinHandle<()>>,
    /// Blocks made so far (made as they are needed, at most one more
    /// than there are threads).
    blocks: usize,
    /// The first write that failed.
    error: Arc<Mutex<Option<io::Error>>>,
}

impl DirectSink {
    /// Opens `path` a second time with `O_DIRECT`, to write from offset
    /// `at` (a multiple of the page size) on. `None` where the file system
    /// does not take `O_DIRECT` (tmpfs).
    pub(super) fn open(path: &Path, at: u64) -> Option<Self> {
        if !(at as usize).is_multiple_of(ALIGN) {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let file = Arc::new(file);
        let (jobs, todo) = crossbeam_channel::bounded::<Job>(WRITERS);
        let (done, free) = crossbeam_channel::unbounded::<Aligned>();
        let error = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        for i in 0..WRITERS {
            let (todo, done, file, error) =
                (todo.clone(), done.clone(), file.clone(), error.clone());
            let t = std::thread::Builder::new()
                .name(format!("page-writer-{i}"))
                .spawn(move || {
                    for (b, at, len) in todo {
                        if let Err(e) = file.write_all_at(&b.bytes()[..len], at) {
                            let mut slot = error.lock().unwrap_or_else(|e| e.into_inner());
                            slot.get_or_insert(e);
                        }
                        let _ = done.send(b);
                    }
                });
            match t {
                Ok(t) => threads.push(t),
                Err(_) => return None,
            }
        }
        Some(Self {
            block: Aligned::new(BLOCK),
            fill: 0,
            at,
            blocks: 1,
            jobs: Some(jobs),
            free,
            threads,
            error,
        })
    }

    /// The first write error, taken.
    fn failed(&self) -> io::Result<()> {
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Appends `bytes`.
    pub(super) fn push(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(BLOCK - self.fill);
            self.block.bytes_mut()[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == BLOCK {
                self.failed()?;
                let next = match self.free.try_recv() {
                    Ok(b) => b,
                    Err(_) if self.blocks <= WRITERS => {
                        self.blocks += 1;
                        Aligned::new(BLOCK)
                    }
                    Err(_) => self
                        .free
                        .recv()
                        .map_err(|_| io::Error::other("the page writer threads are gone"))?,
                };
                let full = std::mem::replace(&mut self.block, next);
                self.send(full, BLOCK)?;
                self.at += BLOCK as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    fn send(&self, b: Aligned, len: usize) -> io::Result<()> {
        let jobs = self.jobs.as_ref().expect("sending before finish");
        jobs.send((b, self.at, len))
            .map_err(|_| io::Error::other("the page writer threads are gone"))
    }

    /// Writes what is left, the last partial page through `buffered` (the
    /// same file opened without `O_DIRECT`), and waits for every write.
    pub(super) fn finish(mut self, buffered: &File) -> io::Result<()> {
        let aligned = self.fill / ALIGN * ALIGN;
        let tail = self.block.bytes()[aligned..self.fill].to_vec();
        let last = std::mem::replace(&mut self.block, Aligned::new(ALIGN));
        if aligned > 0 {
            self.send(last, aligned)?;
        }
        drop(self.jobs.take());
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        self.failed()?;
        buffered.write_all_at(&tail, self.at + aligned as u64)
    }
}

impl Drop for DirectSink {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}
