//! Section CGROUP_DIR (format 1.9; one per cgroup directory recorded with a
//! process): what a cgroup directory held that a restore needs when it has
//! to make the directory again — its owner and mode, those of the files in
//! it, and the controller settings written in it.

use crate::codec::{Dec, DecErr, Enc};

use super::PATH_CAP;

/// The first format minor with CGROUP_DIR sections.
pub(super) const SINCE: u16 = 9;
/// Most CGROUP_DIR sections in one manifest.
pub(super) const CGROUP_DIRS_CAP: usize = 4096;
/// Most files recorded for one directory, and most settings.
const FILES_CAP: usize = 1024;
/// Longest file name in a cgroup directory.
const NAME_CAP: usize = 255;
/// Longest setting value (`devices.list`, `io.max` with many devices).
const VALUE_CAP: usize = 64 << 10;
/// Longest controllers field.
const CONTROLLERS_CAP: usize = 1024;

/// A file's or directory's owner and mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// One cgroup directory (format 1.9).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupDir {
    /// The hierarchy's controllers as `/proc/PID/cgroup` lists them (empty
    /// for v2).
    pub controllers: String,
    /// The cgroup's absolute path in its hierarchy.
    pub path: String,
    /// The directory's owner and mode.
    pub owner: Owner,
    /// Every file in it, by name, with its owner and mode.
    pub files: Vec<(String, Owner)>,
    /// Controller settings, in the order a restore writes them: (file,
    /// value as read).
    pub settings: Vec<(String, String)>,
}

fn encode_owner(b: &mut Enc, o: &Owner) {
    b.u32(o.mode);
    b.u32(o.uid);
    b.u32(o.gid);
}

fn decode_owner(b: &mut Dec<'_>) -> Result<Owner, DecErr> {
    let o = Owner {
        mode: b.u32()?,
        uid: b.u32()?,
        gid: b.u32()?,
    };
    if o.mode & !0o7777 != 0 {
        return Err(b.err(format!(
            "cgroup file mode {:#o} has bits past 0o7777",
            o.mode
        )));
    }
    Ok(o)
}

fn decode_name(b: &mut Dec<'_>) -> Result<String, DecErr> {
    let name = b.str(NAME_CAP, "cgroup file name")?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(b.err(format!("cgroup file name {name:?} is not a plain name")));
    }
    Ok(name)
}

impl CgroupDir {
    /// The CGROUP_DIR section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.str(&self.controllers);
        b.str(&self.path);
        encode_owner(b, &self.owner);
        b.u32(self.files.len() as u32);
        for (name, o) in &self.files {
            b.str(name);
            encode_owner(b, o);
        }
        b.u32(self.settings.len() as u32);
        for (name, value) in &self.settings {
            b.str(name);
            b.str(value);
        }
    }

    /// Reads a CGROUP_DIR section's body.
    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let controllers = b.str(CONTROLLERS_CAP, "cgroup controllers")?;
        let path = b.str(PATH_CAP, "cgroup path")?;
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(b.err(format!("cgroup path {path:?} is not absolute and plain")));
        }
        let owner = decode_owner(b)?;
        let n = b.u32()? as usize;
        if n > FILES_CAP {
            return Err(b.err(format!("{n} files in a cgroup (at most {FILES_CAP})")));
        }
        let files = (0..n)
            .map(|_| Ok((decode_name(b)?, decode_owner(b)?)))
            .collect::<Result<_, DecErr>>()?;
        let n = b.u32()? as usize;
        if n > FILES_CAP {
            return Err(b.err(format!("{n} cgroup settings (at most {FILES_CAP})")));
        }
        let settings = (0..n)
            .map(|_| Ok((decode_name(b)?, b.str(VALUE_CAP, "cgroup setting")?)))
            .collect::<Result<_, DecErr>>()?;
        Ok(Self {
            controllers,
            path,
            owner,
            files,
            settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CgroupDir {
        let o = Owner {
            mode: 0o777,
            uid: 1000,
            gid: 1000,
        };
        CgroupDir {
            controllers: "name=zdtmtst".into(),
            path: "/test/sub".into(),
            owner: o,
            files: vec![
                ("cgroup.procs".into(), o),
                ("tasks".into(), Owner::default()),
            ],
            settings: vec![("notify_on_release".into(), "1\n".into())],
        }
    }

    #[test]
    fn a_cgroup_dir_round_trips() {
        let d = sample();
        let mut b = Enc::default();
        d.encode(&mut b);
        let mut r = Dec::new(&b.buf, 0);
        assert_eq!(CgroupDir::decode(&mut r).unwrap(), d);
    }

    #[test]
    fn crafted_names_paths_and_modes_are_refused() {
        for (bad, what) in [
            (
                CgroupDir {
                    path: "/a/../../etc".into(),
                    ..sample()
                },
                "not absolute and plain",
            ),
            (
                CgroupDir {
                    files: vec![("../x".into(), Owner::default())],
                    ..sample()
                },
                "not a plain name",
            ),
            (
                CgroupDir {
                    settings: vec![("".into(), "1".into())],
                    ..sample()
                },
                "not a plain name",
            ),
            (
                CgroupDir {
                    owner: Owner {
                        mode: 0o170777,
                        ..Owner::default()
                    },
                    ..sample()
                },
                "bits past",
            ),
        ] {
            let mut b = Enc::default();
            bad.encode(&mut b);
            let err = CgroupDir::decode(&mut Dec::new(&b.buf, 0)).unwrap_err();
            assert!(err.what.contains(what), "{err:?}");
        }
    }
}
