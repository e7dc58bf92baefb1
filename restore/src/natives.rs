//! Pipes, sockets and shared memory objects rebuilt once in the restorer
//! for every process that holds them (one inherited across `fork` is one
//! object), and handed to each with `pidfd_getfd`.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, Manifest};

use crate::RestoreError;

/// Rebuilt pipes and sockets, by inode.
pub(crate) struct Natives {
    /// (read end, write end).
    pub pipes: HashMap<u64, (OwnedFd, OwnedFd)>,
    pub sockets: HashMap<u64, OwnedFd>,
    /// Shared memory objects, by id.
    pub shmem: HashMap<u64, OwnedFd>,
}

fn pipe(size: u32, data: &[u8]) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let fail = |call: &str| {
        let call = call.to_string();
        move |err| RestoreError::Syscall { call, err }
    };
    let mut fds = [0; 2];
    // SAFETY: the kernel writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fail("pipe2")(io::Error::last_os_error()));
    }
    // SAFETY: two new descriptors we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if size > 0 {
        // SAFETY: fcntl on our pipe.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    }
    let mut off = 0;
    while off < data.len() {
        // SAFETY: writing our own buffer into our pipe.
        let n =
            unsafe { libc::write(w.as_raw_fd(), data[off..].as_ptr().cast(), data.len() - off) };
        if n <= 0 {
            return Err(fail("refilling a pipe")(io::Error::last_os_error()));
        }
        off += n as usize;
    }
    Ok((r, w))
}

impl Natives {
    /// The pipes and sockets of every process in `ms`.
    pub fn build(ms: &[&Manifest], close_connections: bool) -> Result<Self, RestoreError> {
        let fds: Vec<&FdInfo> = ms.iter().flat_map(|m| m.fds.iter()).collect();
        let mut pipes = HashMap::new();
        for f in fds.iter().filter(|f| f.kind == FdKind::Pipe) {
            if pipes.contains_key(&f.inode) {
                continue;
            }
            let same = fds
                .iter()
                .filter(|g| g.kind == FdKind::Pipe && g.inode == f.inode);
            let size = same.clone().map(|g| g.pipe_size).max().unwrap_or(0);
            let data = same
                .map(|g| &g.data[..])
                .find(|d| !d.is_empty())
                .unwrap_or(&[]);
            pipes.insert(f.inode, pipe(size, data)?);
        }
        let sockets: Vec<(i32, &cr_ebpf_image::SocketInfo)> = fds
            .iter()
            .filter_map(|f| match &f.state {
                FdState::Socket(s) => Some((f.fd, s.as_ref())),
                _ => None,
            })
            .collect();
        let sockets = crate::sockets::build(&sockets, close_connections)?;
        // Every process of a tree names the objects it maps; one of them
        // holds each object's contents.
        let mut objects: Vec<cr_ebpf_image::ShmemObject> = Vec::new();
        for o in ms.iter().flat_map(|m| m.shmem.iter()) {
            match objects.iter_mut().find(|x| x.id == o.id) {
                Some(x) if x.elsewhere && !o.elsewhere => *x = o.clone(),
                Some(_) => {}
                None => objects.push(o.clone()),
            }
        }
        if let Some(o) = objects.iter().find(|o| o.elsewhere) {
            return Err(RestoreError::NotSupported(format!(
                "the contents of shared memory object {} ({:?} {:?}) are in no image of \
                 this checkpoint (an image of the tree is missing?)",
                o.id, o.kind, o.name
            )));
        }
        let shmem = crate::shmem::build(&objects)?;
        Ok(Self {
            pipes,
            sockets,
            shmem,
        })
    }
}
