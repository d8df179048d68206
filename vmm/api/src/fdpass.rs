//! File descriptors over the control socket (`SCM_RIGHTS`): the client sends one with a request
//! line (`attach_disk` with `fd: true`), the VMM receives them with the bytes they came with.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one received message may carry; more are closed by the kernel
/// (`MSG_CTRUNC`) and never reach the VMM.
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// Room for a control message of [`MAX_FDS_PER_MESSAGE`] descriptors, aligned for `cmsghdr`
/// (`CMSG_SPACE(4 * 4)` is 32 bytes on 64-bit Linux).
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends `bytes` on the connected stream socket `sock` with `fd` attached (`SCM_RIGHTS`).
/// Returns how many bytes went out (the rest is the caller's to write; the descriptor travels
/// with the first byte).
pub(crate) fn send_with_fd(
    sock: RawFd,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<usize> {
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths); fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
    // SAFETY: msg_control points at `cmsg`, big enough for one descriptor (checked above), so
    // CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside the buffer; sendmsg only reads `msg`,
    // `iov` (which points at `bytes`) and `cmsg`, all alive for the call.
    let n = unsafe {
        let h = libc::CMSG_FIRSTHDR(&msg);
        (*h).cmsg_level = libc::SOL_SOCKET;
        (*h).cmsg_type = libc::SCM_RIGHTS;
        (*h).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(h).cast::<RawFd>(), fd.as_raw_fd());
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads into `buf` from the stream socket `sock` (non-blocking or not, as the socket is),
/// appending the descriptors that came with the bytes to `fds` (close-on-exec). Returns the
/// byte count (0: the peer closed its side) and whether descriptors were lost because more than
/// [`MAX_FDS_PER_MESSAGE`] came at once.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<(usize, bool)> {
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths); fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
    // SAFETY: `iov` points at `buf` and `msg_control` at `cmsg`, both writable for the lengths
    // given and alive for the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of `cmsg`; CMSG_FIRSTHDR/NXTHDR stay
    // inside them and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors,
    // new in this process and owned by nobody else.
    unsafe {
        let mut h = libc::CMSG_FIRSTHDR(&msg);
        while !h.is_null() {
            if (*h).cmsg_level == libc::SOL_SOCKET && (*h).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(h).cast::<RawFd>();
                let len = ((*h).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            h = libc::CMSG_NXTHDR(&msg, h);
        }
    }
    Ok((n as usize, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_travels_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"disk").unwrap();
        assert_eq!(
            send_with_fd(a.as_raw_fd(), b"line\n", f.as_fd()).unwrap(),
            5
        );
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let (n, lost) = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((&buf[..n], lost, fds.len()), (&b"line\n"[..], false, 1));
        // The same open file: what was written through one is read through the other.
        let mut got = std::fs::File::from(fds.pop().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "disk");
        // Plain bytes bring no descriptors.
        (&a).write_all(b"x").unwrap();
        let (n, lost) = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((n, lost, fds.len()), (1, false, 0));
    }
}
