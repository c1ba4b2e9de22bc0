//! The proxies' identity: a ServiceAccount whose Role lets it get, list and watch its own
//! route-table ConfigMap and nothing else. `list` and `watch` limited by resourceNames work only
//! with a `metadata.name` field selector, which is how the proxy watches.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::Pool;
use crate::labels::{Component, names};

pub fn service_account(pool: &Pool<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: pool.child_meta(names::proxy_rbac(pool.name), Component::Proxy),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

pub fn role(pool: &Pool<'_>) -> Role {
    Role {
        metadata: pool.child_meta(names::proxy_rbac(pool.name), Component::Proxy),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![names::routes(pool.name)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            non_resource_urls: None,
        }]),
    }
}

pub fn role_binding(pool: &Pool<'_>) -> RoleBinding {
    let name = names::proxy_rbac(pool.name);
    RoleBinding {
        metadata: pool.child_meta(name.clone(), Component::Proxy),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(pool.namespace.to_string()),
            api_group: None,
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pool, spec};
    use super::*;
    use serde_json::json;

    #[test]
    fn role_grants_reading_the_route_table_configmap_only() {
        let spec = spec(json!({}));
        let pool = pool(&spec);
        let rules = role(&pool).rules.unwrap();
        assert_eq!(
            rules,
            vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                resource_names: Some(vec!["main-routes".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                non_resource_urls: None,
            }]
        );
        let binding = role_binding(&pool);
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(binding.role_ref.name, "main-proxy");
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, "main-proxy");
        assert_eq!(subjects[0].namespace.as_deref(), Some("mail"));
        assert_eq!(
            service_account(&pool).metadata.name.as_deref(),
            Some("main-proxy")
        );
    }
}
