//! The controlling terminal. A restored process gets none (its stub is
//! made without one), so one that has a controlling terminal is refused at
//! checkpoint time, naming it, while it keeps running. (Descriptors open on
//! a terminal are refused by [`crate::fd::file`].)

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, proc, sys::Sys, RestoreError, SaveError};

/// The controlling terminal.
pub struct Terminal;

/// `major:minor` of a `tty_nr` of `/proc/PID/stat`.
fn device(tty_nr: i32) -> String {
    let (major, minor) = (
        (tty_nr >> 8) & 0xfff,
        (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00),
    );
    format!("{major}:{minor}")
}

impl ProcessKind for Terminal {
    fn name(&self) -> &'static str {
        "controlling terminal"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let st = proc::stat(pid).map_err(proc_err(pid, format!("/proc/{pid}/stat")))?;
        if st.tty_nr != 0 {
            return Err(cx.refuse(format!(
                "a controlling terminal (device {}): terminals are not restored yet; start it \
                 detached (setsid, stdio not on a terminal)",
                device(st.tty_nr)
            )));
        }
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_devices_are_named_as_the_kernel_encodes_them() {
        // /dev/pts/3 is 136:3; /dev/tty1 is 4:1; minors past 255 in the high bits.
        assert_eq!(device(136 << 8 | 3), "136:3");
        assert_eq!(device(4 << 8 | 1), "4:1");
        assert_eq!(device((136 << 8) | (0x3 << 20) | 4), "136:772");
    }
}
