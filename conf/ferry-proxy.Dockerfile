# The ferry-proxy image conf/ferry-proxy.yaml runs. From the repository root:
#
#   docker build -f conf/ferry-proxy.Dockerfile -t ghcr.io/ferry/ferry-proxy:dev .
#   kind load docker-image ghcr.io/ferry/ferry-proxy:dev
#
# (k3s: `docker save ghcr.io/ferry/ferry-proxy:dev | sudo k3s ctr images import -` on each
# node, or push it to a registry the nodes can reach and change the image in the YAML.)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferry-proxy

FROM debian:bookworm-slim
# nftables: not needed by the proxy (it programs the kernel over netlink), but `nft list
# table inet ferry-proxy` inside the Pod is how an operator looks at what it did.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ferry-proxy /usr/local/bin/ferry-proxy
ENTRYPOINT ["/usr/local/bin/ferry-proxy"]
