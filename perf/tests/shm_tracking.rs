//! Shared memory along a chain: a 256 MiB memfd (larger than images could
//! hold before format 1.11) and shared anonymous memory, checkpointed by a
//! tracked session. The first checkpoint stores them whole; the next ones
//! store only the pages whose contents changed. Every checkpoint of the
//! chain, and the chain compacted, restores exactly the contents the
//! process had (it checks every page itself).

use std::{
    path::Path,
    process::{Command, Stdio},
};

use cr_ebpf_checkpoint::{compact, Changes, Method, Session, SessionOptions};
use cr_ebpf_image::{Chain, SHMEM_PAGES, SHMEM_PAGES_END};
use cr_ebpf_perf::{spawn_clean, stop, wait_for_file, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const WORKLOAD: &str = r#"
import mmap, os, struct, sys, time
ctl = sys.argv[1]
MIB = 256
pages = (MIB << 20) // 4096
fd = os.memfd_create("cr-ebpf-shm-test")
os.ftruncate(fd, MIB << 20)
m = mmap.mmap(fd, MIB << 20, mmap.MAP_SHARED)
anon = mmap.mmap(-1, 8 << 20, mmap.MAP_SHARED)
chunk = bytearray(1 << 20)
for base in range(0, pages, 256):
    for j in range(256):
        struct.pack_into("<Q", chunk, j * 4096, base + j)
    m[base * 4096:(base + 256) * 4096] = chunk
expect, anon_expect, done = {}, {}, 0

def round_(k):
    for j in range(5):
        p = (k * 7919 + j * 104729) % pages
        expect[p] = 1_000_000 * k + p
        struct.pack_into("<Q", m, p * 4096, expect[p])
    q = (k * 13) % 2048
    anon_expect[q] = k
    struct.pack_into("<Q", anon, q * 4096, k)

def check():
    for p in range(pages):
        got = struct.unpack_from("<Q", m, p * 4096)[0]
        if got != expect.get(p, p):
            return f"bad memfd page {p}: {got}"
    if m[8:4096] != bytes(4088):
        return "bad memfd page 0 past its first word"
    for q in range(2048):
        got = struct.unpack_from("<Q", anon, q * 4096)[0]
        if got != anon_expect.get(q, 0):
            return f"bad shared anonymous page {q}: {got}"
    return f"ok {done}"

open(os.path.join(ctl, "ready"), "w").close()
while True:
    if os.path.exists(os.path.join(ctl, f"go-{done + 1}")):
        round_(done + 1)
        done += 1
        open(os.path.join(ctl, f"done-{done}"), "w").close()
    for name in os.listdir(ctl):
        if name.startswith("check-"):
            out = os.path.join(ctl, "result-" + name[6:])
            if not os.path.exists(out):
                with open(out + ".tmp", "w") as f:
                    f.write(check())
                os.rename(out + ".tmp", out)
    time.sleep(0.01)
"#;

/// Asks the process for its own check of every shared page.
fn check(ctl: &Path, name: &str) -> String {
    std::fs::write(ctl.join(format!("check-{name}")), "").unwrap();
    let out = ctl.join(format!("result-{name}"));
    wait_for_file(&out);
    std::fs::read_to_string(out).unwrap()
}

/// Pages of shared memory contents the image in `dir` stores itself.
fn shm_pages_stored(dir: &Path) -> u64 {
    let chain = Chain::open(dir).unwrap();
    chain.links()[0]
        .store
        .chunks()
        .iter()
        .filter(|c| (SHMEM_PAGES..SHMEM_PAGES_END).contains(&c.vaddr))
        .map(|c| c.npages as u64)
        .sum()
}

#[test]
fn shared_memory_is_stored_once_then_only_what_changed() {
    if !cr_ebpf_perf::privileged("shared_memory_is_stored_once_then_only_what_changed") {
        return;
    }
    let s = Scratch::new("shm-tracking");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", WORKLOAD])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    wait_for_file(&ctl.join("ready"));
    let images = s.0.join("images");
    let tracker = cr_ebpf_dirty_tracker::attach::attach(pid).expect("attach");
    let mut session =
        Session::new(pid, &images, Some(tracker), SessionOptions::default()).expect("session");
    session.prime().expect("prime");
    let full = session.checkpoint(&Changes::all()).expect("checkpoint 1");
    assert_eq!(full.method, Method::Full);
    let whole = shm_pages_stored(&full.dir);
    assert_eq!(
        whole, 65536,
        "the memfd whole, the untouched anonymous memory not at all"
    );

    let mut names = Vec::new();
    for k in 1..=2 {
        std::fs::write(ctl.join(format!("go-{k}")), "").unwrap();
        wait_for_file(&ctl.join(format!("done-{k}")));
        let r = session.checkpoint(&Changes::all()).expect("checkpoint");
        assert_eq!(r.method, Method::UffdWp);
        let stored = shm_pages_stored(&r.dir);
        eprintln!(
            "checkpoint {}: {} shared memory pages stored, {} bytes of pages, freeze {:?}",
            r.name, stored, r.page_bytes, r.freeze
        );
        // Five memfd pages and one anonymous page were written.
        assert!((2..=6).contains(&stored), "{stored} pages stored");
        let m = cr_ebpf_image::Manifest::read(&r.dir).unwrap();
        assert!(m.shmem.iter().filter(|o| o.base != 0).all(|o| o.inherits));
        names.push(r.name);
    }
    drop(session);
    stop(pid);
    let _ = child.wait();

    let back = restore(&images, &RestoreOptions::default()).expect("restore of the newest");
    assert_eq!(back.pid, pid);
    assert_eq!(check(&ctl, "newest"), "ok 2");
    stop(back.pid);

    // Restored to before round 2, the process must not run it again.
    std::fs::remove_file(ctl.join("go-2")).unwrap();
    let opts = RestoreOptions {
        checkpoint: Some(names[0].clone()),
        ..RestoreOptions::default()
    };
    let back = restore(&images, &opts).expect("restore of the one before");
    assert_eq!(check(&ctl, "older"), "ok 1");
    stop(back.pid);

    compact(&images, &names[1], 0).expect("compact");
    // The memfd and the two anonymous pages written, in one image.
    assert_eq!(shm_pages_stored(&images.join(&names[1])), whole + 2);
    let back = restore(&images, &RestoreOptions::default()).expect("restore compacted");
    assert_eq!(check(&ctl, "compacted"), "ok 2");
    stop(back.pid);
}
