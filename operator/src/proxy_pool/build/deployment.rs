//! The proxies' Deployment.
//!
//! Pods restart only for settings that need it: the pod template carries a hash of the image,
//! the TLS Secret name and `config.yaml` (listeners, ports, TLS, web settings, lookup secret,
//! shutdown timing, PROXY protocol). Route-table changes never touch the template; the proxies
//! reload the table from its ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Sysctl, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mailproxy_crds::ProxyPoolSpec;
use sha2::{Digest, Sha256};

use super::Pool;
use mailproxy_crds::proxy_config::ProxyConfig;

use super::config::{
    CONFIG_FILE, CONFIG_KEY, HEALTH_PORT, LOOKUP_SECRET_DIR, LOOKUP_SECRET_FILE, TLS_DIR, listeners,
};
use crate::labels::{self, Component, names};

/// Pod-template annotation holding the hash of the restart-worthy settings.
pub const RESTART_HASH_ANNOTATION: &str = "mailproxy.io/restart-hash";
/// The unprivileged user the proxies run as.
pub const PROXY_UID: i64 = 65532;

/// Hash of the settings whose change must restart the proxies.
pub fn restart_hash(spec: &ProxyPoolSpec, config: &ProxyConfig) -> String {
    let mut hasher = Sha256::new();
    hasher.update(spec.image.as_bytes());
    hasher.update([0]);
    if let Some(tls) = &spec.tls {
        hasher.update(tls.secret_name.as_bytes());
    }
    hasher.update([0]);
    hasher.update(config.to_yaml().as_bytes());
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Non-root, read-only root filesystem, no privilege escalation, every capability dropped.
pub fn container_security_context(uid: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(PROXY_UID),
        run_as_group: Some(PROXY_UID),
        fs_group: Some(PROXY_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        // The mail ports (110, 143, 993, ...) are below 1024: let the unprivileged user bind
        // them instead of granting NET_BIND_SERVICE (a namespaced, safe sysctl).
        sysctls: Some(vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: "0".into(),
        }]),
        ..PodSecurityContext::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("health".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("128Mi".into())),
        ])),
        ..ResourceRequirements::default()
    }
}

fn env() -> Vec<EnvVar> {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            api_version: None,
        }),
        ..EnvVarSource::default()
    };
    vec![
        EnvVar {
            name: "POD_NAMESPACE".into(),
            value_from: Some(field("metadata.namespace")),
            value: None,
        },
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(field("metadata.name")),
            value: None,
        },
    ]
}

fn volumes(pool: &Pool<'_>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config(pool.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_FILE.into(),
            sub_path: Some(CONFIG_KEY.into()),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    if let Some(tls) = &pool.spec.tls {
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if let Some(secret) = &pool.spec.lookup.secret_ref {
        let file = std::path::Path::new(LOOKUP_SECRET_FILE);
        volumes.push(Volume {
            name: "lookup-secret".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: secret.key.clone(),
                    path: file
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    mode: None,
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "lookup-secret".into(),
            mount_path: LOOKUP_SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

pub fn deployment(pool: &Pool<'_>, config: &ProxyConfig) -> Deployment {
    let spec = pool.spec;
    let selector = labels::selector(pool.name, Component::Proxy);
    let mut pod_labels = spec.pod.labels.clone();
    pod_labels.extend(selector.clone());
    let mut pod_annotations = spec.pod.annotations.clone();
    pod_annotations.insert(
        RESTART_HASH_ANNOTATION.to_string(),
        restart_hash(spec, config),
    );
    let mut ports: Vec<ContainerPort> = listeners(spec)
        .iter()
        .map(|listener| ContainerPort {
            name: Some(listener.name.into()),
            container_port: listener.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("health".into()),
        container_port: HEALTH_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });
    let (volumes, volume_mounts) = volumes(pool);
    let container = Container {
        name: "mailproxy".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["mailproxy".into()]),
        args: Some(vec!["serve".into(), "--config".into(), CONFIG_FILE.into()]),
        env: Some(env()),
        ports: Some(ports),
        // The health port opens only once the TLS certificates and the first route table are
        // loaded, which a slow API server can delay well past the liveness probe's patience:
        // liveness starts counting only after this probe has passed (up to 2 minutes).
        startup_probe: Some(probe("/healthz", 2, 60)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: Some(spec.pod.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(container_security_context(PROXY_UID)),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };
    Deployment {
        metadata: pool.child_meta(names::proxy(pool.name), Component::Proxy),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                // Bring a new proxy up before an old one drains its sessions.
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::proxy_rbac(pool.name)),
                    automount_service_account_token: Some(true),
                    containers: vec![container],
                    security_context: Some(pod_security_context()),
                    termination_grace_period_seconds: Some(
                        spec.pod.termination_grace_period_seconds,
                    ),
                    volumes: Some(volumes),
                    node_selector: Some(spec.pod.node_selector.clone()).filter(|m| !m.is_empty()),
                    tolerations: Some(spec.pod.tolerations.clone()).filter(|v| !v.is_empty()),
                    affinity: spec.pod.affinity.clone(),
                    topology_spread_constraints: Some(spec.pod.topology_spread_constraints.clone())
                        .filter(|v| !v.is_empty()),
                    priority_class_name: spec.pod.priority_class_name.clone(),
                    image_pull_secrets: Some(spec.pod.image_pull_secrets.clone())
                        .filter(|v| !v.is_empty()),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::proxy_config;
    use super::super::fixtures::{pool, spec};
    use super::*;
    use serde_json::json;

    fn build(spec: &ProxyPoolSpec) -> Deployment {
        let pool = pool(spec);
        deployment(&pool, &proxy_config(&pool))
    }

    fn hash(d: &Deployment) -> String {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[RESTART_HASH_ANNOTATION]
            .clone()
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn runs_mailproxy_serve_with_its_config_probes_and_downward_namespace() {
        let spec = spec(json!({"replicas": 3, "tls": {"secretName": "cert"},
                               "pod": {"terminationGracePeriodSeconds": 42}}));
        let d = build(&spec);
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
        let pod = pod(&d);
        assert_eq!(pod.termination_grace_period_seconds, Some(42));
        assert_eq!(pod.service_account_name.as_deref(), Some("main-proxy"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("mailproxy/mailproxy:0.1.0"));
        assert_eq!(c.command.as_ref().unwrap(), &["mailproxy"]);
        assert_eq!(
            c.args.as_ref().unwrap(),
            &["serve", "--config", "/etc/mailproxy/config.yaml"]
        );
        let liveness = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(liveness.path.as_deref(), Some("/healthz"));
        let readiness = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        // A proxy still loading its certificates and route table is not killed for it.
        assert_eq!(
            serde_json::to_value(&c.startup_probe).unwrap(),
            json!({"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 2,
                   "failureThreshold": 60, "timeoutSeconds": 2})
        );
        let health = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some("health"));
        assert_eq!(health.unwrap().container_port, 8081);
        let ports: Vec<i32> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [143, 993, 110, 995, 80, 443, 8081]);
        let namespace = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "POD_NAMESPACE")
            .unwrap();
        assert_eq!(
            namespace
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.namespace"
        );
        let tls_mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "tls")
            .unwrap();
        assert_eq!(tls_mount.mount_path, "/etc/mailproxy/tls");
        let tls_volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls_volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("cert")
        );
    }

    #[test]
    fn pods_run_unprivileged_with_a_read_only_root() {
        let spec = spec(json!({}));
        let d = build(&spec);
        let pod = pod(&d);
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &["ALL"]
        );
        assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    }

    #[test]
    fn restart_hash_changes_only_for_restart_worthy_settings() {
        let base = hash(&build(&spec(json!({}))));
        // Route-table settings are hot-reloaded: same hash, no restart.
        for hot in [
            json!({"routeCache": {"ttlSeconds": 60}}),
            json!({"loginLimits": {"ipLimit": 10}}),
            json!({"timeouts": {"idleSeconds": 10}}),
            json!({"lookup": {"timeoutSeconds": 3}}),
            json!({"starttls": "off"}),
            json!({"replicas": 7}),
            json!({"mailboxSelector": {"matchLabels": {"pool": "other"}}}),
        ] {
            assert_eq!(hash(&build(&spec(hot.clone()))), base, "{hot}");
        }
        for cold in [
            json!({"image": "mailproxy/mailproxy:0.2.0"}),
            json!({"listeners": {"imap": {"port": 1143}}}),
            json!({"tls": {"secretName": "cert"}}),
        ] {
            assert_ne!(hash(&build(&spec(cold.clone()))), base, "{cold}");
        }
        assert_ne!(
            hash(&build(&spec(json!({"tls": {"secretName": "a"}})))),
            hash(&build(&spec(json!({"tls": {"secretName": "b"}})))),
        );
    }

    #[test]
    fn pod_overrides_are_passed_through_and_cannot_replace_the_selector() {
        let spec = spec(json!({"pod": {
            "labels": {"team": "mail", "app.kubernetes.io/instance": "evil"},
            "annotations": {"a": "b"},
            "nodeSelector": {"disk": "ssd"},
            "priorityClassName": "high",
            "imagePullSecrets": [{"name": "registry"}],
            "resources": {"limits": {"memory": "1Gi"}}
        }, "imagePullPolicy": "Always"}));
        let d = build(&spec);
        let template = &d.spec.as_ref().unwrap().template;
        let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(labels["team"], "mail");
        assert_eq!(labels["app.kubernetes.io/instance"], "main");
        let pod = pod(&d);
        assert_eq!(pod.node_selector.as_ref().unwrap()["disk"], "ssd");
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "registry");
        assert_eq!(
            pod.containers[0].image_pull_policy.as_deref(),
            Some("Always")
        );
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["memory"], Quantity("1Gi".into()));
    }
}
