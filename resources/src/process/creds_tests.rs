use super::*;
use crate::sys::fake::Recording;

fn root() -> ThreadCreds {
    ThreadCreds {
        caps: [(1 << 41) - 1, (1 << 41) - 1, 0, (1 << 41) - 1, 0],
        loginuid: u32::MAX,
        ..ThreadCreds::default()
    }
}

fn filter(n: u8) -> SeccompFilter {
    SeccompFilter {
        flags: 0,
        prog: vec![6, 0, 0, 0, n, 0, 0xff, 0x7f],
    }
}

#[test]
fn what_proc_shows_of_this_thread_is_read() {
    let status = Status::from_text(std::fs::read_to_string("/proc/thread-self/status").unwrap());
    let c = from_status(&status, Some("4294967295\n")).unwrap();
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!((c.uids[0], c.gids[0]), (uid, gid));
    assert_eq!(c.loginuid, u32::MAX);
    assert_ne!(c.caps[BND], 0, "a bounding set");
    let mine = ours().unwrap();
    assert_eq!(mine.uids, c.uids);
    assert_eq!(mine.groups, c.groups);
}

#[test]
fn a_dropped_user_gets_everything_back_in_the_kernels_order() {
    let c = ThreadCreds {
        uids: [1000, 1000, 1000, 1000],
        gids: [100, 100, 100, 100],
        groups: vec![27, 100],
        caps: [
            1 << 10,
            1 << 10 | 1 << 12,
            1 << 10,
            1 << 10 | 1 << 12 | 1 << 13,
            1 << 10,
        ],
        securebits: 0x2f,
        no_new_privs: true,
        loginuid: 1000,
        seccomp_mode: 2,
        seccomp_filters: vec![filter(1), filter(2)],
    };
    let rec = Recording::new();
    restore(&rec, &c, &root(), 1).unwrap();
    let names = rec.names();
    assert_eq!(
        names,
        [
            "capset",
            "prctl(PR_CAP_AMBIENT_RAISE)",
            // 41 capabilities, 3 kept.
            "prctl(PR_CAPBSET_DROP)",
        ]
        .into_iter()
        .chain(std::iter::repeat_n("prctl(PR_CAPBSET_DROP)", 37))
        .chain([
            "openat",
            "write(loginuid)",
            "close",
            "setgroups",
            "prctl(PR_SET_SECUREBITS)",
            "setresgid",
            "setfsgid",
            "setresuid",
            "setfsuid",
            "prctl(PR_SET_SECUREBITS)",
            "seccomp(SECCOMP_SET_MODE_FILTER)",
            "capset",
            "prctl(PR_SET_NO_NEW_PRIVS)",
        ])
        .collect::<Vec<_>>()
    );
    // The ids change with the capabilities left alone, and the final
    // securebits (locks included) are set while CAP_SETPCAP is held.
    let bits = rec.calls("prctl(PR_SET_SECUREBITS)");
    assert_eq!(bits[0][1], 0x05 | 0x04);
    assert_eq!(bits[1][1], 0x2f);
    // Only the filter the other threads do not share.
    let f = rec.calls("seccomp(SECCOMP_SET_MODE_FILTER)");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0][1], 0, "no TSYNC for a thread's own filter");
    let fprog = rec.memory("seccomp(SECCOMP_SET_MODE_FILTER)", 0, f[0][2], 16);
    assert_eq!(u64::from_le_bytes(fprog[..8].try_into().unwrap()), 1);
    let at = u64::from_le_bytes(fprog[8..].try_into().unwrap());
    assert_eq!(
        rec.memory("seccomp(SECCOMP_SET_MODE_FILTER)", 0, at, 8),
        filter(2).prog
    );
    // The last capset sets the recorded sets.
    let caps = rec.calls("capset");
    let data = rec.memory("capset", 1, caps[1][1], 24);
    let word = |i: usize| u32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(
        (word(0), word(1), word(2)),
        (1 << 10, 1 << 10 | 1 << 12, 1 << 10)
    );
    assert_eq!(rec.calls("setresuid")[0][..3], [1000, 1000, 1000]);
    assert_eq!(
        rec.memory("setgroups", 0, rec.calls("setgroups")[0][1], 8),
        [27, 0, 0, 0, 100, 0, 0, 0]
    );
}

#[test]
fn the_same_credentials_take_only_the_capability_sets() {
    let rec = Recording::new();
    restore(&rec, &root(), &root(), 0).unwrap();
    assert_eq!(rec.names(), ["capset", "capset"]);
    // Strict mode is entered before the capabilities go.
    let rec = Recording::new();
    let strict = ThreadCreds {
        seccomp_mode: 1,
        ..root()
    };
    restore(&rec, &strict, &root(), 0).unwrap();
    assert_eq!(rec.names(), ["capset", "prctl(PR_SET_SECCOMP)", "capset"]);
    // no_new_privs cannot be cleared.
    let nnp = ThreadCreds {
        no_new_privs: true,
        ..root()
    };
    assert!(restore(&Recording::new(), &root(), &nnp, 0).is_err());
}

#[test]
fn filters_every_thread_has_are_shared_and_partial_sharing_is_refused() {
    let thread = |tid: i32, filters: Vec<SeccompFilter>| ThreadInfo {
        tid,
        creds: Some(ThreadCreds {
            seccomp_mode: if filters.is_empty() { 0 } else { 2 },
            seccomp_filters: filters,
            ..root()
        }),
        ..ThreadInfo::default()
    };
    let all = [
        thread(1, vec![filter(1), filter(2)]),
        thread(2, vec![filter(1), filter(3)]),
        thread(3, vec![filter(1)]),
    ];
    assert!(!notifies(&filter(1).prog));
    assert!(notifies(&[0x06, 0, 0, 0, 0, 0, 0xc0, 0x7f]));
    assert_eq!(shared_filters(&all), 1);
    assert_eq!(check_sharing(&all), None);
    assert_eq!(shared_filters(&all[..1]), 0, "one thread installs its own");
    let partial = [
        thread(1, vec![]),
        thread(2, vec![filter(4)]),
        thread(3, vec![filter(4)]),
    ];
    assert_eq!(shared_filters(&partial), 0);
    let why = check_sharing(&partial).unwrap();
    assert!(why.contains("threads 2 and 3"), "{why}");
    // Shared ones go with TSYNC; a long one through memory mapped for it.
    let long = SeccompFilter {
        flags: cr_ebpf_image::SECCOMP_FILTER_LOG,
        prog: vec![0; 8 * 600],
    };
    let rec = Recording::new();
    install_filters(&rec, &[filter(1), long.clone()], true).unwrap();
    assert_eq!(
        rec.names(),
        [
            "seccomp(SECCOMP_SET_MODE_FILTER)",
            "mmap",
            "seccomp(SECCOMP_SET_MODE_FILTER)",
            "munmap"
        ]
    );
    let calls = rec.calls("seccomp(SECCOMP_SET_MODE_FILTER)");
    assert_eq!(calls[0][1], 1);
    assert_eq!(calls[1][1], 1 | 2, "TSYNC and the filter's own LOG flag");
    assert_eq!(rec.written()[0].1, long.prog);
}
