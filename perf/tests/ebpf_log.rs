//! Privileged tests of the eBPF resource and dirty-page log against a real
//! workload (`src/bin/scripted.rs`): the exact events, in order per thread,
//! and honest loss accounting. They need root; with `CI=true` they fail
//! instead of skipping.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdout, Command, Stdio},
};

use cr_ebpf_loader::{
    event::{Fault, Syscall},
    Event, Tracer, TracerOptions,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_scripted");

struct Workload {
    child: Child,
    out: BufReader<ChildStdout>,
    pid: u32,
}

impl Workload {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(WORKLOAD)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the scripted workload");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let line = read_line(&mut out);
        let pid = line
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("workload said {line:?}, expected `ready PID`"));
        assert_eq!(pid, child.id());
        Self { child, out, pid }
    }

    fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("send go");
        stdin.flush().expect("flush");
    }

    fn line(&mut self) -> String {
        read_line(&mut self.out)
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("wait for the workload");
        assert!(status.success(), "workload failed: {status}");
    }
}

fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut s = String::new();
    out.read_line(&mut s).expect("read from the workload");
    s.trim_end().to_string()
}

/// `key=value` fields of a `result ...` line.
fn fields(line: &str) -> HashMap<String, String> {
    line.strip_prefix("result ")
        .unwrap_or_else(|| panic!("expected a result line, got {line:?}"))
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(f: &HashMap<String, String>, key: &str) -> i64 {
    let v = &f[key];
    match v.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

fn drain(events: &mut cr_ebpf_loader::EventStream) -> Vec<Event> {
    let mut raw = Vec::new();
    events.drain(&mut raw);
    raw.into_iter()
        .map(|e| e.expect("every record decodes"))
        .collect()
}

/// A compact, exact rendering of an event for comparisons.
fn canon(e: &Event) -> String {
    match e {
        Event::Syscall(s) => canon_syscall(s),
        Event::Fault(f) => canon_fault(f),
        Event::Fork(f) => format!(
            "fork child={} tgid={} thread={} flags={:?}",
            f.child_tid, f.child_tgid, f.thread, f.clone_flags
        ),
        Event::Exit(x) => format!("exit group_dead={:?}", x.group_dead),
        Event::Exec(x) => format!("exec {}", x.filename.text),
    }
}

fn canon_syscall(s: &Syscall) -> String {
    let name = s.name.unwrap_or("?");
    let a = s.args;
    let ret = match s.ret {
        Some(r) => r.to_string(),
        None => "noreturn".into(),
    };
    match name {
        "umask" | "close" | "dup" | "exit_group" => format!("{name}({}) = {ret}", a[0]),
        "mmap" => format!(
            "mmap({:#x}, {}, {}, {:#x}, {}, {}) = {:#x}",
            a[0],
            a[1],
            a[2],
            a[3],
            a[4] as i32,
            a[5],
            s.ret.unwrap_or(0)
        ),
        "munmap" => format!("munmap({:#x}, {}) = {ret}", a[0], a[1]),
        "mprotect" => format!("mprotect({:#x}, {}, {}) = {ret}", a[0], a[1], a[2]),
        "openat" => format!(
            "openat({}, {:?}, {:#o}) = {ret}",
            a[0] as i32,
            s.path.as_ref().map(|p| p.text.as_str()).unwrap_or("<none>"),
            a[2]
        ),
        "pipe2" => format!("pipe2(_, {:#o}) = {ret}", a[1]),
        "clone" => format!("clone({:#x}) = {ret}", a[0]),
        _ => format!("{name}({:x?}) = {ret}", a),
    }
}

fn canon_fault(f: &Fault) -> String {
    format!(
        "fault {:#x} write={} present={} kernel={}",
        f.address,
        f.error_code & 2 != 0,
        f.protection(),
        f.kernel
    )
}

fn tracer(options: &TracerOptions) -> Tracer {
    Tracer::load(options).unwrap_or_else(|e| {
        let mut msg = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            msg.push_str(&format!(": {c}"));
            cur = c.source();
        }
        panic!("loading the eBPF programs failed: {msg}")
    })
}

#[tokio::test(flavor = "current_thread")]
async fn scripted_sequence_is_logged_exactly_in_order() {
    if !cr_ebpf_perf::privileged("scripted_sequence_is_logged_exactly_in_order") {
        return;
    }
    const PAGES: usize = 12;
    let mut tracer = tracer(&TracerOptions::default());
    let mut w = Workload::start(&["script", &PAGES.to_string()]);
    tracer.track(w.pid).expect("track the workload");
    let mut events = tracer.events().expect("event stream");
    w.go();
    let result = fields(&w.line());
    let pid = w.pid;
    w.finish();
    // The workload has been reaped: all its records are in the ring buffer.
    let all = drain(&mut events);

    let base = num(&result, "base") as u64;
    let (fd1, fd2) = (num(&result, "fd1"), num(&result, "fd2"));
    let pipe: Vec<i64> = result["pipe"]
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let child = num(&result, "child");
    let child_fd = num(&result, "childfd");
    let len = PAGES * 4096;

    // Main thread: everything between the two umask markers, inclusive.
    let main: Vec<String> = all
        .iter()
        .filter(|e| e.origin().tid == pid)
        .map(canon)
        .collect();
    let start = main
        .iter()
        .position(|s| s == "umask(63) = 63")
        .unwrap_or_else(|| panic!("no start marker in {main:#?}"));
    let end = start
        + 1
        + main[start + 1..]
            .iter()
            .position(|s| s == "umask(63) = 63")
            .unwrap_or_else(|| panic!("no end marker in {main:#?}"));
    let got = &main[start..=end];

    let mut expected = vec![
        "umask(63) = 63".to_string(),
        format!("mmap(0x0, {len}, 3, 0x22, -1, 0) = {base:#x}"),
    ];
    for i in 0..PAGES as u64 {
        expected.push(format!(
            "fault {:#x} write=true present=false kernel=false",
            base + i * 4096 + 16
        ));
    }
    expected.extend([
        format!("mprotect({base:#x}, 4096, 1) = 0"),
        format!("openat(-100, \"/dev/null\", 0o2000000) = {fd1}"),
        format!("dup({fd1}) = {fd2}"),
        format!("close({fd2}) = 0"),
        "pipe2(_, 0o2000000) = 0".to_string(),
        format!("close({}) = 0", pipe[0]),
        format!("close({}) = 0", pipe[1]),
        format!("close({fd1}) = 0"),
        format!("fork child={child} tgid={child} thread=false flags=Some(16657)"),
        "clone(0x4111) = ".to_string() + &child.to_string(),
        format!("munmap({base:#x}, {len}) = 0"),
        "umask(63) = 63".to_string(),
    ]);
    assert_eq!(got, expected.as_slice(), "main thread events");

    // The vfork child: its own events, tracked from its first instruction.
    let child_events: Vec<String> = all
        .iter()
        .filter(|e| e.origin().tgid == child as u32)
        .map(canon)
        .collect();
    assert_eq!(
        child_events,
        vec![
            format!("openat(-100, \"/dev/null\", 0o2000000) = {child_fd}"),
            format!("close({child_fd}) = 0"),
            "exit_group(7) = noreturn".to_string(),
            "exit group_dead=Some(true)".to_string(),
        ],
        "child events"
    );
    // The workload's own exit closes its log.
    assert!(matches!(
        all.last(),
        Some(Event::Exit(x)) if x.origin.tgid == pid && x.group_dead == Some(true)
    ));
    assert_eq!(
        tracer.losses().unwrap(),
        vec![],
        "no records lost at this rate"
    );
    // Exited processes leave the tracked set in the kernel.
    assert!(
        tracer
            .tracked()
            .unwrap()
            .iter()
            .all(|(p, _)| *p != pid && *p != child as u32),
        "exited processes are still tracked: {:?}",
        tracer.tracked().unwrap()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn thread_events_carry_their_tid_in_order() {
    if !cr_ebpf_perf::privileged("thread_events_carry_their_tid_in_order") {
        return;
    }
    let mut tracer = tracer(&TracerOptions::default());
    let mut w = Workload::start(&["thread"]);
    tracer.track(w.pid).expect("track the workload");
    let mut events = tracer.events().expect("event stream");
    w.go();
    let result = fields(&w.line());
    let pid = w.pid;
    w.finish();
    let all = drain(&mut events);
    let tid = num(&result, "tid") as u32;
    let fd = num(&result, "fd");
    assert_ne!(tid, pid);

    let created: Vec<&Event> = all
        .iter()
        .filter(|e| matches!(e, Event::Fork(f) if f.child_tid == tid))
        .collect();
    assert_eq!(created.len(), 1, "one creation event for thread {tid}");
    let Event::Fork(f) = created[0] else {
        unreachable!()
    };
    assert!(f.thread && f.child_tgid == pid && f.origin.tid == pid);

    let of_thread: Vec<&Event> = all.iter().filter(|e| e.origin().tid == tid).collect();
    assert!(of_thread.iter().all(|e| e.origin().tgid == pid));
    let canon_thread: Vec<String> = of_thread.iter().map(|e| canon(e)).collect();
    let open = canon_thread
        .iter()
        .position(|s| *s == format!("openat(-100, \"/dev/null\", 0o2000000) = {fd}"))
        .unwrap_or_else(|| panic!("no openat in {canon_thread:#?}"));
    assert_eq!(canon_thread[open + 1], format!("close({fd}) = 0"));
    assert_eq!(
        canon_thread.last().map(String::as_str),
        Some("exit group_dead=Some(false)"),
        "a thread's exit is not its process's death"
    );
    assert_eq!(tracer.losses().unwrap(), vec![]);
}

#[tokio::test(flavor = "current_thread")]
async fn lost_fault_records_are_counted_apart_from_resource_records() {
    if !cr_ebpf_perf::privileged("lost_fault_records_are_counted_apart_from_resource_records") {
        return;
    }
    const PAGES: u64 = 5000;
    let options = TracerOptions {
        ring_buffer_bytes: 4096,
        user_faults: true,
        kernel_faults: false,
        ..TracerOptions::default()
    };
    let mut tracer = tracer(&options);
    let before = tracer.fault_losses().unwrap();
    let mut w = Workload::start(&["touch", &PAGES.to_string()]);
    tracer.track(w.pid).expect("track the workload");
    let mut events = tracer.events().expect("event stream");
    w.go();
    assert_eq!(w.line(), "done");
    let all = drain(&mut events);
    let pid = w.pid;
    let faults = all
        .iter()
        .filter(|e| matches!(e, Event::Fault(f) if f.origin.tgid == pid))
        .count() as u64;
    let lost = tracer.fault_losses().unwrap() - before;
    assert!(faults > 0, "some fault records fit");
    assert!(lost > 0, "the overflow was counted");
    // Every page was written once (other faults of the process may add a few).
    assert!(
        faults + lost >= PAGES && faults + lost < PAGES + 64,
        "{faults} delivered + {lost} lost for {PAGES} pages"
    );
    // Faults are a hint: their loss is not a loss of the resource log.
    assert!(
        tracer.losses().unwrap().iter().all(|l| l.tgid != pid),
        "{:?}",
        tracer.losses().unwrap()
    );
    w.finish();
}

#[tokio::test(flavor = "current_thread")]
async fn ring_buffer_overflow_is_counted_exactly() {
    if !cr_ebpf_perf::privileged("ring_buffer_overflow_is_counted_exactly") {
        return;
    }
    const CALLS: u64 = 5000;
    // One page of ring buffer holds about a dozen syscall records.
    let options = TracerOptions {
        ring_buffer_bytes: 4096,
        user_faults: false,
        kernel_faults: false,
        ..TracerOptions::default()
    };
    let mut tracer = tracer(&options);
    let mut w = Workload::start(&["burst", &CALLS.to_string()]);
    tracer.track(w.pid).expect("track the workload");
    let mut events = tracer.events().expect("event stream");
    w.go();
    assert_eq!(w.line(), "done");
    // Nothing was read while the burst ran: the buffer overflowed.
    let all = drain(&mut events);
    let pid = w.pid;
    let delivered = all.iter().filter(|e| e.origin().tgid == pid).count() as u64;
    let umasks = all
        .iter()
        .filter(
            |e| matches!(e, Event::Syscall(s) if s.name == Some("umask") && s.origin.tgid == pid),
        )
        .count() as u64;
    assert_eq!(delivered, umasks, "only umask records: {all:#?}");
    let losses = tracer.losses().unwrap();
    let lost: u64 = losses
        .iter()
        .filter(|l| l.tgid == pid)
        .map(|l| l.dropped)
        .sum();
    assert!(delivered > 0, "some records fit");
    assert!(lost > 0, "the overflow was counted");
    assert_eq!(delivered + lost, CALLS, "delivered + lost = calls made");
    assert_eq!(tracer.unattributed_losses().unwrap(), 0);
    // Acknowledging clears the count.
    tracer.acknowledge_loss(pid).unwrap();
    assert!(tracer.losses().unwrap().iter().all(|l| l.tgid != pid));
    w.finish();
}

#[tokio::test(flavor = "current_thread")]
async fn tracking_a_missing_pid_is_a_clear_error() {
    if !cr_ebpf_perf::privileged("tracking_a_missing_pid_is_a_clear_error") {
        return;
    }
    let mut tracer = tracer(&TracerOptions::default());
    // pid_max is at most 2^22: this pid cannot exist.
    let err = tracer.track(1 << 23).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no process with pid {0}: check the pid (`ps -p {0}`)",
            1 << 23
        )
    );
}
