//! The client-facing Service of the proxies.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mailproxy_crds::proxy_pool::ServiceType;

use super::Pool;
use super::config::listeners;
use crate::labels::{self, Component, names};

pub fn service(pool: &Pool<'_>) -> Service {
    let spec = &pool.spec.service;
    let mut metadata = pool.child_meta(names::proxy(pool.name), Component::Proxy);
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    let ports = listeners(pool.spec)
        .into_iter()
        .map(|listener| ServicePort {
            name: Some(listener.name.into()),
            port: listener.port,
            target_port: Some(IntOrString::String(listener.name.into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        })
        .collect();
    // Local keeps the client's source address (no SNAT to another node); only NodePort and
    // LoadBalancer Services have an external traffic policy.
    let external_traffic_policy = (spec.preserve_client_ip && spec.type_ != ServiceType::ClusterIP)
        .then(|| "Local".to_string());
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().into()),
            selector: Some(labels::selector(pool.name, Component::Proxy)),
            ports: Some(ports),
            external_traffic_policy,
            ip_family_policy: spec.ip_family_policy.map(|policy| policy.as_str().into()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pool, spec};
    use super::*;
    use serde_json::json;

    fn build(json: serde_json::Value) -> ServiceSpec {
        let spec = spec(json);
        service(&pool(&spec)).spec.unwrap()
    }

    #[test]
    fn service_type_ports_and_annotations_follow_the_spec() {
        let svc = build(json!({}));
        assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
        assert!(svc.external_traffic_policy.is_none());
        let ports: Vec<(String, i32)> = svc
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("imap".into(), 143),
                ("pop3".into(), 110),
                ("http".into(), 80)
            ]
        );
        assert_eq!(
            svc.selector.unwrap()["app.kubernetes.io/component"],
            "proxy"
        );

        let lb = build(
            json!({"service": {"type": "LoadBalancer", "preserveClientIp": true,
                                          "annotations": {"lb": "internal"}}}),
        );
        assert_eq!(lb.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(lb.external_traffic_policy.as_deref(), Some("Local"));
        let node_port = build(json!({"service": {"type": "NodePort"}}));
        assert_eq!(node_port.type_.as_deref(), Some("NodePort"));
        assert!(node_port.external_traffic_policy.is_none());
        assert!(node_port.ip_family_policy.is_none());
        let dual = build(json!({"service": {"ipFamilyPolicy": "PreferDualStack"}}));
        assert_eq!(dual.ip_family_policy.as_deref(), Some("PreferDualStack"));

        let spec = spec(json!({"service": {"annotations": {"lb": "internal"}}}));
        let annotated = service(&pool(&spec));
        assert_eq!(annotated.metadata.annotations.unwrap()["lb"], "internal");
    }
}
