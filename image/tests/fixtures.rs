//! Images written by older versions of this crate still decode, with the
//! same content.
//!
//! `tests/fixtures/` holds real files, each written by the image crate of
//! the commit named below through its public API (`Manifest::write`,
//! `PageWriter`, `Tree::write`), not made by hand:
//!
//! * `1.1/` (commit c388683, format 1.1): one process image; files,
//!   a device, a pipe, inherited stdio; a CHAIN section.
//! * `1.2/` (commit f1d6c37, the last one writing 1.2): a tree image of
//!   process 4100, its child 4101 and a zombie 4103. 4100 holds every
//!   descriptor kind of 1.2 (epoll, eventfd, timerfd, signalfd, a unix
//!   socket pair end, a TCP connection, inotify, memfd, pidfd) and shared
//!   memory of each kind (anonymous, memfd, System V), a POSIX timer and
//!   two threads.
//! * `1.3/` (commit 97cdbb4, the last one writing 1.3): an images
//!   directory: `ckpt-000001` is 4100 alone (full), `ckpt-000002` a tree of
//!   4100 (incremental on `ckpt-000001`) and its new child 4101, which names
//!   the tmpfs file 4100 stores (stored *elsewhere*).

use std::path::{Path, PathBuf};

use cr_ebpf_image::{
    images_dir,
    pages::PAGE,
    tree::{Tree, TreeProcess},
    Chain, ChainInfo, EpollItem, FdKind, FdState, InotifyWatch, Manifest, MappingKind, PosixTimer,
    ShmemKind, ShmemObject, SockOpt, SocketInfo, TcpRepair, MAP_INHERITS,
};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The format version in a file's header.
fn version(path: &Path) -> (u16, u16) {
    let b = std::fs::read(path).unwrap();
    (
        u16::from_le_bytes([b[8], b[9]]),
        u16::from_le_bytes([b[10], b[11]]),
    )
}

/// The first byte of each page of the image's first mapping, resolved
/// through its chain: (page index, byte).
fn resolved(image: &Path) -> Vec<(u64, u8)> {
    let chain = Chain::open(image).unwrap();
    let start = chain.manifest().mappings[0].start;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for f in chain.fills() {
        chain
            .read(
                f,
                &mut buf,
                |addr, bytes| {
                    for (i, p) in bytes.chunks(PAGE).enumerate() {
                        assert!(p.iter().all(|&x| x == p[0]));
                        out.push(((addr - start) / PAGE as u64 + i as u64, p[0]));
                    }
                    Ok::<(), String>(())
                },
                |e| e,
            )
            .unwrap();
    }
    out.sort_unstable();
    out
}

fn chain(id: &str, parent: &str, seq: u64, method: &str) -> Option<ChainInfo> {
    Some(ChainInfo {
        id: id.into(),
        parent: parent.into(),
        seq,
        method: method.into(),
    })
}

fn unix_socket(inode: u64, peer: u64, queue: &[&[u8]]) -> FdState {
    FdState::Socket(Box::new(SocketInfo {
        family: 1,
        sock_type: 1,
        inode,
        peer_inode: peer,
        queue: queue.iter().map(|q| q.to_vec()).collect(),
        options: vec![SockOpt {
            level: 1,
            name: 16,
            value: 1i32.to_le_bytes().to_vec(),
        }],
        ..Default::default()
    }))
}

/// What every fixture's process 4100 has in common, whatever the version.
fn check_common(m: &Manifest) {
    let p = &m.process;
    assert_eq!(p.pid, 4100);
    assert_eq!(p.exe, "/usr/bin/fixture");
    assert_eq!(p.mm[0], 0x40_0000);
    assert_eq!(p.mm[10], 0x40_a000);
    assert_eq!(p.auxv.len(), 16);
    assert_eq!(p.taken_unix_ns, 1_700_000_000_000_000_000);
    assert_eq!(p.umask, 0o022);
    assert_eq!(p.cwd, "/srv/fixture");
    assert_eq!(p.rlimits, [(8 << 20, u64::MAX), (1024, 4096)]);
    assert_eq!(p.sigactions.len(), 1);
    assert_eq!(p.sigactions[0].signo, 10);
    assert_eq!(p.sigactions[0].handler, 0x5555_0000_1000);
    assert_eq!(p.itimers, [(0, 0), (1000, 500), (0, 0)]);
    assert_eq!(p.pending, [vec![3; 128]]);
    assert_eq!(p.creds, [1000, 1000, 1000, 1000, 100, 100, 100, 100]);
    let t = &m.threads[0];
    assert_eq!(t.tid, 4100);
    assert_eq!(t.comm, "fixture");
    assert_eq!(t.regs, vec![1; 216]);
    assert_eq!(t.xstate.len(), 576);
    assert_eq!((t.rseq.1, t.rseq.2), (32, 0x5305_3053));
    assert_eq!(t.sigaltstack, (0x7f00_0000_4000, 0, 8192));
    let first = &m.mappings[0];
    assert_eq!(
        (first.start, first.end, first.kind),
        (0x10000, 0x12000, MappingKind::Anon)
    );
    let file = &m.mappings[1];
    assert_eq!(file.kind, MappingKind::File);
    assert_eq!(file.path, "/usr/bin/fixture");
    assert_eq!((file.offset, file.inode), (0x1000, 99));
    let kinds: Vec<FdKind> = m.fds.iter().take(5).map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [
            FdKind::Inherited,
            FdKind::CharDevice,
            FdKind::File,
            FdKind::Pipe,
            FdKind::Pipe
        ]
    );
    assert!(m.fds.iter().take(5).all(|f| f.state == FdState::None));
    assert_eq!(m.fds[1].path, "/dev/null");
    let log = &m.fds[2];
    assert_eq!(log.path, "/srv/fixture/log");
    assert_eq!(
        (log.flags, log.pos, log.inode, log.size),
        (0o102001, 77, 55, 77)
    );
    assert_eq!(log.mtime_ns, 1_699_999_999_000_000_000);
    assert_eq!(m.fds[3].data, b"unread");
    assert_eq!(m.fds[3].pipe_size, 65536);
    assert!(m.fds[4].data.is_empty());
    assert!(!m.fds[0].cloexec && m.fds[3].cloexec);
}

/// Process 4100 of 1.2 and 1.3: descriptors of every kind, shared memory,
/// a POSIX timer, the clocks, two threads.
fn check_rich(m: &Manifest) {
    check_common(m);
    let p = &m.process;
    assert_eq!(
        p.posix_timers,
        [PosixTimer {
            id: 2,
            clockid: 1,
            notify: 4,
            signo: 12,
            value: 0xabc,
            tid: 4102,
            remaining_ns: 39_000_000_000,
            interval_ns: 3_000_000_000,
        }]
    );
    assert_eq!(p.monotonic_ns, 123_456_789_000);
    assert_eq!(p.boottime_ns, 123_999_000_000);
    assert_eq!(p.boot_id, "5c3f0e61-1d5e-4a8e-9b0b-7d1f2d6f9b11");
    assert_eq!(m.threads.len(), 2);
    assert_eq!(m.threads[0].rseq.0, 0x7f00_0000_1000 + 4100);
    assert_eq!(
        (m.threads[1].tid, m.threads[1].comm.as_str()),
        (4102, "worker")
    );
    let shm: Vec<(u64, u64)> = m
        .mappings
        .iter()
        .filter(|m| m.kind == MappingKind::Shmem)
        .map(|m| (m.start, m.inode))
        .collect();
    assert_eq!(shm[..2], [(0x7000_0000, 1032), (0x7000_2000, 3000)]);
    let tail: Vec<MappingKind> = m.mappings.iter().rev().take(3).map(|m| m.kind).collect();
    assert_eq!(
        tail,
        [MappingKind::Vdso, MappingKind::Vvar, MappingKind::Stack]
    );
    assert!(m.mappings.iter().any(|m| m.kind == MappingKind::Heap));

    let kinds: Vec<FdKind> = m.fds.iter().skip(5).map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [
            FdKind::Epoll,
            FdKind::EventFd,
            FdKind::TimerFd,
            FdKind::SignalFd,
            FdKind::Socket,
            FdKind::Socket,
            FdKind::Inotify,
            FdKind::Memfd,
            FdKind::Pidfd
        ]
    );
    let states: Vec<&FdState> = m.fds.iter().skip(5).map(|f| &f.state).collect();
    let tcp = FdState::Socket(Box::new(SocketInfo {
        family: 2,
        sock_type: 1,
        protocol: 6,
        local: vec![2, 0, 0x1f, 0x90, 127, 0, 0, 1],
        peer: vec![2, 0, 0xc0, 0x01, 127, 0, 0, 1],
        tcp: Some(TcpRepair {
            send_seq: 1000,
            recv_seq: u32::MAX,
            send_queue: b"abcdef".to_vec(),
            unsent: 2,
            recv_queue: b"xyz".to_vec(),
            mss: 65483,
            timestamp: 3_149_598_432,
            options: 7,
            snd_wscale: 10,
            rcv_wscale: 9,
            window: [1, 2, 3, 4, 5],
            state: 0,
        }),
        ..Default::default()
    }));
    let expected = [
        FdState::Epoll(vec![
            EpollItem {
                fd: 6,
                events: 1,
                data: 0xfeed,
                source: None,
            },
            EpollItem {
                fd: 9,
                events: 0x8000_0001,
                data: 9,
                source: None,
            },
        ]),
        FdState::EventFd {
            count: 5,
            semaphore: true,
        },
        FdState::TimerFd {
            clockid: 1,
            abstime: false,
            value_ns: 8_999_837_282,
            interval_ns: 2_500_000_000,
            ticks: 3,
        },
        FdState::SignalFd {
            mask: 0x2_0000_4200,
        },
        unix_socket(77, 78, &[b"hello", b"again"]),
        tcp,
        FdState::Inotify(vec![
            InotifyWatch {
                wd: 1,
                mask: 0x100,
                path: "/srv/fixture".into(),
                ino: 54,
                dev: 8 << 32 | 1,
            },
            InotifyWatch {
                wd: 3,
                mask: 0x2,
                path: "/etc/hosts".into(),
                ino: 12,
                dev: 8 << 32 | 1,
            },
        ]),
        FdState::Memfd { id: 2001 },
        FdState::Pidfd { pid: 4101 },
    ];
    assert_eq!(states, expected.iter().collect::<Vec<_>>());
    assert_eq!(
        m.fds.iter().map(|f| f.fd).collect::<Vec<_>>(),
        (0..14).collect::<Vec<_>>()
    );

    assert_eq!(
        m.shmem[..3],
        [
            ShmemObject {
                id: 1032,
                kind: ShmemKind::Anonymous,
                size: 8192,
                data: vec![(0, b"anon shared".to_vec())],
                ..Default::default()
            },
            ShmemObject {
                id: 2001,
                kind: ShmemKind::Memfd,
                name: "buf".into(),
                size: 8192,
                seals: 0x6,
                data: vec![(4096, b"world".to_vec())],
                ..Default::default()
            },
            ShmemObject {
                id: 3000,
                kind: ShmemKind::SysV,
                key: 0x1234,
                mode: 0o600,
                size: 4096,
                data: vec![(0, b"sysv".to_vec())],
                ..Default::default()
            },
        ]
    );
}

/// The child 4101 of 1.2 and 1.3: the other end of the socket pair.
fn check_child(m: &Manifest) {
    assert_eq!(m.process.pid, 4101);
    assert!(m.process.posix_timers.is_empty());
    assert_eq!(m.threads.len(), 1);
    assert_eq!(m.threads[0].comm, "child");
    let kinds: Vec<FdKind> = m.fds.iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [
            FdKind::Inherited,
            FdKind::Inherited,
            FdKind::Inherited,
            FdKind::Socket,
            FdKind::EventFd
        ]
    );
    assert_eq!(m.fds[3].state, unix_socket(78, 77, &[]));
    assert_eq!(
        m.fds[4].state,
        FdState::EventFd {
            count: 1,
            semaphore: false
        }
    );
}

#[test]
fn a_format_1_1_image_decodes() {
    let dir = fixture("1.1");
    assert_eq!(version(&dir.join(cr_ebpf_image::MANIFEST_FILE)), (1, 1));
    let m = Manifest::read(&dir).unwrap();
    check_common(&m);
    assert_eq!(m.fds.len(), 5);
    assert_eq!(m.threads.len(), 1);
    assert!(m.shmem.is_empty());
    // Absent before 1.2.
    assert!(m.process.posix_timers.is_empty());
    assert_eq!((m.process.monotonic_ns, m.process.boottime_ns), (0, 0));
    assert!(m.process.boot_id.is_empty());
    let kinds: Vec<MappingKind> = m.mappings.iter().map(|m| m.kind).collect();
    assert_eq!(
        kinds,
        [
            MappingKind::Anon,
            MappingKind::File,
            MappingKind::Heap,
            MappingKind::Stack,
            MappingKind::Vvar,
            MappingKind::Vdso
        ]
    );
    assert_eq!(m.chain, chain("ckpt-000001", "", 1, "full"));
    assert_eq!(resolved(&dir), [(0, 0x11), (1, 0x22)]);
    // Written again, it reads back the same (in the current format).
    let re = Manifest::decode(&m.encode(), 32).unwrap();
    assert_eq!(re, m);
}

#[test]
fn a_format_1_2_tree_decodes() {
    let dir = fixture("1.2");
    assert_eq!(version(&dir.join("tree.img")), (1, 2));
    let tree = Tree::read(&dir).unwrap();
    let p = |pid, ppid, zombie: Option<i32>| TreeProcess {
        pid,
        ppid,
        pgid: 4100,
        sid: 4000,
        zombie,
        dir: if zombie.is_some() {
            String::new()
        } else {
            format!("proc-{pid}")
        },
        shares_files: false,
    };
    assert_eq!(
        tree.processes,
        [
            p(4100, 0, None),
            p(4101, 4100, None),
            p(4103, 4100, Some(7 << 8))
        ]
    );
    let root = dir.join("proc-4100");
    assert_eq!(version(&root.join(cr_ebpf_image::MANIFEST_FILE)), (1, 2));
    let m = Manifest::read(&root).unwrap();
    check_rich(&m);
    assert_eq!(m.shmem.len(), 3);
    assert_eq!(m.chain, chain("ckpt-000001", "", 1, "full"));
    assert_eq!(resolved(&root), [(0, 0x11), (1, 0x22)]);
    let re = Manifest::decode(&m.encode(), 32).unwrap();
    assert_eq!(re, m);

    let child = Manifest::read(&dir.join("proc-4101")).unwrap();
    check_child(&child);
    assert!(child.shmem.is_empty());
    assert_eq!(resolved(&dir.join("proc-4101")), [(0, 0x33)]);
    assert_eq!(
        images_dir::processes(&dir)
            .unwrap()
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        [4100, 4101]
    );
}

#[test]
fn a_format_1_3_images_directory_decodes() {
    let dir = fixture("1.3");
    let names: Vec<String> = images_dir::list(&dir)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["ckpt-000001", "ckpt-000002"]);
    let one = dir.join("ckpt-000001");
    assert_eq!(version(&one.join(cr_ebpf_image::MANIFEST_FILE)), (1, 3));
    let m = Manifest::read(&one).unwrap();
    check_rich(&m);
    assert_eq!(m.chain, chain("ckpt-000001", "", 1, "full"));
    let tmpfs = ShmemObject {
        id: 4000,
        kind: ShmemKind::TmpfsFile,
        name: "/dev/shm/fixture".into(),
        mode: 0o640,
        size: 4096,
        data: vec![(0, b"tmpfs".to_vec())],
        ..Default::default()
    };
    assert_eq!(m.shmem[3..], [tmpfs.clone()][..]);
    assert!(m
        .mappings
        .iter()
        .any(|m| m.kind == MappingKind::Shmem && m.inode == 4000 && m.path == "/dev/shm/fixture"));
    assert_eq!(resolved(&one), [(0, 0x11), (1, 0x22)]);

    let two = dir.join("ckpt-000002");
    assert_eq!(version(&two.join("tree.img")), (1, 3));
    assert_eq!(images_dir::root_pid(&two).unwrap(), 4100);
    assert_eq!(images_dir::parents(&two).unwrap(), ["ckpt-000001"]);
    let root = two.join("proc-4100");
    let m = Manifest::read(&root).unwrap();
    check_rich(&m);
    assert_eq!(m.chain, chain("ckpt-000002", "ckpt-000001", 2, "uffd-wp"));
    assert_ne!(m.mappings[0].flags & MAP_INHERITS, 0);
    assert_eq!(m.mappings[0].pages_stored, 1);
    // Page 0 from ckpt-000001, page 1 stored here.
    assert_eq!(resolved(&root), [(0, 0x11), (1, 0x44)]);
    let re = Manifest::decode(&m.encode(), 32).unwrap();
    assert_eq!(re, m);

    let child = Manifest::read(&two.join("proc-4101")).unwrap();
    check_child(&child);
    assert_eq!(child.chain, chain("ckpt-000002", "", 2, "full"));
    assert_eq!(
        child.shmem,
        [ShmemObject {
            data: Vec::new(),
            elsewhere: true,
            ..tmpfs
        }]
    );
    assert_eq!(resolved(&two.join("proc-4101")), [(0, 0x33)]);
}

/// A scratch directory, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("cr-ebpf-fixture-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the manifest of image `rel` into `dir` with `patch` applied to
/// the body of every section (tag, body), checksums made right again: only
/// the decoder can object.
fn patched_copy(rel: &str, dir: &Path, mut patch: impl FnMut(u16, &mut [u8])) {
    let mut b = std::fs::read(fixture(rel).join(cr_ebpf_image::MANIFEST_FILE)).unwrap();
    let mut at = 32;
    while at < b.len() {
        let tag = u16::from_le_bytes([b[at], b[at + 1]]);
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        patch(tag, &mut b[at + 8..at + 8 + len]);
        at += 8 + len;
    }
    let crc = crc32fast::hash(&b[32..]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32fast::hash(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.join(cr_ebpf_image::MANIFEST_FILE), b).unwrap();
}

/// Sets the kind (`u16` after the `i32` number) of descriptor `fd`.
fn set_fd_kind(fd: i32, kind: u16) -> impl FnMut(u16, &mut [u8]) {
    move |tag, body| {
        if tag == 4 && body[0..4] == fd.to_le_bytes() {
            body[4..6].copy_from_slice(&kind.to_le_bytes());
        }
    }
}

#[test]
fn an_old_descriptor_with_the_state_of_another_kind_is_refused() {
    for (rel, version) in [("1.2/proc-4100", "1.2"), ("1.3/ckpt-000001", "1.3")] {
        let d = Scratch::new(&format!("mismatch-{version}"));
        // Descriptor 8 is a signalfd: call it a timerfd.
        patched_copy(rel, &d.0, set_fd_kind(8, FdKind::TimerFd as u16));
        let e = Manifest::read(&d.0).unwrap_err().to_string();
        assert!(
            e.contains("descriptor 8 of kind TimerFd with the state of another kind"),
            "{e}"
        );
        // Descriptor 2 is a file without state: call it a socket.
        patched_copy(rel, &d.0, set_fd_kind(2, FdKind::Socket as u16));
        let e = Manifest::read(&d.0).unwrap_err().to_string();
        assert!(e.contains("descriptor 2 of kind Socket"), "{e}");
        // And the other way round: the pidfd (13) called a file.
        patched_copy(rel, &d.0, set_fd_kind(13, FdKind::File as u16));
        let e = Manifest::read(&d.0).unwrap_err().to_string();
        assert!(e.contains("descriptor 13 of kind File"), "{e}");
    }
}

#[test]
fn unknown_values_in_an_old_image_name_its_version() {
    let d = Scratch::new("unknown");
    patched_copy("1.2/proc-4100", &d.0, set_fd_kind(3, 13));
    let e = Manifest::read(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("unknown descriptor kind 13 (not defined in image format 1.2)"),
        "{e}"
    );
    // The kind of the first mapping (after start, end, prot, flags, offset).
    let mut first = true;
    patched_copy("1.1", &d.0, |tag, body| {
        if tag == 3 && std::mem::take(&mut first) {
            body[32..34].copy_from_slice(&77u16.to_le_bytes());
        }
    });
    let e = Manifest::read(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("unknown mapping kind 77 (not defined in image format 1.1)"),
        "{e}"
    );
    // A shared memory kind (after the u64 id).
    patched_copy("1.3/ckpt-000001", &d.0, |tag, body| {
        if tag == 7 {
            body[8..10].copy_from_slice(&5u16.to_le_bytes());
        }
    });
    let e = Manifest::read(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("unknown shared memory kind 5 (not defined in image format 1.3)"),
        "{e}"
    );
}

#[test]
fn old_images_are_written_again_in_the_current_format() {
    let d = Scratch::new("rewrite");
    for rel in [
        "1.1",
        "1.2/proc-4100",
        "1.2/proc-4101",
        "1.3/ckpt-000002/proc-4101",
    ] {
        let m = Manifest::read(&fixture(rel)).unwrap();
        m.write(&d.0).unwrap();
        let path = d.0.join(cr_ebpf_image::MANIFEST_FILE);
        assert_eq!(version(&path), (1, cr_ebpf_image::FORMAT_MINOR));
        assert_eq!(Manifest::read(&d.0).unwrap(), m);
        if rel == "1.1" {
            continue; // 1.2 added the clocks to PROCESS.
        }
        let old = std::fs::read(fixture(rel).join(cr_ebpf_image::MANIFEST_FILE)).unwrap();
        let new = std::fs::read(&path).unwrap();
        // Without a state tag and its length, 6 bytes less per descriptor
        // with state (format 1.4); 8 bytes more for the session and process
        // group at the end of PROCESS (format 1.5); 4 bytes more per
        // socket for its shutdown state and bound file (format 1.7); 20
        // bytes more per descriptor for its shared description and its
        // signal-driven I/O owner, 8 more per socket for its messages'
        // senders and pending connections (format 1.8), 8 more per socket
        // for its descriptors in flight and its filter, 4 bytes more per
        // epoll registration for where its file is open and per mapping
        // for its guard regions (format 1.9), 8 bytes more per shared
        // memory object that is not a deleted file for where its contents
        // are in the page store (format 1.11); otherwise the same.
        let with_state = m.fds.iter().filter(|f| f.state != FdState::None).count();
        let registrations: usize = m
            .fds
            .iter()
            .map(|f| match &f.state {
                FdState::Epoll(items) => items.len(),
                _ => 0,
            })
            .sum();
        let sockets = m
            .fds
            .iter()
            .filter(|f| matches!(f.state, FdState::Socket(_)))
            .count();
        let objects = m
            .shmem
            .iter()
            .filter(|o| o.kind != cr_ebpf_image::ShmemKind::DeletedFile)
            .count();
        assert_eq!(
            old.len() as i64 - new.len() as i64,
            6 * with_state as i64
                - 8
                - 20 * sockets as i64
                - 20 * m.fds.len() as i64
                - 4 * registrations as i64
                - 4 * m.mappings.len() as i64
                - 8 * objects as i64,
            "{rel}"
        );
    }
}
