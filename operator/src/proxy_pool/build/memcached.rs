//! The pool's memcached: a StatefulSet behind a headless Service, so that each proxy reaches
//! every memcached pod by a stable name, and a NetworkPolicy that admits only the proxies and
//! the operator. No replicas: none of them and an empty server list (the proxies use their
//! embedded cache).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Service, ServicePort,
    ServiceSpec, TCPSocketAction, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Pool;
use super::deployment::container_security_context;
use crate::context::OperatorPods;
use crate::labels::{self, Component, names};

pub const MEMCACHED_PORT: i32 = 11211;
/// The `memcache` user of the official memcached image.
pub const MEMCACHED_UID: i64 = 11211;

/// `<pool>-memcached-<i>.<pool>-memcached.<ns>.svc:11211` for every replica (zmprov gamcs).
pub fn memcached_servers(pool: &Pool<'_>) -> Vec<String> {
    let name = names::memcached(pool.name);
    (0..pool.spec.memcached.replicas.max(0))
        .map(|i| format!("{name}-{i}.{name}.{}.svc:{MEMCACHED_PORT}", pool.namespace))
        .collect()
}

/// The children of a pool's memcached, in the order they are applied: the NetworkPolicy before
/// the pods it guards.
#[derive(Clone, Debug)]
pub struct Memcached {
    pub service: Service,
    pub network_policy: NetworkPolicy,
    pub stateful_set: StatefulSet,
}

/// Admits the pool's proxies and the operator's pods (`operator`) to the memcached port, and
/// nothing else: the proxies trust the routes memcached holds, so a pod that could write one
/// could send a user's login, password included, to itself.
fn network_policy(pool: &Pool<'_>, operator: &OperatorPods) -> NetworkPolicy {
    let match_labels = |labels| LabelSelector {
        match_labels: Some(labels),
        match_expressions: None,
    };
    let proxies = NetworkPolicyPeer {
        pod_selector: Some(match_labels(labels::selector(pool.name, Component::Proxy))),
        ..NetworkPolicyPeer::default()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(match_labels(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            operator.namespace.clone(),
        )]))),
        pod_selector: Some(operator.labels.clone())
            .filter(|labels| !labels.is_empty())
            .map(match_labels),
        ..NetworkPolicyPeer::default()
    };
    NetworkPolicy {
        metadata: pool.child_meta(names::memcached(pool.name), Component::Memcached),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(labels::selector(
                pool.name,
                Component::Memcached,
            ))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![proxies, operator]),
                ports: Some(vec![NetworkPolicyPort {
                    protocol: Some("TCP".into()),
                    port: Some(IntOrString::Int(MEMCACHED_PORT)),
                    end_port: None,
                }]),
            }]),
            egress: None,
        }),
    }
}

/// The pool's memcached children, or nothing with 0 replicas.
pub fn memcached(pool: &Pool<'_>, operator: &OperatorPods) -> Option<Memcached> {
    let spec = &pool.spec.memcached;
    let spec_pod = &pool.spec.pod;
    if spec.replicas <= 0 {
        return None;
    }
    let name = names::memcached(pool.name);
    let selector = labels::selector(pool.name, Component::Memcached);
    let service = Service {
        metadata: pool.child_meta(name.clone(), Component::Memcached),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Stable per-pod DNS names from the start, ready or not.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some("memcached".into()),
                port: MEMCACHED_PORT,
                target_port: Some(IntOrString::String("memcached".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let port_probe = Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("memcached".into()),
            host: None,
        }),
        ..Probe::default()
    };
    // Cache memory plus memcached's own overhead (connections, hash table).
    let memory = Quantity(format!("{}Mi", spec.memory_mib + 32));
    let container = Container {
        name: "memcached".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: pool.spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(vec![
            "-m".into(),
            spec.memory_mib.to_string(),
            "-p".into(),
            MEMCACHED_PORT.to_string(),
            "-U".into(),
            "0".into(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("memcached".into()),
            container_port: MEMCACHED_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            ..port_probe.clone()
        }),
        // A memcached that stops accepting is restarted: it costs the cached routes, which
        // the proxies look up again.
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..port_probe
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), memory.clone()),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), memory)])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(container_security_context(MEMCACHED_UID)),
        ..Container::default()
    };
    let stateful_set = StatefulSet {
        metadata: pool.child_meta(name.clone(), Component::Memcached),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(name),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // One node going away takes one replica's share of the routes, not all of
                    // them; preferred only, so that a small cluster still runs every replica.
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(PodAntiAffinity {
                            preferred_during_scheduling_ignored_during_execution: Some(vec![
                                WeightedPodAffinityTerm {
                                    weight: 100,
                                    pod_affinity_term: PodAffinityTerm {
                                        label_selector: Some(LabelSelector {
                                            match_labels: Some(selector),
                                            match_expressions: None,
                                        }),
                                        topology_key: "kubernetes.io/hostname".into(),
                                        ..PodAffinityTerm::default()
                                    },
                                },
                            ]),
                            ..PodAntiAffinity::default()
                        }),
                        ..Affinity::default()
                    }),
                    // The nodes the pool's pods may run on (dedicated, tainted mail nodes) hold
                    // its cache too; spec.pod's affinity and spread constraints select proxy
                    // pods, not these.
                    node_selector: Some(spec_pod.node_selector.clone()).filter(|m| !m.is_empty()),
                    tolerations: Some(spec_pod.tolerations.clone()).filter(|v| !v.is_empty()),
                    priority_class_name: spec_pod.priority_class_name.clone(),
                    image_pull_secrets: Some(spec_pod.image_pull_secrets.clone())
                        .filter(|v| !v.is_empty()),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(MEMCACHED_UID),
                        run_as_group: Some(MEMCACHED_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    };
    Some(Memcached {
        service,
        network_policy: network_policy(pool, operator),
        stateful_set,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{operator, pool, spec};
    use super::*;
    use serde_json::json;

    #[test]
    fn each_replica_is_listed_by_its_stable_name() {
        let spec = spec(json!({"memcached": {"replicas": 2}}));
        assert_eq!(
            memcached_servers(&pool(&spec)),
            [
                "main-memcached-0.main-memcached.mail.svc:11211",
                "main-memcached-1.main-memcached.mail.svc:11211"
            ]
        );
    }

    #[test]
    fn zero_replicas_means_no_statefulset_and_no_servers() {
        let spec = spec(json!({"memcached": {"replicas": 0}}));
        assert!(memcached(&pool(&spec), &operator()).is_none());
        assert!(memcached_servers(&pool(&spec)).is_empty());
    }

    #[test]
    fn statefulset_is_headless_sized_and_unprivileged() {
        let spec = spec(json!({"memcached": {"replicas": 3, "memoryMiB": 256, "image": "mc:1"}}));
        let Memcached {
            service: svc,
            stateful_set: sts,
            ..
        } = memcached(&pool(&spec), &operator()).unwrap();
        let svc_spec = svc.spec.unwrap();
        assert_eq!(svc_spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(svc.metadata.name.as_deref(), Some("main-memcached"));
        let sts_spec = sts.spec.unwrap();
        assert_eq!(sts_spec.replicas, Some(3));
        assert_eq!(sts_spec.service_name.as_deref(), Some("main-memcached"));
        let pod = sts_spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("mc:1"));
        assert_eq!(
            c.args.as_ref().unwrap()[..2],
            ["-m".to_string(), "256".to_string()]
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"],
            Quantity("288Mi".into())
        );
    }

    #[test]
    fn memcached_pods_go_where_the_pools_pods_may_go_with_their_pull_secrets() {
        let spec = spec(json!({"pod": {
            "nodeSelector": {"role": "mail"},
            "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "mail-critical",
            "imagePullSecrets": [{"name": "registry"}],
            "affinity": {"podAntiAffinity": {}}
        }}));
        let stateful_set = memcached(&pool(&spec), &operator()).unwrap().stateful_set;
        let pod = stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["role"], "mail");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("mail"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("mail-critical"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
        let anti_affinity = pod.affinity.unwrap().pod_anti_affinity.unwrap();
        assert!(
            anti_affinity
                .preferred_during_scheduling_ignored_during_execution
                .is_some(),
            "memcached's own spreading, not the proxies' affinity"
        );
    }

    #[test]
    fn memcached_pods_spread_over_nodes_and_are_restarted_when_they_stop_accepting() {
        let spec = spec(json!({}));
        let stateful_set = memcached(&pool(&spec), &operator()).unwrap().stateful_set;
        let pod = stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            serde_json::to_value(&pod.affinity).unwrap(),
            json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {
                        "app.kubernetes.io/component": "memcached",
                        "app.kubernetes.io/instance": "main",
                        "app.kubernetes.io/name": "mailproxy"}},
                    "topologyKey": "kubernetes.io/hostname"}}]}})
        );
        let container = &pod.containers[0];
        assert_eq!(
            serde_json::to_value(&container.liveness_probe).unwrap(),
            json!({"tcpSocket": {"port": "memcached"}, "periodSeconds": 10,
                   "failureThreshold": 3})
        );
        assert_eq!(
            serde_json::to_value(&container.readiness_probe).unwrap(),
            json!({"tcpSocket": {"port": "memcached"}, "periodSeconds": 5})
        );
    }

    #[test]
    fn only_the_pools_proxies_and_the_operator_reach_memcached() {
        let spec = spec(json!({}));
        let policy = memcached(&pool(&spec), &operator()).unwrap().network_policy;
        assert_eq!(policy.metadata.name.as_deref(), Some("main-memcached"));
        assert_eq!(policy.metadata.namespace.as_deref(), Some("mail"));
        assert_eq!(
            serde_json::to_value(&policy.spec).unwrap(),
            json!({
                "podSelector": {"matchLabels": {
                    "app.kubernetes.io/component": "memcached",
                    "app.kubernetes.io/instance": "main",
                    "app.kubernetes.io/name": "mailproxy"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchLabels": {
                            "app.kubernetes.io/component": "proxy",
                            "app.kubernetes.io/instance": "main",
                            "app.kubernetes.io/name": "mailproxy"}}},
                        {"namespaceSelector": {"matchLabels": {
                            "kubernetes.io/metadata.name": "mailproxy-system"}},
                         "podSelector": {"matchLabels": {
                            "app.kubernetes.io/instance": "mp",
                            "app.kubernetes.io/name": "mailproxy-operator"}}}],
                    "ports": [{"protocol": "TCP", "port": 11211}]}]
            })
        );
        // Without its pod labels, the operator's whole namespace.
        let anywhere = OperatorPods {
            labels: BTreeMap::new(),
            ..operator()
        };
        let policy = memcached(&pool(&spec), &anywhere).unwrap().network_policy;
        let from = &policy.spec.unwrap().ingress.unwrap()[0];
        assert_eq!(
            serde_json::to_value(&from.from.as_ref().unwrap()[1]).unwrap(),
            json!({"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "mailproxy-system"}}})
        );
    }
}
