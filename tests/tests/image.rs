//! The image `make image` builds (scripts/image/build.sh) is one every runtime on a node
//! accepts without a registry, and does what conf/ferry.yaml asks of it: containerd 1.6
//! imports it (as `ctr images import`, `kind load image-archive` and `k3s ctr images
//! import` do) and runs its init container's installer and its daemon; podman loads it.
//!
//! The image is built from the binaries under test (the debug build), so the test proves
//! the packaging, not a release build: the same script packs `target/release` for
//! `make image`.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry_tests::{bin_dir, require_root, Node};

const IMAGE: &str = "localhost/ferry:test";
const PLUGINS: [&str; 2] = ["ferry-bridge", "ferry-ipam"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed ({}):\nstderr: {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn available(test: &str, program: &str, package: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    found
        || ferry_tests::skip_or_fail(
            test,
            &format!(
                "{program} is not installed: install the Debian package {package} (scripts/setup.sh does)"
            ),
        )
}

/// Builds the image archive from the binaries under test into `dir`.
fn build_image(dir: &Path) -> PathBuf {
    let out = dir.join("ferry-image.tar");
    ok(
        Command::new(repo().join("scripts/image/build.sh"))
            .arg(bin_dir())
            .arg(&out)
            .env("FERRY_IMAGE", IMAGE)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run scripts/image/build.sh"),
        "scripts/image/build.sh",
    );
    out
}

/// Empty CNI configuration and plugin directories for a runtime on `node`: the image
/// tests run no container on a network.
fn empty_cni_dirs(node: &Node) -> (PathBuf, PathBuf) {
    let (conf, plugins) = (node.state_dir().join("net.d"), node.state_dir().join("bin"));
    fs::create_dir_all(&conf).unwrap();
    fs::create_dir_all(&plugins).unwrap();
    (conf, plugins)
}

/// A private containerd on a test node (scripts/runtimes/containerd.sh), stopped on drop.
struct Containerd {
    state: PathBuf,
}

impl Containerd {
    fn start(node: &Node) -> Containerd {
        let state = node.state_dir().join("containerd");
        let (conf, plugins) = empty_cni_dirs(node);
        let script = repo().join("scripts/runtimes/containerd.sh");
        ok(
            Command::new(&script)
                .arg(&state)
                .args(["start", node.name()])
                .args([&conf, &plugins])
                .stdin(Stdio::null())
                .output()
                .expect("cannot run containerd.sh"),
            "containerd.sh start",
        );
        Containerd { state }
    }

    fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        Command::new(repo().join("scripts/runtimes/containerd.sh"))
            .arg(&self.state)
            .arg("ctr")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run containerd.sh")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/runtimes/containerd.sh"))
            .arg(&self.state)
            .arg("stop")
            .stdin(Stdio::null())
            .output();
    }
}

/// What conf/ferry.yaml's init container does, in containerd: the plugins land in the
/// node's plugin directory, whole and executable, other files there are left alone, and a
/// second run (a restarted Pod) rewrites nothing. Then the daemon and nft start in the
/// image (their shared libraries are all there).
#[test]
fn containerd_imports_the_image_and_its_init_container_installs_the_plugins() {
    require_root!();
    if !available(ferry_tests::__function_name!(), "containerd", "containerd") {
        return;
    }
    let node = Node::new("img");
    let archive = build_image(node.state_dir());
    let containerd = Containerd::start(&node);
    let imported = ok(
        containerd.ctr(&[OsStr::new("images"), "import".as_ref(), archive.as_os_str()]),
        "ctr images import",
    );
    assert!(
        imported.contains(IMAGE),
        "ctr images import did not name the image {IMAGE}: {imported}"
    );

    // The node's CNI plugin directory, with a plugin of someone else's in it.
    let dest = node.state_dir().join("opt-cni-bin");
    fs::create_dir_all(&dest).unwrap();
    fs::write(dest.join("loopback"), b"someone else's plugin").unwrap();
    let install_into = |dest: &Path, id: &str| {
        let mount = format!(
            "type=bind,src={},dst=/host/opt/cni/bin,options=rbind:rw",
            dest.display()
        );
        ok(
            containerd.ctr(&[
                "run",
                "--rm",
                "--mount",
                &mount,
                IMAGE,
                id,
                "/usr/local/bin/ferry-install-cni",
                "/host/opt/cni/bin",
            ]),
            "ferry-install-cni in the image",
        )
    };

    let install = |id: &str| install_into(&dest, id);
    let first = install("install-1");
    let mut inodes = Vec::new();
    for plugin in PLUGINS {
        let installed = dest.join(plugin);
        assert!(
            first.contains(&format!("installed /host/opt/cni/bin/{plugin}")),
            "{first}"
        );
        assert_eq!(
            fs::read(&installed).unwrap(),
            fs::read(bin_dir().join(plugin)).unwrap(),
            "{plugin} installed differs from the binary under test"
        );
        let meta = fs::metadata(&installed).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{plugin}'s mode");
        inodes.push(meta.ino());
    }
    let mut names: Vec<String> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["ferry-bridge", "ferry-ipam", "loopback"],
        "no temporary file may stay"
    );
    assert_eq!(fs::read(dest.join("loopback")).unwrap(), b"someone else's plugin");

    let second = install("install-2");
    for (plugin, inode) in PLUGINS.iter().zip(inodes) {
        assert!(
            second.contains(&format!("/host/opt/cni/bin/{plugin} is up to date")),
            "{second}"
        );
        assert_eq!(
            fs::metadata(dest.join(plugin)).unwrap().ino(),
            inode,
            "{plugin} was rewritten"
        );
    }

    let version = ok(
        containerd.ctr(&[
            "run",
            "--rm",
            IMAGE,
            "version",
            "/usr/local/bin/ferry-proxy",
            "--version",
        ]),
        "ferry-proxy --version in the image",
    );
    assert_eq!(
        version.trim(),
        format!("ferry-proxy {}", env!("CARGO_PKG_VERSION"))
    );
    let nft = ok(
        containerd.ctr(&["run", "--rm", IMAGE, "nft", "/usr/sbin/nft", "--version"]),
        "nft --version in the image",
    );
    assert!(nft.starts_with("nftables v"), "{nft}");
}

/// podman (and so docker, whose archive format it reads) loads the same file by name.
#[test]
fn podman_loads_the_image() {
    require_root!();
    if !available(ferry_tests::__function_name!(), "podman", "podman") {
        return;
    }
    let node = Node::new("imgp");
    let archive = build_image(node.state_dir());
    let state = node.state_dir().join("podman");
    let (conf, plugins) = empty_cni_dirs(&node);
    let script = repo().join("scripts/runtimes/podman.sh");
    let podman = |args: &[&OsStr]| {
        Command::new(&script)
            .arg(&state)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run podman.sh")
    };
    ok(
        podman(&[
            "start".as_ref(),
            node.name().as_ref(),
            conf.as_os_str(),
            plugins.as_os_str(),
        ]),
        "podman.sh start",
    );
    let loaded = podman(&[
        "podman".as_ref(),
        "load".as_ref(),
        "-i".as_ref(),
        archive.as_os_str(),
    ]);
    let listed = podman(&[
        "podman".as_ref(),
        "images".as_ref(),
        "--format".as_ref(),
        "{{.Repository}}:{{.Tag}}".as_ref(),
    ]);
    let _ = podman(&["stop".as_ref()]);
    ok(loaded, "podman load");
    let listed = ok(listed, "podman images");
    assert!(listed.lines().any(|l| l == IMAGE), "podman images: {listed}");
}
