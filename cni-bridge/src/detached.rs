//! Work left to a detached process, so that the plugin's exit (which the runtime waits
//! for) does not wait for it: the deletion of a veth pair, whose sender the kernel holds
//! for two RCU grace periods and an `rcu_barrier` (see `plugin::retire_veth`). The
//! firewall's hand-over of its netfilter socket (`firewall::driver`) is the same pattern
//! for a descriptor's release.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Runs `job` in a detached grandchild process that keeps only the descriptors in `keep`
/// (so it holds none of the runtime's pipes open) and exits when `job` returns. The child
/// between exits at once and is reaped here, so no zombie stays behind. False when no
/// process could be started (the caller then does the work itself).
///
/// # Safety
///
/// The plugin has other threads, so after fork only async-signal-safe system calls may
/// run: `job` must make raw system calls only (no allocation, no locks), on memory
/// prepared before this call.
pub unsafe fn in_grandchild(keep: &[RawFd], job: impl FnOnce()) -> bool {
    // Sorted here, before fork: the grandchild closes the gaps between them.
    let mut kept = [-1 as RawFd; 4];
    assert!(
        keep.len() <= kept.len(),
        "in_grandchild keeps at most 4 descriptors"
    );
    kept[..keep.len()].copy_from_slice(keep);
    let kept = &mut kept[..keep.len()];
    kept.sort_unstable();
    // SAFETY: the caller's contract; fork, close_range, waitpid and _exit are raw calls.
    unsafe {
        let child = libc::fork();
        if child == 0 {
            if libc::fork() == 0 {
                let mut from: libc::c_uint = 0;
                for &fd in kept.iter() {
                    let fd = fd as libc::c_uint;
                    if fd > from {
                        libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32);
                    }
                    from = fd + 1;
                }
                libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32);
                job();
            }
            libc::_exit(0);
        }
        if child < 0 {
            return false;
        }
        let mut status = 0;
        while libc::waitpid(child, &mut status, 0) < 0 && *libc::__errno_location() == libc::EINTR {}
        true
    }
}

/// Sends `request` (rtnetlink, framed) from a detached grandchild process in the calling
/// thread's network namespace, which exits when the kernel has processed it. Returns the
/// read end of a pipe whose write end only the grandchild holds (it hangs up when the
/// grandchild is gone), or None if no grandchild could be started.
pub fn send_rtnetlink(request: &[u8]) -> Option<OwnedFd> {
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: sockaddr_nl is plain data; all zeroes but the family addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: pipe2 fills the array it is given; the job makes raw system calls only
    // (socket, sendto) on memory prepared before the fork; each descriptor is closed once.
    unsafe {
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let [read_end, write_end] = pipe;
        let started = in_grandchild(&[write_end], || {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
            if fd >= 0 {
                libc::sendto(
                    fd,
                    request.as_ptr().cast(),
                    request.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                );
            }
        });
        libc::close(write_end);
        if !started {
            libc::close(read_end);
            return None;
        }
        Some(OwnedFd::from_raw_fd(read_end))
    }
}

/// Waits up to `timeout` for the grandchild of [`send_rtnetlink`] to be gone.
pub fn exited(pipe: &OwnedFd, timeout: std::time::Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Sub-millisecond waits: ppoll takes a timespec.
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let n = unsafe { libc::ppoll(&mut fds, 1, &ts, std::ptr::null()) };
    n > 0 && fds.revents & (libc::POLLHUP | libc::POLLIN) != 0
}
