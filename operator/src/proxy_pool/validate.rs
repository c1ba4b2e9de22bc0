//! Stage 2: decide whether a pool can be built. A spec the API server accepted can still be
//! unusable (a selector operator it does not check, a name too long for the derived names); a
//! missing dependency (the TLS Secret, the lookup secret) may appear later.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use mailproxy_crds::ProxyPool;
use mailproxy_crds::proxy_pool::ServiceType;
use mailproxy_crds::settings::{IpBlock, StartTlsMode};

use super::build::{Pool, config::listeners};
use super::dereference::{Dereferenced, SecretFound};
use crate::labels::{MAX_POOL_NAME, is_pool_name};

/// Why a pool is not built this time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The spec must change: wait for the user.
    Invalid(String),
    /// Something the pool refers to is missing: check again later.
    Missing {
        reason: &'static str,
        message: String,
    },
}

/// The pool if its spec is usable (else [`Problem::Invalid`]), whatever it refers to that is
/// missing ([`missing_dependency`]): the route table is built from it, and needs no Secret.
pub fn valid_spec<'a>(pool: &'a ProxyPool, deref: &Dereferenced) -> Result<Pool<'a>, Problem> {
    let spec = &pool.spec;
    let name = pool.metadata.name.as_deref().unwrap_or_default();
    let mut invalid = Vec::new();
    if !is_pool_name(name) {
        invalid.push(format!(
            "metadata.name {name:?} cannot name the pool's Services: ProxyPool names must be \
             lower-case letters, digits and '-', starting with a letter and not ending with '-' \
             (a DNS-1035 label): re-create the pool under such a name"
        ));
    }
    if name.len() > MAX_POOL_NAME {
        invalid.push(format!(
            "metadata.name {name:?} is {} characters; ProxyPool names may have at most \
             {MAX_POOL_NAME} so that the names derived from it (such as {name}-memcached) are \
             valid: re-create the pool with a shorter name",
            name.len()
        ));
    }
    if let Err(error) = &deref.selector {
        invalid.push(format!(
            "spec.mailboxSelector is not a valid label selector ({error}): use matchLabels, or \
             matchExpressions with the operators In, NotIn (with values), Exists or DoesNotExist"
        ));
    }
    if listeners(spec).is_empty() {
        invalid.push(
            "no listener is enabled (TLS listeners need spec.tls): enable at least one of \
             spec.listeners"
                .to_string(),
        );
    }
    if spec.service.preserve_client_ip && spec.service.type_ == ServiceType::ClusterIP {
        invalid.push(
            "spec.service.preserveClientIp needs spec.service.type NodePort or LoadBalancer \
             (a ClusterIP Service has no external traffic policy)"
                .to_string(),
        );
    }
    // The CRD has this rule too, but a pool stored before it would get proxies that refuse to
    // start.
    if spec.starttls == StartTlsMode::Only && spec.tls.is_none() {
        invalid.push(
            "spec.starttls: only needs spec.tls (a certificate to start TLS with): set \
             spec.tls.secretName, or spec.starttls to \"on\" or \"off\""
                .to_string(),
        );
    }
    // The CRD's rule is the API server's parsing; this is the proxies', which is the one that
    // counts: a whitelist they cannot parse would stop every new proxy at startup.
    if let Err(error) = spec.login_limits.whitelist_blocks() {
        invalid.push(format!("spec.{error}"));
    }
    // Likewise for the PROXY protocol's trusted networks, which the proxies check at startup.
    if let Some(proxy_protocol) = &spec.service.proxy_protocol {
        let networks = &proxy_protocol.trusted_networks;
        if networks.is_empty() {
            invalid.push(
                "spec.service.proxyProtocol.trustedNetworks must not be empty: list the load \
                 balancer's addresses or CIDR blocks, the only sources the proxies will serve"
                    .to_string(),
            );
        }
        if let Some(entry) = networks.iter().find(|e| IpBlock::parse(e).is_err()) {
            invalid.push(format!(
                "spec.service.proxyProtocol.trustedNetworks entry {entry:?} is not an IP address \
                 or CIDR block: list addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 \
                 or 2001:db8::/32"
            ));
        }
    }
    // As the built-in controllers' children do, they hold up a foreground deletion of the pool
    // (`kubectl delete --cascade=foreground`) until they are gone.
    let owner = pool.controller_owner_ref(&()).map(|owner| OwnerReference {
        block_owner_deletion: Some(true),
        ..owner
    });
    let namespace = pool.metadata.namespace.as_deref();
    let (Some(owner), Some(namespace)) = (owner, namespace) else {
        invalid.push("the ProxyPool has no uid or namespace: it was not read from the API".into());
        return Err(Problem::Invalid(invalid.join("; ")));
    };
    if !invalid.is_empty() {
        return Err(Problem::Invalid(invalid.join("; ")));
    }
    Ok(Pool {
        name,
        namespace,
        spec,
        owner,
    })
}

/// What the valid `pool` refers to that does not exist (yet): [`Problem::Missing`].
pub fn missing_dependency(pool: &Pool<'_>, deref: &Dereferenced) -> Option<Problem> {
    let (spec, namespace) = (pool.spec, pool.namespace);
    if let Some(tls) = &spec.tls {
        let secret = &tls.secret_name;
        let missing = match &deref.tls_secret {
            Some(SecretFound::NoSecret) => Some(format!(
                "Secret {secret:?} (spec.tls.secretName) does not exist in namespace {namespace}: \
                 create a kubernetes.io/tls Secret with tls.crt and tls.key, or fix \
                 spec.tls.secretName"
            )),
            Some(SecretFound::NoKeys(keys)) => {
                let keys: Vec<String> = keys.iter().map(|key| format!("{key:?}")).collect();
                let keys = match keys.as_slice() {
                    [key] => format!("key {key}"),
                    keys => format!("keys {}", keys.join(" and ")),
                };
                Some(format!(
                    "Secret {secret:?} (spec.tls.secretName) in namespace {namespace} has no \
                     {keys}: the proxies read the certificate chain from tls.crt and its private \
                     key from tls.key; add them (a kubernetes.io/tls Secret), or fix \
                     spec.tls.secretName"
                ))
            }
            Some(SecretFound::Yes) | None => None,
        };
        if let Some(message) = missing {
            return Some(Problem::Missing {
                reason: "TlsSecretNotFound",
                message,
            });
        }
    }
    if let Some(reference) = &spec.lookup.secret_ref {
        let (secret, key) = (&reference.name, &reference.key);
        let missing = match &deref.lookup_secret {
            Some(SecretFound::NoSecret) => Some(format!(
                "Secret {secret:?} (spec.lookup.secretRef.name) does not exist in namespace \
                 {namespace}: create it with the lookup shared secret under key {key:?}, or fix \
                 spec.lookup.secretRef"
            )),
            Some(SecretFound::NoKeys(_)) => Some(format!(
                "Secret {secret:?} in namespace {namespace} has no key {key:?} \
                 (spec.lookup.secretRef.key): add the lookup shared secret under that key, or fix \
                 spec.lookup.secretRef.key"
            )),
            Some(SecretFound::Yes) | None => None,
        };
        if let Some(message) = missing {
            return Some(Problem::Missing {
                reason: "LookupSecretNotFound",
                message,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_pool::build::fixtures::spec;
    use crate::proxy_pool::dereference::mailbox_selector;
    use serde_json::json;

    /// The pool to build, or why not, as the reconcile decides it.
    fn validate<'a>(pool: &'a ProxyPool, deref: &Dereferenced) -> Result<Pool<'a>, Problem> {
        let valid = valid_spec(pool, deref)?;
        match missing_dependency(&valid, deref) {
            Some(problem) => Err(problem),
            None => Ok(valid),
        }
    }

    fn pool(name: &str, spec_json: serde_json::Value) -> ProxyPool {
        let mut pool = ProxyPool::new(name, spec(spec_json));
        pool.metadata.namespace = Some("mail".into());
        pool.metadata.uid = Some("uid-1".into());
        pool
    }

    fn deref(pool: &ProxyPool, tls_secret: Option<SecretFound>) -> Dereferenced {
        Dereferenced {
            selector: mailbox_selector(pool),
            servers: Vec::new(),
            tls_secret,
            lookup_secret: None,
            routes: None,
            deployment: None,
            children: Default::default(),
        }
    }

    #[test]
    fn a_plain_pool_is_valid() {
        let pool = pool("main", json!({}));
        let valid = validate(&pool, &deref(&pool, None)).unwrap();
        assert_eq!(valid.name, "main");
        assert_eq!(valid.namespace, "mail");
        assert_eq!(valid.owner.uid, "uid-1");
        assert_eq!(valid.owner.controller, Some(true));
        assert_eq!(valid.owner.block_owner_deletion, Some(true));
    }

    #[test]
    fn unusable_specs_are_invalid_with_instructions() {
        let bad_operator = pool(
            "main",
            json!({"mailboxSelector": {"matchExpressions": [
            {"key": "pool", "operator": "Near", "values": ["a"]}]}}),
        );
        let Err(Problem::Invalid(message)) = validate(&bad_operator, &deref(&bad_operator, None))
        else {
            panic!("expected invalid");
        };
        assert!(message.contains("spec.mailboxSelector"), "{message}");

        let bad_value = pool(
            "main",
            json!({"mailboxSelector": {"matchLabels": {"pool": "main pool"}}}),
        );
        let Err(Problem::Invalid(message)) = validate(&bad_value, &deref(&bad_value, None)) else {
            panic!("expected invalid");
        };
        assert!(
            message.contains("spec.mailboxSelector") && message.contains("\"main pool\""),
            "{message}"
        );

        let long = pool(&"p".repeat(43), json!({}));
        let Err(Problem::Invalid(message)) = validate(&long, &deref(&long, None)) else {
            panic!("expected invalid");
        };
        assert!(message.contains("at most 42"), "{message}");

        let dotted = pool("mail.v1", json!({}));
        let Err(Problem::Invalid(message)) = validate(&dotted, &deref(&dotted, None)) else {
            panic!("expected invalid");
        };
        assert!(message.contains("DNS-1035"), "{message}");

        let silent = pool(
            "main",
            json!({"listeners": {
            "imap": {"enabled": false, "port": 143}, "pop3": {"enabled": false, "port": 110},
            "http": {"enabled": false, "port": 80}}}),
        );
        let Err(Problem::Invalid(message)) = validate(&silent, &deref(&silent, None)) else {
            panic!("expected invalid");
        };
        assert!(message.contains("no listener"), "{message}");

        let cluster_ip = pool("main", json!({"service": {"preserveClientIp": true}}));
        let Err(Problem::Invalid(message)) = validate(&cluster_ip, &deref(&cluster_ip, None))
        else {
            panic!("expected invalid");
        };
        assert!(message.contains("NodePort or LoadBalancer"), "{message}");

        let whitelist = pool(
            "main",
            json!({"loginLimits": {"ipLimit": 10, "whitelist": ["10.0.0.0/8", "10.0.0.0/33"]}}),
        );
        assert_eq!(
            validate(&whitelist, &deref(&whitelist, None)).unwrap_err(),
            Problem::Invalid(
                "spec.loginLimits.whitelist entry \"10.0.0.0/33\" is not an IP address or CIDR \
                 block: list addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 or \
                 2001:db8::/32"
                    .into()
            )
        );

        let untrusting = pool(
            "main",
            json!({"service": {"proxyProtocol": {"trustedNetworks": []}}}),
        );
        let Err(Problem::Invalid(message)) = validate(&untrusting, &deref(&untrusting, None))
        else {
            panic!("expected invalid");
        };
        assert!(
            message.contains("spec.service.proxyProtocol.trustedNetworks must not be empty"),
            "{message}"
        );
        let zoned = pool(
            "main",
            json!({"service": {"proxyProtocol": {"trustedNetworks": ["10.0.0.0/8", "fe80::1%eth0"]}}}),
        );
        assert_eq!(
            validate(&zoned, &deref(&zoned, None)).unwrap_err(),
            Problem::Invalid(
                "spec.service.proxyProtocol.trustedNetworks entry \"fe80::1%eth0\" is not an IP \
                 address or CIDR block: list addresses such as 192.0.2.7 and blocks such as \
                 10.0.0.0/8 or 2001:db8::/32"
                    .into()
            )
        );
        let trusting = pool(
            "main",
            json!({"service": {"proxyProtocol": {"trustedNetworks": ["10.0.0.0/8", "192.0.2.7"]}}}),
        );
        assert!(validate(&trusting, &deref(&trusting, None)).is_ok());
    }

    #[test]
    fn a_missing_tls_secret_is_a_missing_dependency() {
        let pool = pool("main", json!({"tls": {"secretName": "cert"}}));
        let missing = deref(&pool, Some(SecretFound::NoSecret));
        assert!(
            valid_spec(&pool, &missing).is_ok(),
            "the route table does not need the Secret"
        );
        assert_eq!(
            validate(&pool, &missing).unwrap_err(),
            Problem::Missing {
                reason: "TlsSecretNotFound",
                message: "Secret \"cert\" (spec.tls.secretName) does not exist in namespace mail: \
                          create a kubernetes.io/tls Secret with tls.crt and tls.key, or fix \
                          spec.tls.secretName"
                    .into()
            }
        );
        assert!(validate(&pool, &deref(&pool, Some(SecretFound::Yes))).is_ok());
    }

    #[test]
    fn a_tls_secret_without_its_certificate_or_key_is_a_missing_dependency() {
        let pool = pool("main", json!({"tls": {"secretName": "cert"}}));
        let without = |keys: &[&str]| {
            let keys = keys.iter().map(|key| key.to_string()).collect();
            validate(&pool, &deref(&pool, Some(SecretFound::NoKeys(keys)))).unwrap_err()
        };
        assert_eq!(
            without(&["tls.key"]),
            Problem::Missing {
                reason: "TlsSecretNotFound",
                message: "Secret \"cert\" (spec.tls.secretName) in namespace mail has no key \
                          \"tls.key\": the proxies read the certificate chain from tls.crt and \
                          its private key from tls.key; add them (a kubernetes.io/tls Secret), \
                          or fix spec.tls.secretName"
                    .into()
            }
        );
        let Problem::Missing { message, .. } = without(&["tls.crt", "tls.key"]) else {
            panic!("expected missing");
        };
        assert!(
            message.contains("has no keys \"tls.crt\" and \"tls.key\""),
            "{message}"
        );
    }

    #[test]
    fn starttls_only_without_a_certificate_is_invalid() {
        // Stored before the CRD had its rule: the proxies would refuse to start.
        let pool = pool("main", json!({"starttls": "only"}));
        assert_eq!(
            validate(&pool, &deref(&pool, None)).unwrap_err(),
            Problem::Invalid(
                "spec.starttls: only needs spec.tls (a certificate to start TLS with): set \
                 spec.tls.secretName, or spec.starttls to \"on\" or \"off\""
                    .into()
            )
        );
        let with_tls = self::pool(
            "main",
            json!({"starttls": "only", "tls": {"secretName": "cert"}}),
        );
        assert!(valid_spec(&with_tls, &deref(&with_tls, None)).is_ok());
    }

    #[test]
    fn a_missing_lookup_secret_or_key_is_a_missing_dependency() {
        let pool = pool(
            "main",
            json!({"lookup": {"secretRef": {"name": "lookup", "key": "secret"}}}),
        );
        let with = |found| Dereferenced {
            lookup_secret: Some(found),
            ..deref(&pool, None)
        };
        assert_eq!(
            validate(&pool, &with(SecretFound::NoSecret)).unwrap_err(),
            Problem::Missing {
                reason: "LookupSecretNotFound",
                message: "Secret \"lookup\" (spec.lookup.secretRef.name) does not exist in \
                          namespace mail: create it with the lookup shared secret under key \
                          \"secret\", or fix spec.lookup.secretRef"
                    .into()
            }
        );
        assert_eq!(
            validate(&pool, &with(SecretFound::NoKeys(vec!["secret".into()]))).unwrap_err(),
            Problem::Missing {
                reason: "LookupSecretNotFound",
                message: "Secret \"lookup\" in namespace mail has no key \"secret\" \
                          (spec.lookup.secretRef.key): add the lookup shared secret under that \
                          key, or fix spec.lookup.secretRef.key"
                    .into()
            }
        );
        assert!(validate(&pool, &with(SecretFound::Yes)).is_ok());
    }
}
