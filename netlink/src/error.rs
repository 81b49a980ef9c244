//! The errors of the netlink layer: each names the request that failed (family, message
//! type and its subject, e.g. `rtnetlink RTM_NEWLINK veth1`) so a caller only adds what it
//! was doing.

use std::fmt;
use std::io;

/// What went wrong below the plugin or the daemon: a socket, the kernel's answer, or a
/// network namespace.
#[derive(Debug)]
pub enum Error {
    /// The socket could not be opened or bound: a kernel without this netlink family
    /// (`EPROTONOSUPPORT`), or no file descriptors left.
    Open { family: &'static str, source: io::Error },
    /// Sending a request or receiving its answer failed at the socket.
    Socket { request: String, source: io::Error },
    /// The kernel refused the request. `message` is its extended ack text, when it gave one
    /// (`"Invalid VLAN id"`, `"Attribute failed policy validation"`).
    Kernel {
        request: String,
        errno: i32,
        message: Option<String>,
    },
    /// The kernel's answer could not be decoded (a message this crate's codecs do not
    /// understand). The rest of the answer was read, so the socket stays usable.
    Decode { request: String, reason: String },
    /// The kernel answered with something the request does not expect (no answer to a
    /// `GET`, a datagram larger than the receive buffer).
    Unexpected { request: String, what: String },
    /// A caller asked for something the request cannot express; `fix` says what to pass.
    InvalidRequest { what: String, fix: &'static str },
    /// A network namespace could not be opened (`path` missing, not readable).
    NetnsOpen { path: String, source: io::Error },
    /// The thread could not enter the namespace: `path` is not a network namespace, or
    /// the process lacks CAP_SYS_ADMIN.
    NetnsEnter { path: String, source: nix::Error },
    /// The closure run inside the namespace panicked; its message, when it had one.
    NetnsThreadPanicked { path: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The errno behind this error, if there is one: the kernel's answer, or the system
    /// call that failed. Callers test it for the expected refusals (`EEXIST`, `ENOENT`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Open { source, .. } | Error::Socket { source, .. } | Error::NetnsOpen { source, .. } => {
                source.raw_os_error()
            }
            Error::NetnsEnter { source, .. } => Some(*source as i32),
            _ => None,
        }
    }

    /// The request this error is about, when it is about one.
    pub fn request(&self) -> Option<&str> {
        match self {
            Error::Socket { request, .. }
            | Error::Kernel { request, .. }
            | Error::Decode { request, .. }
            | Error::Unexpected { request, .. } => Some(request),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { family, source } => write!(
                f,
                "cannot open a {family} netlink socket: {source} (\"Protocol not supported\" means \
                 this kernel was built without {family})"
            ),
            Error::Socket { request, source } => write!(f, "{request}: {source}"),
            Error::Kernel {
                request,
                errno,
                message,
            } => {
                write!(f, "{request}: {}", io::Error::from_raw_os_error(*errno))?;
                match message {
                    Some(m) => write!(f, " (kernel: {m})"),
                    None => Ok(()),
                }
            }
            Error::Decode { request, reason } => {
                write!(f, "{request}: cannot decode the kernel's answer: {reason}")
            }
            Error::Unexpected { request, what } => write!(f, "{request}: {what}"),
            Error::InvalidRequest { what, fix } => write!(f, "{what}: {fix}"),
            Error::NetnsOpen { path, source } => write!(
                f,
                "cannot open network namespace {path}: {source} (give the path of a network \
                 namespace, e.g. /run/netns/<name> or /proc/<pid>/ns/net)"
            ),
            Error::NetnsEnter { path, source } => write!(
                f,
                "cannot enter {path}: {source} (it must be a network namespace, and entering one \
                 needs CAP_SYS_ADMIN)"
            ),
            Error::NetnsThreadPanicked { path, message } => {
                write!(f, "the thread working inside {path} panicked: {message}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. } | Error::Socket { source, .. } | Error::NetnsOpen { source, .. } => {
                Some(source)
            }
            Error::NetnsEnter { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// For callers whose own errors are `io::Error`: the kind follows the errno, the text
/// keeps the request and the kernel's message.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno).kind(),
            None => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
