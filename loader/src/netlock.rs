//! The network lock between a dump and its restore.
//!
//! [`lock`] loads the `netlock` classifier (`ebpf/src/netlock.rs`) with
//! the connections to hold in its map, attaches it with tcx at the
//! ingress and egress of every interface of our network namespace
//! (loopback included), and pins the links and the map in bpffs under
//! `/sys/fs/bpf/cr-ebpf/NAME/` (bpffs is mounted at `/sys/fs/bpf` when it
//! is not), so the lock outlives the `cr-ebpf` that made it. Packets of a
//! locked connection are dropped in both directions: a peer that sends
//! while no socket holds the connection gets no reset, and TCP sends the
//! data again once [`unlock`] removes the directory (the links go with
//! their last pin).
//!
//! Interfaces that appear after the lock is made are not covered.

use std::{
    ffi::CStr,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::HashMap,
    programs::{
        links::{FdLink, LinkOrder},
        tc::{SchedClassifier, TcAttachOptions, TcAttachType},
    },
    EbpfLoader,
};
use cr_ebpf_common::netlock::{NetLockKey, CONNECTIONS_MAP, PROGRAM};

use crate::LoaderError;

/// The eBPF object of the lock.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cr-ebpf-netlock"));

/// Where bpffs is mounted (and mounted by [`lock`] when it is not).
pub const BPFFS: &str = "/sys/fs/bpf";
/// The directory of every lock, one subdirectory each.
pub const ROOT: &str = cr_ebpf_common::netlock::PIN_ROOT;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What [`lock`] made.
#[derive(Debug, Clone)]
pub struct Locked {
    /// Its directory in bpffs.
    pub dir: PathBuf,
    /// The interfaces it is attached to.
    pub interfaces: Vec<String>,
    /// How many connections it holds.
    pub connections: usize,
}

fn err(what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> LoaderError {
    LoaderError::NetLock {
        what: what.into(),
        source: Box::new(e),
    }
}

/// The directory of the lock `name` (letters, digits, `.`, `_`, `-`).
pub fn dir_of(name: &str) -> Result<PathBuf, LoaderError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(err(
            format!("{name:?} is not a lock name"),
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    Ok(Path::new(ROOT).join(name))
}

/// Whether the lock `name` exists.
pub fn exists(name: &str) -> bool {
    dir_of(name).is_ok_and(|d| d.is_dir())
}

/// The locks that exist, by name.
pub fn list() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// Drops every packet of `connections` from now on, until [`unlock`]`(name)`.
/// On error nothing is left behind.
pub fn lock(name: &str, connections: &[NetLockKey]) -> Result<Locked, LoaderError> {
    let dir = dir_of(name)?;
    mount_bpffs()?;
    std::fs::create_dir_all(ROOT).map_err(|e| err(format!("making {ROOT}"), e))?;
    std::fs::create_dir(&dir).map_err(|e| err(format!("making {}", dir.display()), e))?;
    match attach(&dir, connections) {
        Ok(interfaces) => Ok(Locked {
            dir,
            interfaces,
            connections: connections.len(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn attach(dir: &Path, connections: &[NetLockKey]) -> Result<Vec<String>, LoaderError> {
    let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| {
        if crate::error::is_permission(&e) {
            LoaderError::NotPermitted {
                action: "load the network lock".into(),
                source: io::Error::from_raw_os_error(libc::EPERM),
            }
        } else {
            LoaderError::Load(Box::new(e))
        }
    })?;
    {
        let map = ebpf
            .map_mut(CONNECTIONS_MAP)
            .ok_or(LoaderError::MissingMap(CONNECTIONS_MAP))?;
        let mut conns: HashMap<_, NetLockKey, u32> =
            HashMap::try_from(map).map_err(|e| err("opening the connection map", e))?;
        for c in connections {
            conns
                .insert(c, 1, 0)
                .map_err(|e| err("adding a connection", e))?;
        }
    }
    ebpf.map(CONNECTIONS_MAP)
        .ok_or(LoaderError::MissingMap(CONNECTIONS_MAP))?
        .pin(dir.join("connections"))
        .map_err(|e| err("pinning the connection map", e))?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| {
            err(
                format!("the embedded object has no program `{PROGRAM}`: rebuild cr-ebpf"),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })?
        .try_into()
        .map_err(|e| err("the network lock program", e))?;
    prog.load().map_err(|e| err("loading the classifier", e))?;
    let mut interfaces = Vec::new();
    for ifname in interfaces_here()? {
        for (kind, side) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let id = prog
                .attach_with_options(&ifname, kind, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|e| err(format!("attaching to the {side} of {ifname} (tcx)"), e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| err(format!("the link on {ifname}"), e))?;
            let fd = FdLink::try_from(link).map_err(|e| err(format!("the link on {ifname}"), e))?;
            fd.pin(dir.join(format!("{ifname}-{side}")))
                .map_err(|e| err(format!("pinning the link on {ifname}"), e))?;
        }
        interfaces.push(ifname);
    }
    Ok(interfaces)
}

/// Removes the lock `name`: its connections pass again. False when there
/// was no such lock.
pub fn unlock(name: &str) -> Result<bool, LoaderError> {
    let dir = dir_of(name)?;
    // Emptied first: the links detach only when the kernel's work queue
    // gets to them, the map takes effect at the next packet.
    if let Ok(data) = aya::maps::MapData::from_pin(dir.join("connections")) {
        let mut conns: HashMap<_, NetLockKey, u32> =
            HashMap::try_from(aya::maps::Map::HashMap(data))
                .map_err(|e| err("opening the connection map", e))?;
        let keys: Vec<NetLockKey> = conns.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = conns.remove(&k);
        }
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err(format!("removing {}", dir.display()), e)),
    }
}

/// Mounts bpffs at [`BPFFS`] unless it is there.
fn mount_bpffs() -> Result<(), LoaderError> {
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs into a zeroed struct of ours, on a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: mount(2) with NUL-terminated strings of ours.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(err(
            format!("mounting bpffs at {BPFFS}"),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The names of the interfaces of our network namespace.
fn interfaces_here() -> Result<Vec<String>, LoaderError> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(err("listing the interfaces", io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: within the array, up to and including its zero entry.
        let e = unsafe { &*list.add(i) };
        if e.if_index == 0 || e.if_name.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated name owned by the array.
        out.push(
            unsafe { CStr::from_ptr(e.if_name) }
                .to_string_lossy()
                .into_owned(),
        );
        i += 1;
    }
    // SAFETY: the array if_nameindex returned, freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(out)
}
