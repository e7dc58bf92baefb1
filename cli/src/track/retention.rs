//! Retention of `track`: the chain kept to the newest `--keep` checkpoints,
//! those younger than `--keep-for` and within `--max-disk`, older ones
//! merged away in batches on a background thread at the lowest priority.

use super::Service;

impl Service {
    /// Merges old checkpoints away in the background once there are 2K,
    /// or once some are older than `--keep-for`.
    pub(super) fn retain(&mut self, wait: bool) {
        if self.keep.is_none() && self.keep_for.is_none() && self.max_disk.is_none() {
            return;
        }
        if let Some(h) = self.retention.take() {
            if wait || h.is_finished() {
                let _ = h.join();
            } else {
                self.retention = Some(h);
                return;
            }
        }
        let dir = self.session.dir().to_path_buf();
        let list = cr_ebpf_image::images_dir::list(&dir).unwrap_or_default();
        let count = list.len();
        // Those young enough for --keep-for (by when they were published).
        let young = self.keep_for.map(|age| {
            list.iter()
                .filter(|e| {
                    std::fs::metadata(&e.dir)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|d| d <= age))
                })
                .count()
                .max(1)
        });
        let fitting = self.max_disk.and_then(|b| fitting(&list, b));
        let Some(keep) = [self.keep, young, fitting].into_iter().flatten().min() else {
            return;
        };
        // In batches too: once as many are too old as are young enough, or
        // at once when over the disk budget.
        let aged = young.is_some_and(|y| count >= 2 * y);
        if count < 2 * keep.max(1) && !aged && !wait && fitting.is_none() {
            return;
        }
        if count <= keep {
            if let (Some(b), Some(_)) = (self.max_disk, fitting) {
                eprintln!(
                    "cr-ebpf: retention: the newest checkpoint alone is over half of --max-disk \
                     ({} MiB): the images directory may stay above it",
                    b >> 20
                );
            }
            return;
        }
        self.retention = Some(std::thread::spawn(move || {
            background_priority();
            match cr_ebpf_checkpoint::retain(&dir, keep, 1) {
                Ok(r) if !r.deleted.is_empty() => eprintln!(
                    "cr-ebpf: retention: {} deleted, {} kept{}",
                    r.deleted.len(),
                    r.kept.len(),
                    r.compacted
                        .map(|c| format!(
                            ", {} compacted from {} images in {:.0} ms",
                            c.name,
                            c.chain_len,
                            c.took.as_secs_f64() * 1e3
                        ))
                        .unwrap_or_default()
                ),
                Ok(_) => {}
                Err(e) => eprintln!("cr-ebpf: retention failed (checkpoints kept): {e}"),
            }
        }));
    }
}

/// With a disk budget of `budget` bytes that the checkpoints of `list`
/// (oldest first) take more than: how many of the newest fit in half of it
/// (at least one). `None` while within the budget.
fn fitting(list: &[cr_ebpf_image::images_dir::Entry], budget: u64) -> Option<usize> {
    let sizes: Vec<u64> = list
        .iter()
        .map(|e| cr_ebpf_image::images_dir::size_on_disk(&e.dir))
        .collect();
    if sizes.iter().sum::<u64>() <= budget {
        return None;
    }
    let mut sum = 0;
    let n = sizes
        .iter()
        .rev()
        .take_while(|&&s| {
            sum += s;
            sum <= budget / 2
        })
        .count();
    Some(n.max(1))
}

/// Lowest CPU and idle I/O priority for the calling thread: compaction
/// must not compete with the tracked process or the next freeze.
fn background_priority() {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        );
    }
}
