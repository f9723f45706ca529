//! A tap device opened through /dev/net/tun: layer-2 frames with a 12-byte virtio-net header in
//! front of each (IFF_VNET_HDR with TUNSETVNETHDRSZ, the virtio 1.x header size), so frames pass
//! between the guest's queues and the tap without translation. Non-blocking.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header of every frame on the tap.
pub const VNET_HDR_LEN: usize = 12;

/// Offloads asked of the tap when the guest takes its GUEST_* features.
pub const ALL_OFFLOADS: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("'{name}' is not a valid interface name")));
    }
    // SAFETY: ifreq is plain data (a name array and a union of integers, addresses and one
    // pointer); all zeros is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

impl Tap {
    /// Attaches to the tap `name`, creating it (non-persistent: it goes away with us) when it
    /// does not exist, and brings its link up if it is down.
    pub fn open(name: &str) -> io::Result<Tap> {
        let mut req = ifreq_for(name)?;
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e} (is it a tap, and may we open it?)")));
        }
        let tap = Tap { file, name: name.to_owned() };
        tap.set_header_size()?;
        if let Err(e) = tap.bring_up() {
            eprintln!("ferro: tap {name}: cannot bring the link up ({e}); the host side must do it");
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Takes over descriptor `fd`, inherited from whoever started us, which must be a
    /// /dev/net/tun file attached to the tap `name` with the flags [`Tap::open`] uses (ferrod
    /// creates and plugs the tap, so the VMM needs no network privileges). The descriptor becomes
    /// close-on-exec and non-blocking; anything else behind it is refused and left open.
    pub fn from_fd(fd: RawFd, name: &str) -> io::Result<Tap> {
        ifreq_for(name)?;
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails on a closed descriptor.
        let fd_flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if fd < 3 || fd_flags < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not an open inherited descriptor")));
        }
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF fills one ifreq, which lives for the call; on anything but a tun
        // file it fails and changes nothing.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a tap ({})", io::Error::last_os_error())));
        }
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name (at most IFNAMSIZ bytes).
        let attached = unsafe { std::ffi::CStr::from_ptr(req.ifr_name.as_ptr()) }.to_string_lossy().into_owned();
        // SAFETY: TUNGETIFF set the flags member of the union.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if attached != name || flags & wanted != wanted {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} is {attached:?} with flags {flags:#x}, not the tap {name:?} with a virtio-net header and no packet info"),
            ));
        }
        // SAFETY: F_SETFD and F_SETFL on a descriptor checked above to be open.
        let status = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) } < 0 || status < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is open, is a tun file (checked above), and was handed to us to own: the
        // VmConfig names it for this device alone.
        let file = unsafe { File::from_raw_fd(fd) };
        let tap = Tap { file, name: name.to_owned() };
        tap.set_header_size()?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn set_header_size(&self) -> io::Result<()> {
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the call.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads it may leave to us (TUN_F_* flags): partial checksums
    /// and segments larger than the MTU in frames it hands us.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the tap accepts every checksum and TSO offload (then cleared again until a guest
    /// takes them).
    pub fn supports_offloads(&self) -> bool {
        let ok = self.set_offload(ALL_OFFLOADS).is_ok();
        let _ = self.set_offload(0);
        ok
    }

    fn bring_up(&self) -> io::Result<()> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a socket we just opened and own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: SIOCGIFFLAGS fills the flags of one ifreq, which lives for the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS set the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads one ifreq, which lives for the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header included); WouldBlock when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
