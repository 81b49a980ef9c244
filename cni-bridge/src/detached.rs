//! Work left to a detached process, so that the plugin's exit (which the runtime waits
//! for) does not wait for it: the deletion of a veth pair, whose sender the kernel holds
//! for two RCU grace periods and an `rcu_barrier` (see `plugin::retire_veth`). The
//! firewall's hand-over of its netfilter socket (`firewall::driver`) is the same pattern
//! for a descriptor's release.

/// Sends `request` (rtnetlink, framed) from a detached grandchild process in the calling
/// thread's network namespace, which exits when the kernel has processed it. Returns the
/// read end of a pipe whose write end only the grandchild holds (it hangs up when the
/// grandchild is gone), or None if no grandchild could be started. The grandchild keeps no
/// other descriptor, so it holds none of the runtime's pipes open; the child between exits
/// at once and is reaped here. After fork only raw system calls run (the plugin has other
/// threads).
pub fn send_rtnetlink(request: &[u8]) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: sockaddr_nl is plain data; all zeroes but the family addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: pipe2 fills the array it is given. Between fork and _exit the children only
    // make raw system calls (fork, close_range, socket, sendto, _exit), which are
    // async-signal-safe, on memory prepared before the fork; the parent waits for its child.
    unsafe {
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let [read_end, write_end] = pipe;
        let child = libc::fork();
        if child == 0 {
            if libc::fork() == 0 {
                let keep = write_end as libc::c_uint;
                libc::syscall(libc::SYS_close_range, 0u32, keep - 1, 0u32);
                libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
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
            }
            libc::_exit(0);
        }
        libc::close(write_end);
        if child < 0 {
            libc::close(read_end);
            return None;
        }
        let mut status = 0;
        while libc::waitpid(child, &mut status, 0) < 0 && *libc::__errno_location() == libc::EINTR {}
        Some(std::os::fd::OwnedFd::from_raw_fd(read_end))
    }
}

/// Waits up to `timeout` for the grandchild of [`send_rtnetlink`] to be gone.
pub fn exited(pipe: &std::os::fd::OwnedFd, timeout: std::time::Duration) -> bool {
    use std::os::fd::AsRawFd;
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
