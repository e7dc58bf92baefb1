//! A process confined to a root directory of its own (`chroot`) comes back
//! in it (ZDTM chroot, chroot-file): its descriptors of files inside are
//! reopened, and paths it opens afterwards are resolved from that root.

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// python3: enters the root `argv[1]`, keeps `/inside` open, and on
/// `/ctl/ask` answers with what it reads through that descriptor and by
/// opening `/inside` again.
const WORKLOAD: &str = r#"
import os, sys, time
os.chroot(sys.argv[1])
f = open('/inside', 'r+')
open('/ctl/ready', 'w').close()
while True:
    if os.path.exists('/ctl/ask'):
        f.seek(0)
        held = f.read()
        again = open('/inside').read()
        with open('/ctl/answer.tmp', 'w') as a:
            a.write('%s|%s|%d' % (held, again, os.stat('/').st_ino))
        os.rename('/ctl/answer.tmp', '/ctl/answer')
        os.unlink('/ctl/ask')
    time.sleep(0.02)
"#;

fn ask(ctl: &std::path::Path) -> String {
    let _ = std::fs::remove_file(ctl.join("answer"));
    std::fs::write(ctl.join("ask"), "").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    std::fs::read_to_string(ctl.join("answer")).unwrap()
}

#[test]
fn a_process_in_a_root_of_its_own_comes_back_in_it() {
    if !cr_ebpf_perf::privileged("a_process_in_a_root_of_its_own_comes_back_in_it") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let s = Scratch::new("chroot");
    let jail = s.0.join("jail");
    let ctl = jail.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    std::fs::write(jail.join("inside"), "in the jail").unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", WORKLOAD])
        .arg(&jail)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = spawn_clean(&mut cmd);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let ino = std::fs::metadata(&jail).unwrap().ino();
    let want = format!("in the jail|in the jail|{ino}");
    assert_eq!(ask(&ctl), want, "before");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let m = cr_ebpf_image::Manifest::read(&img).unwrap();
    assert_eq!(m.process.root, jail.display().to_string());
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(&ctl), want, "after a restore");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", r.pid)).unwrap(),
        jail
    );
}
