//! The committed CRD manifests: in sync with the Rust types, valid apiextensions/v1 objects, and
//! their defaults and CEL rules behave as the API server will apply them.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{Validator, apply_defaults};
use mailproxy_crds::{MailboxServerSpec, ProxyPoolSpec, manifests};
use serde_json::{Value, json};

fn committed(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn committed_crd(plural: &str) -> CustomResourceDefinition {
    serde_norway::from_str(&committed(&format!("mailproxy.io_{plural}.yaml")))
        .expect("committed manifest is an apiextensions/v1 CustomResourceDefinition")
}

fn schema(plural: &str) -> Value {
    let crd = committed_crd(plural);
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn object(kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "mailproxy.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "mail"},
        "spec": spec,
    })
}

/// Validates like the API server: schema defaults first, then every CEL rule.
fn admit(plural: &str, kind: &str, spec: Value) -> Result<(), Vec<String>> {
    Validator::new()
        .validate(&schema(plural), &object(kind, spec), None)
        .map_err(|errors| errors.into_vec().into_iter().map(|e| e.message).collect())
}

fn admit_update(plural: &str, kind: &str, old: Value, new: Value) -> Result<(), Vec<String>> {
    Validator::new()
        .validate(
            &schema(plural),
            &object(kind, new),
            Some(&object(kind, old)),
        )
        .map_err(|errors| errors.into_vec().into_iter().map(|e| e.message).collect())
}

fn assert_rejected(result: Result<(), Vec<String>>, expected: &str) {
    let messages = result.expect_err("the API server must reject this object");
    assert!(
        messages.iter().any(|m| m.contains(expected)),
        "expected a rejection mentioning {expected:?}, got {messages:?}"
    );
}

#[test]
fn committed_manifests_match_the_generator() {
    for (name, yaml) in manifests::files() {
        assert_eq!(
            committed(&name),
            yaml,
            "crds/{name} is stale: run scripts/gen-crds.sh and commit the result"
        );
    }
}

#[test]
fn committed_manifests_are_namespaced_v1alpha1_with_status_and_printer_columns() {
    for (plural, kind) in [
        ("mailboxservers", "MailboxServer"),
        ("proxypools", "ProxyPool"),
    ] {
        let crd = committed_crd(plural);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(&*format!("{plural}.mailproxy.io"))
        );
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let subresources = version.subresources.as_ref().expect("subresources");
        assert!(
            subresources.status.is_some(),
            "{kind} has a status subresource"
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            columns.contains(&"Ready") && columns.contains(&"Age"),
            "{columns:?}"
        );
    }
    let pool = committed_crd("proxypools");
    let scale = pool.spec.versions[0]
        .subresources
        .as_ref()
        .unwrap()
        .scale
        .as_ref()
        .unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
}

#[test]
fn schema_defaults_fill_a_minimal_mailbox_server_with_zimbra_ports() {
    let defaulted = apply_defaults(
        &schema("mailboxservers"),
        &object("MailboxServer", json!({"host": "mbs1.example.com"})),
    );
    let spec = &defaulted["spec"];
    assert_eq!(
        spec["ports"],
        json!({"imap": 7143, "imaps": 7993, "pop3": 7110, "pop3s": 7995,
               "http": 8080, "https": 8443, "lookup": 7072, "mtaAuth": 7073})
    );
    assert_eq!(spec["lookupTarget"], json!(true));
    assert_eq!(spec["webBackend"], json!(true));
    assert_eq!(spec["drain"], json!(false));
    assert_eq!(spec["lookupScheme"], json!("http"));
    assert_eq!(spec["mailUpstream"]["origin"], json!("id"));

    let parsed: MailboxServerSpec = serde_json::from_value(json!({"host": "h"})).unwrap();
    assert_eq!(parsed.ports.imap, 7143);
    assert_eq!(parsed.ports.lookup, 7072);
    assert!(parsed.lookup_target && parsed.web_backend && !parsed.drain);
}

#[test]
fn schema_defaults_fill_a_minimal_proxy_pool_with_zimbra_proxy_defaults() {
    let minimal = json!({"mailboxSelector": {"matchLabels": {"pool": "a"}}});
    let defaulted = apply_defaults(&schema("proxypools"), &object("ProxyPool", minimal.clone()));
    let spec = &defaulted["spec"];
    let ports: Vec<i64> = ["imap", "imaps", "pop3", "pop3s", "http", "https"]
        .iter()
        .map(|l| spec["listeners"][l]["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, vec![143, 993, 110, 995, 80, 443]);
    assert_eq!(spec["replicas"], json!(2));
    assert_eq!(spec["routeCache"]["ttlSeconds"], json!(3600));
    assert_eq!(spec["lookup"]["timeoutSeconds"], json!(15));
    assert_eq!(spec["lookup"]["handlerDownSeconds"], json!(60));
    assert_eq!(spec["memcached"]["replicas"], json!(1));
    assert_eq!(spec["loginLimits"]["ipLimit"], json!(0));
    assert_eq!(spec["timeouts"]["preLoginSeconds"], json!(60));
    assert_eq!(spec["timeouts"]["idleSeconds"], json!(3600));
    assert_eq!(spec["disruptionBudget"]["enabled"], json!(true));
    assert_eq!(spec["service"]["type"], json!("ClusterIP"));

    let parsed: ProxyPoolSpec = serde_json::from_value(minimal).unwrap();
    assert_eq!(parsed.replicas, 2);
    assert_eq!(parsed.listeners.imaps.port, 993);
    assert_eq!(parsed.route_cache.ttl_seconds, 3600);
    assert_eq!(parsed.pod.termination_grace_period_seconds, 300);
    assert!(!parsed.login_limits.enabled());
}

#[test]
fn valid_resources_are_admitted() {
    for host in [
        "h",
        "mbs1.example.com",
        "mbs-1.mail.svc.cluster.local",
        "10.1.2.3",
        "2001:db8::1",
        "::1",
    ] {
        admit("mailboxservers", "MailboxServer", json!({ "host": host }))
            .unwrap_or_else(|errors| panic!("{host:?} must be admitted: {errors:?}"));
    }
    admit(
        "mailboxservers",
        "MailboxServer",
        json!({"service": "dovecot-1", "accounts": ["a@example.com"], "domains": ["example.com"]}),
    )
    .unwrap();
    admit(
        "proxypools",
        "ProxyPool",
        json!({"mailboxSelector": {"matchLabels": {"pool": "a"}}, "starttls": "only",
               "tls": {"secretName": "proxy-tls"}}),
    )
    .unwrap();
}

#[test]
fn mailbox_server_rejects_bad_ports_addresses_and_entries() {
    let reject =
        |spec, expected| assert_rejected(admit("mailboxservers", "MailboxServer", spec), expected);
    reject(
        json!({"host": "h", "ports": {"imap": 0}}),
        "between 1 and 65535",
    );
    reject(
        json!({"host": "h", "ports": {"lookup": 70000}}),
        "between 1 and 65535",
    );
    reject(json!({}), "exactly one of spec.host");
    reject(
        json!({"host": "h", "service": "s"}),
        "exactly one of spec.host",
    );
    reject(json!({"host": "bad host"}), "DNS name or IP");
    // Each of these once reached the route table and made every proxy of the pool drop its
    // whole lookup handler list, or gave upstreams such as `[mbs2.example.com:7072]:7143`.
    for host in [
        "",
        "mbs-\u{fc}.example.com",
        "admin@mbs2",
        "mbs2%",
        "mbs2|x",
        "mbs2/x",
        "mbs2.example.com:7072",
        "10.0.0.1:7143",
        "[2001:db8::1]",
        "fe80::1%eth0",
        "MBS2.example.com",
        "-mbs2.example.com",
        "mbs2..example.com",
        &"a".repeat(254),
    ] {
        reject(
            json!({ "host": host }),
            "spec.host must be a DNS name or IP address",
        );
    }
    reject(json!({"service": "Not_A_Label"}), "DNS-1035");
    reject(
        json!({"host": "h", "accounts": ["nodomain"]}),
        "qualified account names",
    );
    reject(
        json!({"host": "h", "domains": ["user@example.com"]}),
        "domain names",
    );
}

#[test]
fn mailbox_server_address_is_immutable() {
    let update = |old, new| admit_update("mailboxservers", "MailboxServer", old, new);
    assert_rejected(
        update(json!({"host": "a"}), json!({"host": "b"})),
        "immutable",
    );
    assert_rejected(
        update(json!({"host": "a"}), json!({"service": "svc"})),
        "immutable",
    );
    update(json!({"host": "a"}), json!({"host": "a", "drain": true})).unwrap();
}

#[test]
fn proxy_pool_rejects_empty_selectors_bad_ports_and_unsafe_settings() {
    let reject = |spec, expected| assert_rejected(admit("proxypools", "ProxyPool", spec), expected);
    let selector = json!({"matchLabels": {"pool": "a"}});
    reject(json!({"mailboxSelector": {}}), "must not be empty");
    reject(
        json!({"mailboxSelector": {"matchLabels": {}}}),
        "must not be empty",
    );
    reject(
        json!({"mailboxSelector": selector, "listeners": {"imap": {"port": 0}}}),
        "between 1 and 65535",
    );
    reject(
        json!({"mailboxSelector": selector, "listeners": {"pop3": {"port": 143}}}),
        "same port",
    );
    reject(
        json!({"mailboxSelector": selector, "starttls": "only"}),
        "needs spec.tls",
    );
    reject(
        json!({"mailboxSelector": selector, "replicas": -1}),
        "spec.replicas",
    );
    reject(
        json!({"mailboxSelector": selector, "routeCache": {"ttlSeconds": 0}}),
        "ttlSeconds",
    );
    reject(
        json!({"mailboxSelector": selector, "loginLimits": {"ipLimit": -5}}),
        "must not be negative",
    );
    reject(
        json!({"mailboxSelector": selector, "web": {"redirectToHttps": true}}),
        "spec.web.redirectToHttps needs spec.tls and the https listener",
    );
    reject(
        json!({"mailboxSelector": selector, "web": {"redirectToHttps": true},
               "tls": {"secretName": "proxy-tls"}, "listeners": {"https": {"enabled": false}}}),
        "spec.web.redirectToHttps needs spec.tls and the https listener",
    );
    reject(
        json!({"mailboxSelector": selector, "web": {"maxHeaderBytes": 100}}),
        "spec.web.maxHeaderBytes must be between 1024 and 1048576",
    );
    reject(
        json!({"mailboxSelector": selector, "web": {"tunnelIdleTimeoutSeconds": 0}}),
        "spec.web timeouts must be between 1 second and 30 days",
    );
    reject(
        json!({"mailboxSelector": selector, "timeouts": {"idleSeconds": 9_223_372_036_854_775_807_i64}}),
        "timeouts must be between 1 second and 30 days",
    );
    reject(
        json!({"mailboxSelector": selector, "loginLimits": {"userWindowSeconds": 2_592_001}}),
        "windowSeconds must be between 1 second and 30 days",
    );
    let whitelisted = "loginLimits.whitelist entries must be IP addresses or CIDR blocks: list \
                       addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 or 2001:db8::/32";
    for bad in ["10.0.0.0/33", "office-nat", "::/129", "10.0.0.0/"] {
        reject(
            json!({"mailboxSelector": selector,
                   "loginLimits": {"whitelist": ["10.0.0.0/8", bad]}}),
            whitelisted,
        );
    }
    admit(
        "proxypools",
        "ProxyPool",
        json!({"mailboxSelector": selector,
               "loginLimits": {"whitelist": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]}}),
    )
    .unwrap();
    // The validator here runs the CEL rules only; the API server enforces `required` itself.
    assert_eq!(
        schema("proxypools")["properties"]["spec"]["properties"]["service"]["properties"]["proxyProtocol"]
            ["required"],
        json!(["trustedNetworks"])
    );
    reject(
        json!({"mailboxSelector": selector,
               "service": {"proxyProtocol": {"trustedNetworks": []}}}),
        "spec.service.proxyProtocol.trustedNetworks must not be empty",
    );
    let trusted = "spec.service.proxyProtocol.trustedNetworks entries must be IP addresses or CIDR \
                   blocks: list addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 or \
                   2001:db8::/32";
    for bad in ["10.0.0.0/33", "lb.example.com", "::/129", "fe80::1%eth0"] {
        reject(
            json!({"mailboxSelector": selector,
                   "service": {"proxyProtocol": {"trustedNetworks": ["10.0.0.0/8", bad]}}}),
            trusted,
        );
    }
    admit(
        "proxypools",
        "ProxyPool",
        json!({"mailboxSelector": selector,
               "service": {"type": "LoadBalancer", "proxyProtocol":
                           {"trustedNetworks": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]}}}),
    )
    .unwrap();
    admit(
        "proxypools",
        "ProxyPool",
        json!({"mailboxSelector": selector, "web": {"redirectToHttps": true},
               "tls": {"secretName": "proxy-tls"}}),
    )
    .unwrap();
    // The same port is fine when one of the two listeners is disabled.
    admit(
        "proxypools",
        "ProxyPool",
        json!({"mailboxSelector": selector,
               "listeners": {"imap": {"enabled": false, "port": 110}}}),
    )
    .unwrap();
}
