//! A [`Sys`] that runs nothing and records every call, for unit tests of
//! restore sides: descriptor-making calls return new numbers counting up
//! from 100, `F_DUPFD` the lowest free number at or above its floor, `mmap`
//! its address, everything else 0; a call can be made to fail.

use std::{
    cell::{Cell, RefCell},
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
};

use super::{Sys, PAGE};
use crate::RestoreError;

/// Address of the fake scratch page.
pub const SCRATCH: u64 = 0x7000_0000;

/// One thing the code under test did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A syscall: its name as given, number and arguments.
    Call {
        name: String,
        nr: i64,
        args: [u64; 6],
    },
    /// A restorer descriptor handed over, and the number it got.
    Adopt { ours: i32, got: i64 },
}

/// The recording fake.
#[derive(Debug, Default)]
pub struct Recording {
    events: RefCell<Vec<Event>>,
    scratch: RefCell<Vec<u8>>,
    next_fd: Cell<i64>,
    /// Calls (by name) that fail, with their errno.
    failing: RefCell<Vec<(String, i32)>>,
    /// Fixed results by call name.
    results: RefCell<Vec<(String, i64)>>,
    /// Duplicates of what was adopted, kept for the test to look at.
    kept: RefCell<Vec<OwnedFd>>,
    /// The scratch page as each call saw it, by call name.
    seen: RefCell<Vec<(String, Vec<u8>)>>,
    /// What [`Sys::write`] wrote, and where.
    written: RefCell<Vec<(u64, Vec<u8>)>>,
    /// What the process's numbers hold, as far as adopted descriptors
    /// went (through `F_DUPFD` and `dup3`), for [`Sys::take`].
    numbers: RefCell<std::collections::HashMap<i64, OwnedFd>>,
}

impl Recording {
    /// A fake with nothing recorded.
    pub fn new() -> Self {
        let r = Self::default();
        r.scratch.replace(vec![0; PAGE as usize]);
        r.next_fd.set(100);
        r
    }

    /// What [`Sys::write`] wrote, and where, in order.
    pub fn written(&self) -> Vec<(u64, Vec<u8>)> {
        self.written.borrow().clone()
    }

    /// Makes every later call named `name` fail with `errno`.
    pub fn fail(&self, name: &str, errno: i32) {
        self.failing.borrow_mut().push((name.into(), errno));
    }

    /// Makes every later call named `name` return `value`.
    pub fn returns(&self, name: &str, value: i64) {
        self.results.borrow_mut().push((name.into(), value));
    }

    /// Everything recorded, in order.
    pub fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }

    /// The names of the calls made, in order (`adopt` for an adoption).
    pub fn names(&self) -> Vec<String> {
        self.events
            .borrow()
            .iter()
            .map(|e| match e {
                Event::Call { name, .. } => name.clone(),
                Event::Adopt { .. } => "adopt".into(),
            })
            .collect()
    }

    /// The calls named `name`, with their arguments.
    pub fn calls(&self, name: &str) -> Vec<[u64; 6]> {
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Call { name: n, args, .. } if n == name => Some(*args),
                _ => None,
            })
            .collect()
    }

    /// Duplicates of every descriptor handed to the process, in order
    /// (taken: a second call returns only later ones).
    /// (The copies [`Sys::take`] answers from go with them.)
    pub fn adopted(&self) -> Vec<OwnedFd> {
        self.numbers.borrow_mut().clear();
        std::mem::take(&mut self.kept.borrow_mut())
    }

    /// `len` bytes at address `at` of the scratch page as the `nth` call
    /// named `name` saw it.
    pub fn memory(&self, name: &str, nth: usize, at: u64, len: usize) -> Vec<u8> {
        let seen = self.seen.borrow();
        let page = &seen
            .iter()
            .filter(|(n, _)| n == name)
            .nth(nth)
            .expect("such a call")
            .1;
        let off = (at - SCRATCH) as usize;
        page[off..off + len].to_vec()
    }

    /// `len` bytes of the scratch page at address `at` as last written.
    pub fn scratch(&self, at: u64, len: usize) -> Vec<u8> {
        let off = (at - SCRATCH) as usize;
        self.scratch.borrow()[off..off + len].to_vec()
    }

    /// The NUL-terminated string at address `at` of the scratch page.
    pub fn string(&self, at: u64) -> String {
        let s = self.scratch.borrow();
        let off = (at - SCRATCH) as usize;
        let end = s[off..]
            .iter()
            .position(|&b| b == 0)
            .map_or(s.len(), |e| off + e);
        String::from_utf8_lossy(&s[off..end]).into_owned()
    }

    /// Number `to` now holds what `from` holds.
    fn copy_number(&self, from: i64, to: i64) {
        let mut numbers = self.numbers.borrow_mut();
        let copy = numbers.get(&from).and_then(|f| f.try_clone().ok());
        match copy {
            Some(f) => numbers.insert(to, f),
            None => numbers.remove(&to),
        };
    }

    fn new_fd(&self) -> i64 {
        let fd = self.next_fd.get();
        self.next_fd.set(fd + 1);
        fd
    }
}

impl Sys for Recording {
    fn call(&self, name: &str, nr: i64, args: [u64; 6]) -> Result<i64, RestoreError> {
        self.events.borrow_mut().push(Event::Call {
            name: name.into(),
            nr,
            args,
        });
        self.seen
            .borrow_mut()
            .push((name.into(), self.scratch.borrow().clone()));
        if let Some((_, errno)) = self.failing.borrow().iter().find(|(n, _)| n == name) {
            return Err(RestoreError::Syscall {
                call: name.into(),
                err: std::io::Error::from_raw_os_error(*errno),
            });
        }
        if let Some((_, v)) = self.results.borrow().iter().find(|(n, _)| n == name) {
            return Ok(*v);
        }
        Ok(match nr {
            libc::SYS_openat | libc::SYS_epoll_create1 | libc::SYS_pidfd_open => self.new_fd(),
            libc::SYS_fcntl if args[1] == libc::F_DUPFD as u64 => {
                let fd = self.new_fd().max(args[2] as i64);
                self.next_fd.set(fd + 1);
                self.copy_number(args[0] as i64, fd);
                fd
            }
            libc::SYS_dup3 => {
                self.copy_number(args[0] as i64, args[1] as i64);
                args[1] as i64
            }
            libc::SYS_close => {
                self.numbers.borrow_mut().remove(&(args[0] as i64));
                0
            }
            libc::SYS_mmap => args[0] as i64,
            _ => 0,
        })
    }

    fn put(&self, offset: u64, bytes: &[u8]) -> Result<u64, RestoreError> {
        assert!(offset + bytes.len() as u64 <= PAGE);
        self.scratch.borrow_mut()[offset as usize..offset as usize + bytes.len()]
            .copy_from_slice(bytes);
        Ok(SCRATCH + offset)
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), RestoreError> {
        self.written.borrow_mut().push((addr, bytes.to_vec()));
        Ok(())
    }

    fn take(&self, fd: i64) -> Result<OwnedFd, RestoreError> {
        self.call(
            "pidfd_getfd (take)",
            libc::SYS_pidfd_getfd,
            [fd as u64, 0, 0, 0, 0, 0],
        )?;
        self.numbers
            .borrow()
            .get(&fd)
            .and_then(|f| f.try_clone().ok())
            .ok_or_else(|| {
                RestoreError::NotSupported(format!(
                    "descriptor {fd} holds nothing the fake adopted"
                ))
            })
    }

    fn adopt(&self, ours: BorrowedFd<'_>) -> Result<i64, RestoreError> {
        let got = self.new_fd();
        let dup = ours
            .try_clone_to_owned()
            .map_err(|err| RestoreError::Syscall {
                call: "dup (fake adopt)".into(),
                err,
            })?;
        if let Ok(copy) = dup.try_clone() {
            self.numbers.borrow_mut().insert(got, copy);
        }
        self.kept.borrow_mut().push(dup);
        self.events.borrow_mut().push(Event::Adopt {
            ours: ours.as_raw_fd(),
            got,
        });
        Ok(got)
    }
}
