//! Finding the binaries under test: Ferry's own (built by cargo) and the reference CNI
//! plugins from Debian's containernetworking-plugins.

use std::path::{Path, PathBuf};

/// Where Debian's containernetworking-plugins package puts the reference plugins.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The directory holding the workspace's binaries: `$FERRY_BIN_DIR` if set (relative paths
/// are taken from the current directory), else the cargo profile directory of the running
/// executable. Test and bench executables live in `target/<profile>/deps/`, binaries such
/// as `ferry-demo` in `target/<profile>/`; the plugins are in `target/<profile>/` either way.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        // Absolute, because it ends up in CNI_PATH and plugins may change directory.
        return std::path::absolute(&dir).unwrap_or(dir);
    }
    let exe = std::env::current_exe().expect("cannot find the path of the running executable");
    let dir = exe.parent().unwrap_or(Path::new("/"));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of the workspace binary `name` (e.g. `ferry-ipam`). Panics, saying how to build
/// it, when it is missing: cargo builds a package's own binaries before its tests, but not
/// other packages' ones.
pub fn ferry_bin(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary {name} not found in {}: run `cargo build --workspace --bins` \
             (make test does this), or point FERRY_BIN_DIR at the directory holding it",
            dir.display()
        );
    }
    path
}

/// The reference plugin `name` (e.g. `host-local`) from Debian's containernetworking-plugins,
/// or `None` when it is not installed (`make setup` installs it).
pub fn reference_plugin(name: &str) -> Option<PathBuf> {
    let path = Path::new(REFERENCE_PLUGIN_DIR).join(name);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_dir_is_the_profile_dir() {
        // Unit tests run from target/<profile>/deps/ unless FERRY_BIN_DIR says otherwise.
        if std::env::var_os("FERRY_BIN_DIR").is_none() {
            let dir = bin_dir();
            assert_ne!(dir.file_name().unwrap(), "deps", "{}", dir.display());
            assert!(dir.join("deps").is_dir(), "{}", dir.display());
        }
    }

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let err = std::panic::catch_unwind(|| ferry_bin("no-such-ferry-binary")).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
    }
}
