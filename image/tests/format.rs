//! The image format against damaged and foreign input.

use std::path::Path;

use cr_ebpf_image::{
    pages::{self, Chunk, PageWriter, PAGE},
    publish, ImageError, Manifest, MappingInfo, MappingKind, ProcessInfo, ThreadInfo,
    MANIFEST_FILE, PAGES_FILE,
};

/// A scratch directory, removed when the test ends.
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("cr-ebpf-image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn manifest() -> Manifest {
    Manifest {
        process: ProcessInfo {
            pid: 42,
            exe: "/usr/bin/thing".into(),
            mm: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            auxv: vec![7; 64],
            taken_unix_ns: 123,
            freeze_ns: 456,
            umask: 0o022,
            personality: 0,
            cwd: "/srv".into(),
            rlimits: vec![(8 << 20, u64::MAX); 16],
            sigactions: vec![cr_ebpf_image::SigAction {
                signo: 10,
                handler: 0x5555_0000_1000,
                flags: 0x0400_0000,
                restorer: 0x7f00_0000_2000,
                mask: 0,
            }],
            itimers: [(0, 0), (1000, 500), (0, 0)],
            pending: vec![vec![3; 128]],
            creds: [1000, 1000, 1000, 1000, 100, 100, 100, 100],
            monotonic_ns: 123_456_789_000,
            boottime_ns: 123_999_000_000,
            boot_id: "5c3f0e61-1d5e-4a8e-9b0b-7d1f2d6f9b11".into(),
            sid: 4242,
            pgid: 4242,
            prctl: Some(cr_ebpf_image::Prctl {
                pdeath_signal: 15,
                dumpable: 1,
                thp_disabled: false,
                job_stop: 0,
            }),
            terminal: Some(cr_ebpf_image::Terminal {
                ctty: cr_ebpf_image::Ctty::Pty(4),
                shell_job: false,
                foreground: 4242,
            }),
            child_subreaper: false,
            oom_score_adj: 100,
            root: "/srv/jail".into(),
            membarrier: 0x10,
            membership: cr_ebpf_image::Membership {
                cgroups: vec![cr_ebpf_image::Cgroup {
                    controllers: "name=systemd".into(),
                    path: "/user.slice".into(),
                }],
                thread_cgroups: Vec::new(),
                uts: Some(cr_ebpf_image::Uts {
                    ns: 4026532000,
                    hostname: "restored".into(),
                    domainname: "(none)".into(),
                }),
                ipc: Some(cr_ebpf_image::IpcNs {
                    ns: 4026532001,
                    sysctls: vec![("kernel/msgmni".into(), "32000".into())],
                    sem: vec![cr_ebpf_image::SysvSem {
                        perm: cr_ebpf_image::IpcPerm {
                            key: 99,
                            id: 3,
                            mode: 0o640,
                            uid: 0,
                            gid: 0,
                        },
                        values: vec![4, 5],
                    }],
                    ..Default::default()
                }),
            },
            posix_timers: vec![cr_ebpf_image::PosixTimer {
                id: 2,
                clockid: 7,
                notify: 4,
                signo: 12,
                value: 0xabc,
                tid: 4243,
                remaining_ns: 39_000_000_000,
                interval_ns: 3_000_000_000,
            }],
            cgroup_dirs: vec![cr_ebpf_image::CgroupDir {
                controllers: "devices".into(),
                path: "/app/sub".into(),
                owner: cr_ebpf_image::Owner {
                    mode: 0o755,
                    uid: 1000,
                    gid: 1000,
                },
                files: vec![("cgroup.procs".into(), cr_ebpf_image::Owner::default())],
                settings: vec![("devices.list".into(), "c 1:3 rwm\n".into())],
            }],
        },
        threads: vec![ThreadInfo {
            tid: 42,
            regs: vec![1; 216],
            xstate: vec![2; 1088],
            sigmask: 0x4000,
            rseq: (0x7000_1000, 32, 0x5305_3053),
            robust_list: (0x7000_2000, 24),
            clear_child_tid: 0x7000_3000,
            sigaltstack: (0x7000_4000, 0, 8192),
            pending: vec![vec![9; 128], vec![10; 128]],
            comm: "worker".into(),
            creds: Some(cr_ebpf_image::ThreadCreds {
                uids: [1000, 1000, 1000, 1000],
                gids: [100, 100, 100, 100],
                groups: vec![27, 100],
                caps: [0, 0, 0, (1 << 41) - 1, 0],
                securebits: 0,
                no_new_privs: true,
                loginuid: u32::MAX,
                seccomp_mode: 2,
                seccomp_filters: vec![cr_ebpf_image::SeccompFilter {
                    flags: 0,
                    prog: vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f],
                }],
            }),
            sched: Some(cr_ebpf_image::Sched {
                policy: 2,
                flags: cr_ebpf_image::SCHED_RESET_ON_FORK,
                nice: 0,
                priority: 3,
                slice_ns: 0,
            }),
        }],
        mappings: vec![
            MappingInfo {
                start: 0x1000,
                end: 0x3000,
                prot: 3,
                flags: 0,
                offset: 0,
                kind: MappingKind::Anon,
                path: String::new(),
                dev: 0,
                inode: 0,
                pages_stored: 2,
                guards: vec![(0x2000, 1)],
            },
            MappingInfo {
                start: 0x7000,
                end: 0x9000,
                prot: 5,
                flags: 0,
                offset: 0x2000,
                kind: MappingKind::File,
                path: "/usr/lib/x.so".into(),
                dev: 8 << 32 | 1,
                inode: 99,
                pages_stored: 0,
                guards: Vec::new(),
            },
        ],
        shmem: vec![cr_ebpf_image::ShmemObject {
            id: 1032,
            kind: cr_ebpf_image::ShmemKind::Memfd,
            name: "buf".into(),
            size: 8192,
            seals: 0x6,
            key: 0,
            mode: 0,
            data: vec![(4096, b"world".to_vec())],
            elsewhere: false,
            ..Default::default()
        }],
        locks: Vec::new(),
        cow: vec![cr_ebpf_image::CowRun {
            start: 0x2000,
            pages: 1,
        }],
        network_lock: Some("4242-1700000000000000000".into()),
        chain: Some(cr_ebpf_image::ChainInfo {
            id: "ckpt-000002".into(),
            parent: "ckpt-000001".into(),
            seq: 2,
            method: "uffd-wp".into(),
        }),
        fds: vec![
            cr_ebpf_image::FdInfo {
                fd: 3,
                kind: cr_ebpf_image::FdKind::Pipe,
                flags: 0,
                cloexec: true,
                pos: 0,
                path: "pipe:[123]".into(),
                inode: 123,
                dev: 0,
                size: 0,
                mtime_ns: 0,
                pipe_size: 65536,
                data: b"unread".to_vec(),
                state: cr_ebpf_image::FdState::None,
                desc: 0,
                owner: cr_ebpf_image::FileOwner {
                    kind: 1,
                    pid: 42,
                    signal: 10,
                },
            },
            cr_ebpf_image::FdInfo {
                fd: 4,
                kind: cr_ebpf_image::FdKind::Epoll,
                path: "anon_inode:[eventpoll]".into(),
                state: cr_ebpf_image::FdState::Epoll(vec![cr_ebpf_image::EpollItem {
                    fd: 5,
                    events: 1,
                    data: 0xfeed,
                    source: None,
                }]),
                ..Default::default()
            },
            cr_ebpf_image::FdInfo {
                fd: 5,
                kind: cr_ebpf_image::FdKind::Socket,
                path: "socket:[77]".into(),
                state: cr_ebpf_image::FdState::Socket(Box::new(cr_ebpf_image::SocketInfo {
                    family: 1,
                    sock_type: 5,
                    inode: 77,
                    peer_inode: 78,
                    queue: vec![b"hello".to_vec()],
                    ..Default::default()
                })),
                ..Default::default()
            },
        ],
    }
}

fn write_image(dir: &Path) -> Vec<u8> {
    manifest().write(dir).unwrap();
    let raw: Vec<u8> = (0..2 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = PageWriter::create(dir).unwrap();
    w.write(&Chunk::compress(0x1000, &raw)).unwrap();
    w.finish().unwrap();
    raw
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn round_trip() {
    let d = tempdir("roundtrip");
    let raw = write_image(&d);
    assert_eq!(Manifest::read(&d).unwrap(), manifest());
    let store = pages::PageStore::open(&d).unwrap();
    assert_eq!(store.chunks().len(), 1);
    assert_eq!(store.pages(), 2);
    let mut out = vec![0u8; 2 * PAGE];
    store.decompress_into(&store.chunks()[0], &mut out).unwrap();
    assert_eq!(out, raw);
}

#[test]
fn a_flipped_byte_in_a_chunk_is_refused() {
    let d = tempdir("flip");
    write_image(&d);
    // Inside the compressed data of the first chunk (header 32 + chunk
    // header 28): the chunk is refused when it is used (format 1.10 reads
    // a store once, checking each chunk as it goes).
    flip(&d.join(PAGES_FILE), 32 + 28 + 10);
    let store = pages::PageStore::open(&d).expect("headers intact");
    let mut out = vec![0u8; 2 * PAGE];
    let e = store
        .decompress_into(&store.chunks()[0], &mut out)
        .unwrap_err();
    assert!(e.contains("checksum mismatch"), "{e}");
    // In the chunk's header (its address): with the index, the store opens
    // from the index's copy and the chunk is refused when it is used...
    let d = tempdir("flip-header");
    write_image(&d);
    flip(&d.join(PAGES_FILE), 32 + 2);
    let store = pages::PageStore::open(&d).expect("headers from pages.idx");
    let e = store
        .decompress_into(&store.chunks()[0], &mut out)
        .unwrap_err();
    assert!(e.contains("header of the chunk"), "{e}");
    // ... and without it, when the store opens.
    std::fs::remove_file(d.join(cr_ebpf_image::PAGES_INDEX_FILE)).unwrap();
    let e = pages::PageStore::open(&d).err().unwrap().to_string();
    assert!(
        e.contains("corrupt image") && e.contains("chunk header checksum mismatch"),
        "{e}"
    );
    // A damaged index is not used: the headers are walked.
    let d = tempdir("flip-index");
    write_image(&d);
    flip(&d.join(cr_ebpf_image::PAGES_INDEX_FILE), 30);
    let store = pages::PageStore::open(&d).expect("walked");
    store
        .decompress_into(&store.chunks()[0], &mut out)
        .expect("intact");
}

#[test]
fn a_truncated_page_store_is_an_error() {
    let d = tempdir("trunc");
    write_image(&d);
    let p = d.join(PAGES_FILE);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    let e = pages::PageStore::open(&d).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn a_truncated_manifest_is_an_error() {
    let d = tempdir("truncm");
    write_image(&d);
    let p = d.join(MANIFEST_FILE);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 3]).unwrap();
    let e = Manifest::read(&d).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn unknown_versions_are_refused() {
    let d = tempdir("version");
    write_image(&d);
    for (major, minor) in [(2u16, 0u16), (1, cr_ebpf_image::FORMAT_MINOR + 1)] {
        let p = d.join(MANIFEST_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[8..10].copy_from_slice(&major.to_le_bytes());
        b[10..12].copy_from_slice(&minor.to_le_bytes());
        let crc = crc32(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, b).unwrap();
        let e = Manifest::read(&d).unwrap_err();
        assert!(matches!(e, ImageError::Version { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("image format {major}.{minor}")),
            "{e}"
        );
    }
}

#[test]
fn a_damaged_header_or_foreign_file_is_refused() {
    let d = tempdir("header");
    write_image(&d);
    flip(&d.join(MANIFEST_FILE), 17);
    let e = Manifest::read(&d).unwrap_err().to_string();
    assert!(e.contains("header checksum"), "{e}");
    std::fs::write(d.join(MANIFEST_FILE), b"hello, not an image at all, really").unwrap();
    let e = Manifest::read(&d).unwrap_err().to_string();
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn unknown_enum_values_are_errors() {
    let mut m = manifest();
    m.mappings.truncate(1);
    m.fds.clear();
    m.chain = None;
    m.shmem.clear();
    m.cow.clear();
    m.network_lock = None;
    m.mappings[0].guards.clear();
    let mut payload = m.encode();
    // The kind field of the only mapping: find its encoded u16 (1, Anon),
    // before its path, device, inode, pages and (empty) guard regions.
    let at = payload.len() - (4 + 8 + 8 + 8 + 4) - 2;
    payload[at..at + 2].copy_from_slice(&77u16.to_le_bytes());
    let e = Manifest::decode(&payload, 32).unwrap_err();
    assert!(e.what.contains("unknown mapping kind 77"), "{}", e.what);
}

#[test]
fn the_network_lock_round_trips_from_format_1_9_only() {
    let mut m = manifest();
    assert!(m.network_lock.is_some());
    // Shared memory objects are laid out otherwise before 1.11.
    m.shmem.clear();
    assert_eq!(Manifest::decode_version(&m.encode(), 32, 9).unwrap(), m);
    // Format 1.8 has no such section (nor other 1.9 fields): refused.
    assert!(Manifest::decode_version(&m.encode(), 32, 8).is_err());
    let mut none = manifest();
    none.network_lock = None;
    assert_eq!(Manifest::decode(&none.encode(), 32).unwrap(), none);
    for bad in ["", "../x", ".hidden", "a/b", "sp ace"] {
        let mut m = manifest();
        m.network_lock = Some(bad.into());
        let e = Manifest::decode(&m.encode(), 32).unwrap_err();
        assert!(e.what.contains("network lock name"), "{bad:?}: {}", e.what);
    }
}

#[test]
fn chain_sections_round_trip_and_inheriting_needs_a_parent() {
    let m = manifest();
    assert_eq!(Manifest::decode(&m.encode(), 32).unwrap(), m);
    let mut orphan = manifest();
    orphan.mappings[0].flags |= cr_ebpf_image::MAP_INHERITS;
    orphan.chain.as_mut().unwrap().parent.clear();
    let e = Manifest::decode(&orphan.encode(), 32).unwrap_err();
    assert!(e.what.contains("no parent"), "{}", e.what);
    let mut sneaky = manifest();
    sneaky.chain.as_mut().unwrap().parent = "../elsewhere".into();
    let e = Manifest::decode(&sneaky.encode(), 32).unwrap_err();
    assert!(e.what.contains("not a plain name"), "{}", e.what);
}

#[test]
fn publish_is_atomic_and_never_overwrites() {
    let base = tempdir("publish");
    let dest = base.join("img");
    // A failing writer leaves nothing behind.
    let r: Result<(), ImageError> = publish(&dest, |tmp| {
        std::fs::write(tmp.join("partial"), b"x").unwrap();
        Err(ImageError::Exists {
            path: "simulated failure".into(),
        })
    });
    assert!(r.is_err());
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(&base).unwrap().count(),
        0,
        "temp dir cleaned up"
    );
    publish(&dest, |tmp| {
        write_image(tmp);
        Ok(())
    })
    .unwrap();
    assert!(Manifest::read(&dest).is_ok());
    let e = publish(&dest, |_| Ok(())).unwrap_err();
    assert!(matches!(e, ImageError::Exists { .. }));
}

fn crc32(b: &[u8]) -> u32 {
    // Same polynomial as the format (CRC-32/ISO-HDLC), bitwise.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_damaged_chunk_with_a_consistent_file_checksum_is_still_caught() {
    let d = tempdir("chunkcrc");
    write_image(&d);
    let p = d.join(PAGES_FILE);
    let mut b = std::fs::read(&p).unwrap();
    b[32 + 28 + 10] ^= 0x40;
    // Recompute the whole-store checksum so only the chunk's own one differs.
    let crc = crc32(&b[32..]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32(&b[0..28]);
    b[28..32].copy_from_slice(&hcrc.to_le_bytes());
    std::fs::write(&p, b).unwrap();
    let store = pages::PageStore::open(&d).expect("the store as a whole checks out");
    let mut out = vec![0u8; 2 * PAGE];
    let e = store
        .decompress_into(&store.chunks()[0], &mut out)
        .unwrap_err();
    assert!(
        e.contains("checksum mismatch in the chunk of pages at 0x1000"),
        "{e}"
    );
}

/// A chunk's page address changed, and the store's checksums computed
/// again as someone crafting it would: the address is under the chunk
/// header's own checksum (format 1.10), so the store is refused instead of
/// restoring the pages at the wrong address (before 1.10 the address was
/// under no checksum but the file's).
#[test]
fn a_chunk_moved_to_another_address_is_refused_with_the_file_checksums_recomputed() {
    for keep_index in [false, true] {
        let d = tempdir(&format!("moved-{keep_index}"));
        write_image(&d);
        if !keep_index {
            std::fs::remove_file(d.join(cr_ebpf_image::PAGES_INDEX_FILE)).unwrap();
        }
        let p = d.join(PAGES_FILE);
        let mut b = std::fs::read(&p).unwrap();
        assert_eq!(b[32..40], 0x1000u64.to_le_bytes());
        b[32..40].copy_from_slice(&0x3000u64.to_le_bytes());
        let crc = crc32(&b[32..]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        let hcrc = crc32(&b[0..28]);
        b[28..32].copy_from_slice(&hcrc.to_le_bytes());
        std::fs::write(&p, b).unwrap();
        // Opened (headers walked: the index names the store as it was) and
        // used: refused either way, never pages at 0x3000.
        let used = pages::PageStore::open(&d)
            .map_err(|e| e.to_string())
            .and_then(|store| {
                let mut out = vec![0u8; 2 * PAGE];
                let c = &store.chunks()[0];
                store
                    .decompress_into(c, &mut out)
                    .map(|()| format!("{} pages at {:#x}", c.npages, c.vaddr))
            });
        let e = used.expect_err("a moved chunk was accepted");
        assert!(e.contains("chunk header checksum mismatch"), "{e}");
    }
}

/// Writes checkpoint `seq` of process `pid` into `dir` (a process image):
/// the first mapping's pages as `pages` (first page, bytes), inheriting the
/// rest from `parent` when there is one.
fn write_process(dir: &Path, pid: i32, seq: u64, parent: &str, pages: &[(u64, u8)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut m = manifest();
    m.process.pid = pid;
    m.threads.iter_mut().for_each(|t| t.tid = pid);
    m.chain = Some(cr_ebpf_image::ChainInfo {
        id: cr_ebpf_image::images_dir::checkpoint_name(seq),
        parent: parent.into(),
        seq,
        method: if parent.is_empty() { "full" } else { "uffd-wp" }.into(),
    });
    if !parent.is_empty() {
        m.mappings[0].flags |= cr_ebpf_image::MAP_INHERITS;
    }
    m.mappings[0].pages_stored = pages.len() as u64;
    m.write(dir).unwrap();
    let mut w = PageWriter::create(dir).unwrap();
    for &(page, byte) in pages {
        let addr = m.mappings[0].start + page * PAGE as u64;
        w.write(&Chunk::compress(addr, &vec![byte; PAGE])).unwrap();
    }
    w.finish().unwrap();
}

/// Writes a tree checkpoint of `pids` (the first is the root) into `dir`.
fn write_tree(dir: &Path, pids: &[i32]) {
    use cr_ebpf_image::tree::{Tree, TreeProcess};
    std::fs::create_dir_all(dir).unwrap();
    Tree {
        processes: pids
            .iter()
            .map(|&pid| TreeProcess {
                pid,
                ppid: if pid == pids[0] { 0 } else { pids[0] },
                pgid: pids[0],
                sid: pids[0],
                zombie: None,
                dir: format!("proc-{pid}"),
                shares_files: false,
            })
            .collect(),
    }
    .write(dir)
    .unwrap();
}

/// The first byte of each resolved page of the first mapping.
fn resolved(image: &Path) -> Vec<(u64, u8)> {
    let chain = cr_ebpf_image::Chain::open(image).unwrap();
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

#[test]
fn a_chain_goes_through_single_and_tree_checkpoints_by_process() {
    use cr_ebpf_image::images_dir;
    let d = tempdir("treechain");
    // 1: process 42 alone; 2: it has a child 43 (new: stored whole);
    // 3: the child is gone again.
    write_process(&d.join("ckpt-000001"), 42, 1, "", &[(0, 1), (1, 2)]);
    write_tree(&d.join("ckpt-000002"), &[42, 43]);
    write_process(
        &d.join("ckpt-000002/proc-42"),
        42,
        2,
        "ckpt-000001",
        &[(1, 3)],
    );
    write_process(&d.join("ckpt-000002/proc-43"), 43, 2, "", &[(0, 9)]);
    write_process(&d.join("ckpt-000003"), 42, 3, "ckpt-000002", &[(0, 4)]);

    let names: Vec<String> = images_dir::list(&d)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["ckpt-000001", "ckpt-000002", "ckpt-000003"]);
    assert_eq!(images_dir::root_pid(&d.join("ckpt-000002")).unwrap(), 42);
    assert_eq!(
        images_dir::parents(&d.join("ckpt-000002")).unwrap(),
        ["ckpt-000001"]
    );
    assert!(images_dir::parents(&d.join("ckpt-000001"))
        .unwrap()
        .is_empty());

    // Each process resolves through the image of the same process.
    assert_eq!(resolved(&d.join("ckpt-000002/proc-42")), [(0, 1), (1, 3)]);
    assert_eq!(resolved(&d.join("ckpt-000002/proc-43")), [(0, 9)]);
    assert_eq!(resolved(&d.join("ckpt-000003")), [(0, 4), (1, 3)]);

    // A process naming a parent that has no image of it is refused.
    write_tree(&d.join("ckpt-000004"), &[42, 44]);
    write_process(&d.join("ckpt-000004/proc-42"), 42, 4, "ckpt-000003", &[]);
    write_process(&d.join("ckpt-000004/proc-44"), 44, 4, "ckpt-000003", &[]);
    let e = cr_ebpf_image::Chain::open(&d.join("ckpt-000004/proc-44"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("holds no image of process 44"), "{e}");
    assert!(cr_ebpf_image::Chain::open(&d.join("ckpt-000004/proc-42")).is_ok());
}

/// Writes checkpoint `seq` of process 42 into `dir` whose memfd of `size`
/// bytes keeps its contents in the page store: `pages` (page, byte) stored
/// here, the rest inherited from `parent` when there is one.
fn write_shm(dir: &Path, seq: u64, parent: &str, size: u64, pages: &[(u64, u8)]) {
    write_process(dir, 42, seq, parent, &[]);
    let mut m = Manifest::read(dir).unwrap();
    let o = &mut m.shmem[0];
    o.data.clear();
    o.size = size;
    o.base = cr_ebpf_image::SHMEM_PAGES + cr_ebpf_image::SHMEM_SLOT;
    o.inherits = !parent.is_empty();
    let base = o.base;
    m.write(dir).unwrap();
    let mut w = PageWriter::create(dir).unwrap();
    for &(page, byte) in pages {
        let addr = base + page * PAGE as u64;
        w.write(&Chunk::compress(addr, &vec![byte; PAGE])).unwrap();
    }
    w.finish().unwrap();
}

/// The first byte of each page of the memfd's contents after a restore
/// loaded them.
fn shm_contents(image: &Path) -> Vec<(u64, u8)> {
    let mut chain = cr_ebpf_image::Chain::open(image).unwrap();
    chain.load_shmem().unwrap();
    let o = &chain.manifest().shmem[0];
    assert!(!o.inherits);
    let mut out = Vec::new();
    for (off, b) in &o.data {
        for (i, p) in b.chunks(PAGE).enumerate() {
            assert!(off + (i * PAGE + p.len()) as u64 <= o.size);
            out.push((off / PAGE as u64 + i as u64, p[0]));
        }
    }
    out
}

#[test]
fn shared_memory_pages_resolve_through_the_chain_within_each_size() {
    let d = tempdir("shmchain");
    let page = PAGE as u64;
    write_shm(
        &d.join("ckpt-000001"),
        1,
        "",
        3 * page,
        &[(0, 1), (1, 2), (2, 3)],
    );
    write_shm(
        &d.join("ckpt-000002"),
        2,
        "ckpt-000001",
        3 * page,
        &[(1, 7)],
    );
    assert_eq!(
        shm_contents(&d.join("ckpt-000002")),
        [(0, 1), (1, 7), (2, 3)]
    );
    // Shrunk to half a page, then grown again: what lay past the smaller
    // size is gone (zeros) and is not taken from older images.
    write_shm(&d.join("ckpt-000003"), 3, "ckpt-000002", page / 2, &[]);
    let c = cr_ebpf_image::Chain::open(&d.join("ckpt-000003")).unwrap();
    assert_eq!(c.fills().iter().filter(|f| f.is_shmem()).count(), 1);
    assert_eq!(shm_contents(&d.join("ckpt-000003")), [(0, 1)]);
    write_shm(
        &d.join("ckpt-000004"),
        4,
        "ckpt-000003",
        3 * page,
        &[(2, 9)],
    );
    assert_eq!(shm_contents(&d.join("ckpt-000004")), [(0, 1), (2, 9)]);
    // Only the object's pages resolve: the process's own memory has none.
    let c = cr_ebpf_image::Chain::open(&d.join("ckpt-000004")).unwrap();
    assert!(c.fills().iter().all(|f| f.is_shmem()));
    assert_eq!(c.manifest().mappings[0].pages_stored, 0);

    // An object inheriting from a parent that does not keep it in its
    // page store is refused, naming it.
    write_process(&d.join("ckpt-000005"), 42, 5, "", &[]);
    write_shm(&d.join("ckpt-000006"), 6, "ckpt-000005", page, &[]);
    let e = cr_ebpf_image::Chain::open(&d.join("ckpt-000006"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("shared memory object 1032 inherits pages"),
        "{e}"
    );
    // Pages past every object and mapping are refused.
    write_shm(&d.join("ckpt-000007"), 7, "", page, &[(1, 1)]);
    let e = cr_ebpf_image::Chain::open(&d.join("ckpt-000007"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lie outside every mapping"), "{e}");
}

#[test]
fn shared_memory_stored_elsewhere_round_trips_and_holds_no_contents() {
    let mut m = manifest();
    m.shmem[0].data.clear();
    m.shmem[0].elsewhere = true;
    assert_eq!(Manifest::decode(&m.encode(), 32).unwrap(), m);
    let mut both = manifest();
    both.shmem[0].elsewhere = true;
    let e = Manifest::decode(&both.encode(), 32).unwrap_err();
    assert!(
        e.what.contains("stored elsewhere has contents"),
        "{}",
        e.what
    );
}

#[test]
fn a_header_claiming_a_newer_minor_is_refused_naming_the_version() {
    let d = tempdir("minor7");
    write_image(&d);
    let p = d.join(MANIFEST_FILE);
    let mut b = std::fs::read(&p).unwrap();
    assert_eq!(
        b[10..12],
        cr_ebpf_image::FORMAT_MINOR.to_le_bytes(),
        "written in the current format"
    );
    let newer = cr_ebpf_image::FORMAT_MINOR + 1;
    b[10..12].copy_from_slice(&newer.to_le_bytes());
    let crc = crc32(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&p, b).unwrap();
    let e = Manifest::read(&d).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Version {
                major: 1,
                minor,
                ..
            } if minor == newer
        ),
        "{e}"
    );
    let e = e.to_string();
    assert!(
        e.contains(&format!("image format 1.{newer} is not readable"))
            && e.contains(&format!("reads 1.0 to 1.{}", newer - 1)),
        "{e}"
    );
}

#[test]
fn a_descriptor_state_is_the_body_of_its_kind() {
    use cr_ebpf_image::{FdInfo, FdKind, FdState};
    let mut m = manifest();
    m.fds.push(FdInfo {
        fd: 9,
        kind: FdKind::Pidfd,
        path: "anon_inode:[pidfd]".into(),
        state: FdState::Pidfd { pid: 77 },
        ..Default::default()
    });
    let payload = m.encode();
    assert_eq!(Manifest::decode(&payload, 32).unwrap(), m);
    // Find the last FD section: (offset of its body, its length).
    let mut at = 0;
    let mut last_fd = None;
    while at < payload.len() {
        let tag = u16::from_le_bytes([payload[at], payload[at + 1]]);
        let len = u32::from_le_bytes(payload[at + 4..at + 8].try_into().unwrap()) as usize;
        if tag == 4 {
            last_fd = Some((at + 8, len));
        }
        at += 8 + len;
    }
    let (start, len) = last_fd.unwrap();
    let body = &payload[start..start + len];
    assert_eq!(body[0..4], 9i32.to_le_bytes());
    assert_eq!(body[4..6], (FdKind::Pidfd as u16).to_le_bytes());
    // The pid itself, no state tag, no length, then (format 1.8) the
    // shared description and the owner of signal-driven I/O (none here:
    // 20 zero bytes).
    assert_eq!(
        body[len - 28..len - 24],
        0u32.to_le_bytes(),
        "empty pipe data"
    );
    assert_eq!(body[len - 24..len - 20], 77i32.to_le_bytes());
    assert_eq!(body[len - 20..], [0; 20]);
    // Calling it a file leaves the pid over: refused.
    let mut bad = payload.clone();
    bad[start + 4..start + 6].copy_from_slice(&(FdKind::File as u16).to_le_bytes());
    let e = Manifest::decode(&bad, 32).unwrap_err();
    assert!(
        e.what.contains("4 unexpected bytes") || e.what.contains("owner"),
        "{}",
        e.what
    );
}

/// `pages` pages of xorshift noise: what lz4 cannot shrink.
fn noise(pages: usize, mut x: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(pages * PAGE);
    while v.len() < pages * PAGE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

#[test]
fn pages_lz4_cannot_shrink_are_stored_as_they_are() {
    let d = tempdir("raw");
    manifest().write(&d).unwrap();
    let big = noise(64, 7);
    let small = noise(2, 9);
    let text: Vec<u8> = (0..8 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
    let chunks = [
        Chunk::compress(0x10000, &big),
        Chunk::compress(0x100000, &small),
        Chunk::compress(0x200000, &text),
    ];
    // Told by its samples; by the whole when too small to sample; text
    // compresses.
    assert!(chunks[0].stored_raw && chunks[0].data == big);
    assert!(chunks[1].stored_raw && chunks[1].data == small);
    assert!(!chunks[2].stored_raw && chunks[2].data.len() < text.len());
    // The same from pages given up (kept without a copy when raw).
    let given = Chunk::of_pages(0x10000, big.clone());
    assert!(given.stored_raw && given.data == big && given.crc == chunks[0].crc);
    let given = Chunk::of_pages(0x200000, text.clone());
    assert!(!given.stored_raw && given.data == chunks[2].data);
    let mut w = PageWriter::create(&d).unwrap();
    for c in &chunks {
        w.write(c).unwrap();
    }
    w.finish().unwrap();
    let store = pages::PageStore::open(&d).unwrap();
    for (c, want) in store.chunks().iter().zip([&big, &small, &text]) {
        let mut out = vec![0u8; want.len()];
        store.decompress_into(c, &mut out).unwrap();
        assert_eq!(&out, want);
    }

    // A byte of a page stored as it is, changed: refused when used.
    let p = d.join(PAGES_FILE);
    let orig = std::fs::read(&p).unwrap();
    flip(&p, 32 + 28 + 5000);
    let store = pages::PageStore::open(&d).unwrap();
    let mut out = vec![0u8; big.len()];
    let e = store
        .decompress_into(&store.chunks()[0], &mut out)
        .unwrap_err();
    assert!(e.contains("checksum mismatch"), "{e}");

    // A header that says "as they are" with another length (its own
    // checksum made again, no index): refused at open.
    std::fs::remove_file(d.join(cr_ebpf_image::PAGES_INDEX_FILE)).unwrap();
    let mut b = orig.clone();
    b[32 + 12..32 + 16].copy_from_slice(&(64 * PAGE as u32 - 1).to_le_bytes());
    let h = crc32(&b[32..32 + 24]);
    b[32 + 24..32 + 28].copy_from_slice(&h.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = pages::PageStore::open(&d).err().unwrap().to_string();
    assert!(e.contains("bad chunk length"), "{e}");

    // The same store under format 1.11, which had no such chunks: the
    // flag is a page count out of bounds.
    let mut b = orig;
    b[10..12].copy_from_slice(&11u16.to_le_bytes());
    let h = crc32(&b[0..28]);
    b[28..32].copy_from_slice(&h.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = pages::PageStore::open(&d).err().unwrap().to_string();
    assert!(e.contains("bad chunk"), "{e}");
}
