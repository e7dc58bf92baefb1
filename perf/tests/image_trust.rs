//! Images are private to their owner and trusted only when nobody else
//! could have written them: a dump makes its directories 0700 and files
//! 0600; a restore refuses an image part of which another user owns or
//! can write; a dump refuses a destination another user controls.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// An error with its causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn walk(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(p.to_path_buf());
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn images_are_private_and_an_image_others_could_write_is_refused() {
    if !cr_ebpf_perf::privileged("images_are_private_and_an_image_others_could_write_is_refused") {
        return;
    }
    let s = Scratch::new("trust");
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", "import time\nwhile True: time.sleep(0.05)"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let img = s.0.join("img");
    let opts = DumpOptions {
        leave_running: true,
        ..DumpOptions::default()
    };
    dump(pid, &img, &opts).expect("dump");
    let mut all = Vec::new();
    walk(&img, &mut all);
    assert!(all.len() >= 3, "{all:?}");
    for p in &all {
        let m = std::fs::metadata(p).unwrap();
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.mode() & 0o777, want, "{}", p.display());
    }

    // Another user's file in it, or one others can write: refused first,
    // naming it.
    let pages = img.join("pages.img");
    std::os::unix::fs::chown(&pages, Some(4321), None).unwrap();
    let err = chain(&restore(&img, &RestoreOptions::default()).unwrap_err());
    assert!(
        err.contains("pages.img") && err.contains("owned by user 4321"),
        "{err}"
    );
    std::os::unix::fs::chown(&pages, Some(0), None).unwrap();
    std::fs::set_permissions(&pages, std::fs::Permissions::from_mode(0o620)).unwrap();
    let err = chain(&restore(&img, &RestoreOptions::default()).unwrap_err());
    assert!(err.contains("writable by other users"), "{err}");

    // A destination in a directory anyone may write (not sticky).
    let open = s.0.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = chain(&dump(pid, &open.join("img"), &opts).unwrap_err());
    assert!(err.contains("not sticky"), "{err}");
    assert!(!open.join("img").exists());
    let _ = child.kill();
    let _ = child.wait();
}
