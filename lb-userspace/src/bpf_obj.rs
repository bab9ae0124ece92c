//! Pinned BPF objects by descriptor: open a pin, read an object's id, and
//! pin a descriptor again. aya consumes its link handle when pinning (a
//! failed pin would drop the last descriptor and detach XDP), so the
//! daemon keeps its own descriptors of the link and maps and re-pins them
//! with these three syscalls when someone removed the pins under it.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for BPF_OBJ_PIN / BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly laid out bpf_attr of the given size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Opens the object pinned at `path` (a new descriptor of the same object).
pub fn get(path: &Path) -> std::io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        ..ObjAttr::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object behind `fd` at `path` (which must not exist).
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjAttr::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// The kernel id of the map, program or link behind `fd` (the second u32 of
/// `bpf_map_info`, `bpf_prog_info` and `bpf_link_info` alike).
pub fn id(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    let mut info = [0u8; 256];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u32::from_ne_bytes([info[4], info[5], info[6], info[7]]))
}

/// What is at a pin path compared with the object we hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCheck {
    /// The pin is there and is our object.
    Ours,
    /// Nothing is pinned there.
    Missing,
    /// Another object (id) is pinned there.
    Other(u32),
}

/// Compares the pin at `path` with the object behind `ours`.
pub fn check(ours: BorrowedFd<'_>, path: &Path) -> std::io::Result<PinCheck> {
    let want = id(ours)?;
    match get(path) {
        Ok(fd) => {
            let got = id(std::os::fd::AsFd::as_fd(&fd))?;
            Ok(if got == want {
                PinCheck::Ours
            } else {
                PinCheck::Other(got)
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PinCheck::Missing),
        Err(e) => Err(e),
    }
}
