# shellcheck shell=bash
# Writes a container image as an archive every runtime on a node can load without a
# registry: an OCI image layout (image-spec v1.0: one uncompressed layer, its config, a
# manifest, an index naming the image) plus a Docker-style manifest.json beside it, so
# that `ctr images import` (containerd, kind's `kind load image-archive`, `k3s ctr images
# import`), `podman load` and `docker load` all accept the same file.
#
# Source this file, then:
#   oci_archive NAME ROOTFS_TAR CONFIG_JSON WORK_DIR OUT_TAR
#     NAME         the image reference, e.g. localhost/ferry:dev
#     ROOTFS_TAR   the root filesystem as a tar (made reproducibly by the caller)
#     CONFIG_JSON  the image config's "config" object, e.g. {"Entrypoint":["/bin/x"]}
#     WORK_DIR     an empty scratch directory
#     OUT_TAR      where the archive goes (written whole, then renamed into place)
#
# Reproducible: the same rootfs and config give the same bytes (fixed mtimes and owners).

oci_archive() {
    local name=$1 rootfs=$2 config=$3 work=$4 out=$5
    local layout=$work/layout blobs digest size arch
    blobs=$layout/blobs/sha256
    mkdir -p "$blobs"
    arch=$(dpkg --print-architecture) # amd64, arm64, ...: the OCI names for these

    # _blob FILE: stores FILE as a blob, sets digest and size.
    _blob() {
        digest=$(sha256sum <"$1" | cut -d' ' -f1)
        size=$(stat -c %s "$1")
        cp "$1" "$blobs/$digest"
    }

    _blob "$rootfs"
    local layer_digest=$digest layer_size=$size
    printf '%s' "{\"architecture\":\"$arch\",\"os\":\"linux\",\"config\":$config,\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer_digest\"]},\
\"history\":[{\"created_by\":\"scripts/lib/oci-archive.sh\"}]}" >"$work/config.json"
    _blob "$work/config.json"
    local config_digest=$digest config_size=$size
    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\
\"digest\":\"sha256:$config_digest\",\"size\":$config_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\
\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}]}" >"$work/manifest.json"
    _blob "$work/manifest.json"
    local manifest_digest=$digest manifest_size=$size

    # containerd names the image after io.containerd.image.name; other OCI tools after
    # org.opencontainers.image.ref.name (the tag alone, by the spec's convention).
    printf '%s' "{\"schemaVersion\":2,\"manifests\":[{\
\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"digest\":\"sha256:$manifest_digest\",\"size\":$manifest_size,\
\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"},\
\"annotations\":{\"io.containerd.image.name\":\"$name\",\
\"org.opencontainers.image.ref.name\":\"${name##*:}\"}}]}" >"$layout/index.json"
    printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
    # Docker's archive format points at the same blobs by path.
    printf '%s' "[{\"Config\":\"blobs/sha256/$config_digest\",\"RepoTags\":[\"$name\"],\
\"Layers\":[\"blobs/sha256/$layer_digest\"]}]" >"$layout/manifest.json"

    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        -C "$layout" -cf "$work/archive.tar" oci-layout index.json manifest.json blobs
    mv -f "$work/archive.tar" "$out"
}
