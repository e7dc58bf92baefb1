//! Objects made once in the restorer for every process of a restore that
//! holds them (a pipe or socket inherited across `fork` is one object), and
//! handed to each process with `pidfd_getfd`.

use std::{collections::HashMap, os::fd::OwnedFd, sync::Mutex};

use cr_ebpf_image::FdKind;

use crate::RestoreError;

/// The shared objects, by kind, id (an inode) and part (a pipe's two ends).
#[derive(Debug, Default)]
pub struct Shared {
    objects: HashMap<(u16, u64, u8), OwnedFd>,
    /// Objects used once, by the restore of one process, then closed.
    once: Mutex<HashMap<(u16, u64, u8), OwnedFd>>,
}

impl Shared {
    /// Keeps part `part` of object `id` of `kind`.
    pub fn insert(&mut self, kind: FdKind, id: u64, part: u8, fd: OwnedFd) {
        self.objects.insert((kind as u16, id, part), fd);
    }

    /// Keeps part `part` of object `id` of `kind` for one use
    /// ([`Shared::take_once`]).
    pub fn insert_once(&mut self, kind: FdKind, id: u64, part: u8, fd: OwnedFd) {
        self.once
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .insert((kind as u16, id, part), fd);
    }

    /// Part `part` of object `id` of `kind` kept by [`Shared::insert_once`],
    /// given away: it is the caller's to close.
    pub fn take_once(&self, kind: FdKind, id: u64, part: u8) -> Option<OwnedFd> {
        self.once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(kind as u16, id, part))
    }

    /// Whether object `id` of `kind` was made.
    pub fn contains(&self, kind: FdKind, id: u64) -> bool {
        self.objects.contains_key(&(kind as u16, id, 0))
    }

    /// Whether part `part` of object `id` of `kind` was made.
    pub fn contains_part(&self, kind: FdKind, id: u64, part: u8) -> bool {
        self.objects.contains_key(&(kind as u16, id, part))
    }

    /// Part `part` of object `id` of `kind`, or an error naming descriptor `fd`.
    /// Whether part `part` of object `id` of `kind` is kept.
    pub fn has(&self, kind: FdKind, id: u64, part: u8) -> bool {
        self.objects.contains_key(&(kind as u16, id, part))
    }

    pub fn get(&self, kind: FdKind, id: u64, part: u8, fd: i32) -> Result<&OwnedFd, RestoreError> {
        self.objects.get(&(kind as u16, id, part)).ok_or_else(|| {
            RestoreError::NotSupported(format!("{kind:?} on descriptor {fd} was not rebuilt"))
        })
    }
}
