//! Taps for guests' NICs: created persistent with `TUNSETIFF` + `TUNSETPERSIST` so they outlive
//! the file that made them, then opened again to hand the fd to a VMM (which then needs no
//! network privileges of its own). Deleting a tap is a netlink link deletion ([`crate::link`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// The flags every Ferrovisor tap is opened with: layer 2, no packet-info prefix, and a virtio-net
/// header in front of each frame (the VMM sets the header size on the fd it gets).
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Attaches a new /dev/net/tun file to the tap `name` (creating the tap if it does not exist).
fn attach(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not an interface name")));
    }
    let file = File::options().read(true).write(true).custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data (a name array and a union of integers, addresses and one
    // pointer); all zeros is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Creates the tap `name`, persistent: it stays when no file has it open.
pub fn create_persistent(name: &str) -> io::Result<()> {
    let file = attach(name)?;
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the existing tap `name` for a VMM: non-blocking, close-on-exec (whoever hands it on
/// clears that for the child).
pub fn open(name: &str) -> io::Result<OwnedFd> {
    attach(name).map(OwnedFd::from)
}
