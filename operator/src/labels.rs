//! Labels and names of the objects the operator creates for a ProxyPool.

use std::collections::BTreeMap;

/// Marks every object the operator manages.
pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = crate::FIELD_MANAGER;
/// Names the ProxyPool an object belongs to.
pub const POOL_KEY: &str = "mailproxy.io/pool";
pub const NAME_KEY: &str = "app.kubernetes.io/name";
pub const NAME_VALUE: &str = "mailproxy";
pub const INSTANCE_KEY: &str = "app.kubernetes.io/instance";
pub const COMPONENT_KEY: &str = "app.kubernetes.io/component";

/// The part of a pool an object belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Proxy,
    Memcached,
    Routes,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Proxy => "proxy",
            Component::Memcached => "memcached",
            Component::Routes => "routes",
        }
    }
}

/// Labels that select a component's pods (immutable once a Deployment or StatefulSet exists).
pub fn selector(pool: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_KEY.to_string(), NAME_VALUE.to_string()),
        (INSTANCE_KEY.to_string(), pool.to_string()),
        (COMPONENT_KEY.to_string(), component.as_str().to_string()),
    ])
}

/// Labels of every object made for `pool`: the selector labels plus the managed-by and pool
/// labels that drift correction lists children by.
pub fn labels(pool: &str, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector(pool, component);
    labels.insert(MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string());
    labels.insert(POOL_KEY.to_string(), pool.to_string());
    labels
}

/// The label selector (as a string) that finds every child of `pool`.
pub fn children_selector(pool: &str) -> String {
    format!("{MANAGED_BY_KEY}={MANAGED_BY_VALUE},{POOL_KEY}={pool}")
}

/// `a=b,c=d` from a label map, for a scale subresource's `status.selector`.
pub fn to_selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Object names derived from a pool's name.
pub mod names {
    /// The proxies' Deployment, client Service and PodDisruptionBudget.
    pub fn proxy(pool: &str) -> String {
        pool.to_string()
    }
    /// ServiceAccount, Role and RoleBinding of the proxy pods.
    pub fn proxy_rbac(pool: &str) -> String {
        format!("{pool}-proxy")
    }
    /// The proxies' configuration ConfigMap.
    pub fn config(pool: &str) -> String {
        format!("{pool}-config")
    }
    /// The route-table ConfigMap.
    pub fn routes(pool: &str) -> String {
        mailproxy_crds::route_table::configmap_name(pool)
    }
    /// memcached StatefulSet and its headless Service.
    pub fn memcached(pool: &str) -> String {
        format!("{pool}-memcached")
    }
}

/// Longest pool name whose derived names fit: `<pool>-memcached` is a Service name (a DNS-1035
/// label, 63 characters) and its StatefulSet pods carry a `controller-revision-hash` label of the
/// StatefulSet name plus 11 characters (63 at most).
pub const MAX_POOL_NAME: usize = 42;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_carry_the_selector_and_management_labels() {
        let labels = labels("main", Component::Proxy);
        assert_eq!(labels[MANAGED_BY_KEY], "mailproxy-operator");
        assert_eq!(labels[POOL_KEY], "main");
        assert_eq!(labels[COMPONENT_KEY], "proxy");
        assert_eq!(
            children_selector("main"),
            "app.kubernetes.io/managed-by=mailproxy-operator,mailproxy.io/pool=main"
        );
        assert_eq!(
            to_selector_string(&selector("main", Component::Proxy)),
            "app.kubernetes.io/component=proxy,app.kubernetes.io/instance=main,app.kubernetes.io/name=mailproxy"
        );
        let longest = "p".repeat(MAX_POOL_NAME);
        assert!(names::memcached(&longest).len() + 11 <= 63);
    }
}
