//! Labels and names of the objects the operator creates for a ProxyPool.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

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

/// Whether `name` can name a pool: its derived names are Services, whose names are DNS-1035
/// labels (lower-case letters, digits and `-`, starting with a letter), which a custom
/// resource's name need not be.
pub fn is_pool_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// What is wrong with the label keys and values of `selector`, which the API server would
/// refuse in a list request (kube's `Selector` checks only the operators): a name of at most
/// 63 characters, alphanumeric at both ends with `-`, `_` and `.` between, a key optionally
/// prefixed by a DNS subdomain and `/`, a value possibly empty.
pub fn selector_syntax_problem(selector: &LabelSelector) -> Option<String> {
    let expressions = selector.match_expressions.iter().flatten();
    let keys = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, _)| key)
        .chain(expressions.clone().map(|expression| &expression.key));
    let values = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(_, value)| value)
        .chain(expressions.flat_map(|expression| expression.values.iter().flatten()));
    if let Some(key) = keys.into_iter().find(|key| !is_label_key(key)) {
        return Some(format!(
            "label key {key:?} is not valid: a name of at most 63 letters, digits, '-', '_' or \
             '.' (a letter or digit at both ends), optionally after a DNS subdomain and '/'"
        ));
    }
    values
        .into_iter()
        .find(|value| !value.is_empty() && !is_label_name(value))
        .map(|value| {
            format!(
                "label value {value:?} is not valid: at most 63 letters, digits, '-', '_' or \
                 '.' (a letter or digit at both ends), or empty"
            )
        })
}

/// Labels written `key=value,key=value` (the operator's own pod labels, as the chart passes
/// them), checked as the API server would check them.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let labels = text
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
                .ok_or_else(|| format!("{pair:?} is not key=value"))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let selector = LabelSelector {
        match_labels: Some(labels),
        match_expressions: None,
    };
    match selector_syntax_problem(&selector) {
        Some(problem) => Err(problem),
        None => Ok(selector.match_labels.unwrap_or_default()),
    }
}

fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

fn is_label_name(name: &str) -> bool {
    is_segment(name, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
    })
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            is_segment(label, |b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'
            })
        })
}

/// 1 to 63 bytes, each `allowed`, alphanumeric at both ends.
fn is_segment(segment: &str, allowed: impl Fn(&u8) -> bool) -> bool {
    let bytes = segment.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(allowed)
}

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

    #[test]
    fn pool_names_must_make_service_names() {
        for good in ["main", "mail-eu-1", "p"] {
            assert!(is_pool_name(good), "{good}");
        }
        for bad in ["", "1pool", "mail.v1", "Main", "main-", "-main", "ma_in"] {
            assert!(!is_pool_name(bad), "{bad}");
        }
    }

    #[test]
    fn pod_labels_are_parsed_and_checked() {
        assert_eq!(
            parse_labels(
                "app.kubernetes.io/name=mailproxy-operator, app.kubernetes.io/instance=mp"
            ),
            Ok(BTreeMap::from([
                ("app.kubernetes.io/instance".into(), "mp".into()),
                ("app.kubernetes.io/name".into(), "mailproxy-operator".into()),
            ]))
        );
        assert_eq!(parse_labels(""), Ok(BTreeMap::new()));
        assert_eq!(
            parse_labels("app"),
            Err("\"app\" is not key=value".to_string())
        );
        let problem = parse_labels("app=mail proxy").unwrap_err();
        assert!(problem.contains("value \"mail proxy\""), "{problem}");
    }

    #[test]
    fn selectors_with_keys_or_values_the_api_server_refuses_are_found() {
        let selector =
            |value: serde_json::Value| -> LabelSelector { serde_json::from_value(value).unwrap() };
        for good in [
            serde_json::json!({"matchLabels": {"pool": "main", "example.com/tier": "gold_1.a"}}),
            serde_json::json!({"matchLabels": {"pool": ""}}),
            serde_json::json!({"matchExpressions": [
                {"key": "pool", "operator": "In", "values": ["a", "b-2"]}]}),
            serde_json::json!({}),
        ] {
            assert_eq!(
                selector_syntax_problem(&selector(good.clone())),
                None,
                "{good}"
            );
        }
        for (bad, says) in [
            (
                serde_json::json!({"matchLabels": {"pool": "main pool"}}),
                "value \"main pool\"",
            ),
            (
                serde_json::json!({"matchLabels": {"-pool": "a"}}),
                "key \"-pool\"",
            ),
            (
                serde_json::json!({"matchLabels": {"Example.com/pool": "a"}}),
                "key \"Example.com/pool\"",
            ),
            (
                serde_json::json!({"matchLabels": {"pool": "a".repeat(64)}}),
                "value",
            ),
            (
                serde_json::json!({"matchExpressions": [
                    {"key": "pool", "operator": "In", "values": ["ok", "not ok"]}]}),
                "value \"not ok\"",
            ),
        ] {
            let problem = selector_syntax_problem(&selector(bad.clone())).expect("a problem");
            assert!(problem.contains(says), "{bad}: {problem}");
        }
    }
}
