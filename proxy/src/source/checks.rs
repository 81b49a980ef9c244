//! Objects that decode but cannot be served: a port outside 1–65535, a clusterIP or
//! endpoint address that is no IP (`10.96.0.300`, `garbage`), an IPv6 address in an IPv4
//! EndpointSlice. The store's conversion would quietly leave such fields out, so the
//! manifests source refuses the whole object instead and says which field is wrong
//! (a half-served Service is harder to notice than a missing one).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The first field of an object that cannot be served: its path and what is wrong.
pub type Problem = (String, String);

fn port(field: String, value: i32) -> Result<(), Problem> {
    if (1..=65535).contains(&value) {
        Ok(())
    } else {
        Err((field, format!("{value} is not a port (1-65535)")))
    }
}

fn ip(field: String, value: &str) -> Result<IpAddr, Problem> {
    value
        .trim()
        .parse()
        .map_err(|_| (field, format!("{value:?} is not an IP address")))
}

pub fn service(service: &Service) -> Result<(), Problem> {
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        port(format!("spec.ports[{i}].port"), p.port)?;
        // 0 (or absent) means "not allocated yet".
        if let Some(node_port) = p.node_port.filter(|n| *n != 0) {
            port(format!("spec.ports[{i}].nodePort"), node_port)?;
        }
        if let Some(IntOrString::Int(target)) = p.target_port {
            port(format!("spec.ports[{i}].targetPort"), target)?;
        }
    }
    let headless = |v: &str| v.is_empty() || v == "None";
    if let Some(cluster_ip) = spec.cluster_ip.as_deref().filter(|v| !headless(v)) {
        ip("spec.clusterIP".into(), cluster_ip)?;
    }
    for (i, v) in spec.cluster_ips.iter().flatten().enumerate() {
        if !headless(v) {
            ip(format!("spec.clusterIPs[{i}]"), v)?;
        }
    }
    for (i, v) in spec.external_ips.iter().flatten().enumerate() {
        ip(format!("spec.externalIPs[{i}]"), v)?;
    }
    Ok(())
}

pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(), Problem> {
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        // FQDN slices are not served (as in kube-proxy), whatever they hold.
        "FQDN" => return Ok(()),
        other => {
            return Err((
                "addressType".into(),
                format!("{other:?} is none of IPv4, IPv6, FQDN"),
            ))
        }
    };
    for (i, e) in slice.endpoints.iter().enumerate() {
        for (j, a) in e.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            let addr = ip(field.clone(), a)?;
            if want_v4 != Some(addr.is_ipv4()) {
                let problem = format!("{a} is not an {} address", slice.address_type);
                return Err((field, problem));
            }
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(value) = p.port {
            port(format!("ports[{i}].port"), value)?;
        }
    }
    Ok(())
}

/// For kinds whose fields are all served as they decode.
pub fn nothing<T>(_: &T) -> Result<(), Problem> {
    Ok(())
}
