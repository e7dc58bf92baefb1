//! The mm fields (code, data, heap, stack, arguments and environment
//! bounds), the auxiliary vector and the executable: from `/proc/PID/stat`,
//! `auxv` and `exe`; set in one `PR_SET_MM_MAP` once the memory layout is
//! in place (no `CAP_SYS_RESOURCE` needed).

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{
    error::proc_err,
    proc,
    sys::{Sys, PAGE},
    RestoreError, SaveError,
};

/// mm fields, auxv and exe.
pub struct Mm;

impl ProcessKind for Mm {
    fn name(&self) -> &'static str {
        "mm fields, auxv and executable"
    }

    fn phase(&self) -> Phase {
        Phase::Mm
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        p.mm = proc::mm_fields(pid, 0).map_err(proc_err(pid, format!("/proc/{pid}/stat")))?;
        // The program break is not in /proc/PID/stat: the end of [heap].
        p.mm[5] = cx.brk.unwrap_or(p.mm[4]);
        p.auxv = std::fs::read(format!("/proc/{pid}/auxv"))
            .map_err(proc_err(pid, format!("/proc/{pid}/auxv")))?;
        p.exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(proc_err(pid, format!("/proc/{pid}/exe")))?
            .display()
            .to_string();
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        if p.auxv.len() as u64 > PAGE - 256 {
            return Err(RestoreError::NotSupported(
                "auxv larger than expected".into(),
            ));
        }
        // The executable, so that /proc/PID/exe names it again (the stub's
        // own binary is no longer mapped, which the kernel requires).
        let mut exe = p.exe.clone().into_bytes();
        exe.push(0);
        let exe_fd = if exe.len() <= 2048 {
            let at = sys.put(2048, &exe)?;
            sys.call(
                "openat(exe)",
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as u64,
                    at,
                    (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                ],
            )
            .ok()
        } else {
            None
        };
        let auxv_at = sys.put(256, &p.auxv)?;
        let mut mm_map = Vec::with_capacity(104);
        for v in p.mm {
            mm_map.extend_from_slice(&v.to_le_bytes());
        }
        mm_map.extend_from_slice(&auxv_at.to_le_bytes());
        mm_map.extend_from_slice(&(p.auxv.len() as u32).to_le_bytes());
        let exe_at = mm_map.len();
        mm_map.extend_from_slice(&exe_fd.map_or(u32::MAX, |fd| fd as u32).to_le_bytes());
        let set_mm = |mm_map: &[u8]| -> Result<i64, RestoreError> {
            let map_at = sys.put(0, mm_map)?;
            sys.call(
                "prctl(PR_SET_MM_MAP)",
                libc::SYS_prctl,
                [
                    libc::PR_SET_MM as u64,
                    libc::PR_SET_MM_MAP as u64,
                    map_at,
                    mm_map.len() as u64,
                    0,
                    0,
                ],
            )
        };
        if set_mm(&mm_map).is_err() && exe_fd.is_some() {
            // The executable could not be set (replaced, or not executable):
            // the process still restores; /proc/PID/exe keeps the stub's name.
            mm_map[exe_at..exe_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            set_mm(&mm_map)?;
        }
        if let Some(fd) = exe_fd {
            sys.close(fd)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn one_prctl_sets_fields_auxv_and_executable() {
        let p = ProcessInfo {
            exe: "/usr/bin/sleep".into(),
            mm: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            auxv: vec![7; 368],
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        Mm.restore(&rec, &p).unwrap();
        assert_eq!(
            rec.names(),
            ["openat(exe)", "prctl(PR_SET_MM_MAP)", "close"]
        );
        let exe = rec.calls("openat(exe)")[0];
        assert_eq!(
            rec.memory("openat(exe)", 0, exe[1], 15),
            b"/usr/bin/sleep\0"
        );
        let set = rec.calls("prctl(PR_SET_MM_MAP)")[0];
        assert_eq!(set[3], 104, "struct prctl_mm_map");
        let map = rec.memory("prctl(PR_SET_MM_MAP)", 0, set[2], 104);
        let w = |i: usize| u64::from_le_bytes(map[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!((w(0), w(5), w(10)), (1, 6, 11));
        assert_eq!(
            rec.memory("prctl(PR_SET_MM_MAP)", 0, w(11), 368),
            vec![7; 368]
        );
        assert_eq!(u32::from_le_bytes(map[96..100].try_into().unwrap()), 368);
        let fd = u32::from_le_bytes(map[100..104].try_into().unwrap());
        assert_eq!(fd as u64, rec.calls("close")[0][0]);
    }

    #[test]
    fn an_executable_the_kernel_refuses_is_left_out() {
        let p = ProcessInfo {
            exe: "/bin/true".into(),
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        rec.fail("prctl(PR_SET_MM_MAP)", libc::EACCES);
        // Refused both times: an error.
        assert!(Mm.restore(&rec, &p).is_err());
        assert_eq!(rec.calls("prctl(PR_SET_MM_MAP)").len(), 2);
    }

    #[test]
    fn fields_auxv_and_executable_of_the_process_are_saved() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        let (p, _) = save_with(
            &Mm,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        assert_eq!(
            p.exe,
            std::env::current_exe().unwrap().display().to_string()
        );
        assert!(p.auxv.len() >= 16 && p.auxv.len() % 16 == 0);
        assert!(
            p.mm[0] < p.mm[1] && p.mm[5] == p.mm[4],
            "no heap given: brk at its start"
        );
    }
}
