//! `ProxyPool`: a fleet of mailproxy pods with their shared memcached, fronting a set of
//! MailboxServers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::settings::{LoginLimits, StartTlsMode, Timeouts};

/// A pool of identical proxies with one route table and one memcached route cache.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailproxy.io",
    version = "v1alpha1",
    kind = "ProxyPool",
    namespaced,
    shortname = "pp",
    category = "mailproxy",
    status = "ProxyPoolStatus",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Servers","type":"integer","jsonPath":".status.mailboxServers"}"#,
    printcolumn = r#"{"name":"Routes","type":"string","jsonPath":".status.routeTableVersion"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.starttls != 'only' || has(self.tls)").message("spec.starttls: only needs spec.tls.secretName (a TLS Secret for STARTTLS)"),
    validation = Rule::new("!has(self.web) || !self.web.redirectToHttps || (has(self.tls) && self.listeners.https.enabled)").message("spec.web.redirectToHttps needs spec.tls and the https listener (spec.listeners.https.enabled): the redirects would lead nowhere"),
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPoolSpec {
    /// Number of proxy pods.
    #[serde(default = "defaults::replicas")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("spec.replicas must be between 0 and 1000"))]
    pub replicas: i32,

    /// Container image of the mailproxy data plane.
    #[serde(default = "defaults::image")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.image must not be empty"))]
    #[schemars(length(max = 512))]
    pub image: String,

    /// Image pull policy (Always, IfNotPresent, Never); the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Which MailboxServers (in this namespace) this pool routes to.
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)").message("spec.mailboxSelector must not be empty: give matchLabels or matchExpressions that select the pool's MailboxServers"))]
    pub mailbox_selector: LabelSelector,

    /// Client-facing listeners. TLS listeners (imaps, pop3s, https) are served only when
    /// `tls` is set.
    #[serde(default)]
    pub listeners: Listeners,

    /// Certificate for IMAPS, POP3S, HTTPS and STARTTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// STARTTLS on the plain IMAP and POP3 listeners: off, on (offered; the default), only
    /// (required before login). The default is on, unlike Zimbra's only, because only needs a
    /// certificate (`tls`) and a pool without one could not serve any login: with `tls`, set
    /// only.
    #[serde(default)]
    pub starttls: StartTlsMode,

    /// Connect to the mailbox servers' web ports over TLS (their https port), verifying their
    /// certificates (Zimbra's zimbraReverseProxySSLToUpstreamEnabled). Off by default.
    #[serde(default)]
    pub web_upstream_tls: bool,

    /// The pool's memcached route cache.
    #[serde(default)]
    pub memcached: MemcachedSpec,

    /// Route cache settings.
    #[serde(default)]
    pub route_cache: RouteCacheSpec,

    /// Route Lookup Handler client settings.
    #[serde(default)]
    pub lookup: LookupSpec,

    /// Login throttling (all off by default, as in Zimbra).
    #[serde(default)]
    pub login_limits: LoginLimits,

    /// Session timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// The Service in front of the proxies.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Pod scheduling and resource overrides.
    #[serde(default)]
    pub pod: PodOverrides,

    /// PodDisruptionBudget for the proxy pods.
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,

    /// The web proxy on the http and https listeners.
    #[serde(default)]
    pub web: WebSpec,
}

/// The web proxy's behaviour and limits. These are settings of `mailproxy serve` (its
/// `config.yaml`), not of the route table: changing them rolls the proxies.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WebSpec {
    /// Answer every request on the http listener with a permanent redirect to the same URL on
    /// the https listener (Zimbra's zimbraReverseProxyMailMode: redirect). Needs spec.tls and
    /// the https listener.
    #[serde(default)]
    pub redirect_to_https: bool,
    /// Largest request head in bytes: HTTP/1.1 clients get 431 past it.
    #[serde(default = "web::max_header_bytes")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 1048576").message("spec.web.maxHeaderBytes must be between 1024 and 1048576"))]
    pub max_header_bytes: i64,
    /// Seconds a client has to send a whole request head (a slowloris guard).
    #[serde(default = "web::header_read_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("spec.web timeouts must be between 1 second and 30 days (2592000)"))]
    pub header_read_timeout_seconds: i64,
    /// Seconds from sending a request to the mailbox server's response head (504 past it).
    /// Zimbra's web client long-polls for minutes, hence the generous default.
    #[serde(default = "web::upstream_response_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("spec.web timeouts must be between 1 second and 30 days (2592000)"))]
    pub upstream_response_timeout_seconds: i64,
    /// Seconds a request or response body may stall (no byte moved) before the exchange is
    /// given up.
    #[serde(default = "web::body_idle_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("spec.web timeouts must be between 1 second and 30 days (2592000)"))]
    pub body_idle_timeout_seconds: i64,
    /// Seconds an upgraded connection (WebSocket) may carry nothing either way.
    #[serde(default = "web::tunnel_idle_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("spec.web timeouts must be between 1 second and 30 days (2592000)"))]
    pub tunnel_idle_timeout_seconds: i64,
}

impl Default for WebSpec {
    fn default() -> Self {
        Self {
            redirect_to_https: false,
            max_header_bytes: web::max_header_bytes(),
            header_read_timeout_seconds: web::header_read_timeout_seconds(),
            upstream_response_timeout_seconds: web::upstream_response_timeout_seconds(),
            body_idle_timeout_seconds: web::body_idle_timeout_seconds(),
            tunnel_idle_timeout_seconds: web::tunnel_idle_timeout_seconds(),
        }
    }
}

/// The proxy's own defaults (`HttpConfig`), so that a pool without `spec.web` runs its proxies
/// exactly as a standalone proxy without an `http` section.
mod web {
    use crate::proxy_config::HttpConfig;

    fn signed(value: u64) -> i64 {
        i64::try_from(value).unwrap_or(i64::MAX)
    }
    pub fn max_header_bytes() -> i64 {
        signed(HttpConfig::default().max_header_bytes as u64)
    }
    pub fn header_read_timeout_seconds() -> i64 {
        signed(HttpConfig::default().header_read_timeout_seconds)
    }
    pub fn upstream_response_timeout_seconds() -> i64 {
        signed(HttpConfig::default().upstream_response_timeout_seconds)
    }
    pub fn body_idle_timeout_seconds() -> i64 {
        signed(HttpConfig::default().body_idle_timeout_seconds)
    }
    pub fn tunnel_idle_timeout_seconds() -> i64 {
        signed(HttpConfig::default().tunnel_idle_timeout_seconds)
    }
}

/// Client-facing listeners (Zimbra proxy defaults).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
// One list of ports rather than of listener objects: the API server types each listener field
// separately and refuses a list that mixes them. A disabled listener counts as port 0.
#[x_kube(validation = Rule::new("[self.imap.enabled ? self.imap.port : 0, self.imaps.enabled ? self.imaps.port : 0, self.pop3.enabled ? self.pop3.port : 0, self.pop3s.enabled ? self.pop3s.port : 0, self.http.enabled ? self.http.port : 0, self.https.enabled ? self.https.port : 0].all(p, p == 0 || [self.imap.enabled ? self.imap.port : 0, self.imaps.enabled ? self.imaps.port : 0, self.pop3.enabled ? self.pop3.port : 0, self.pop3s.enabled ? self.pop3s.port : 0, self.http.enabled ? self.http.port : 0, self.https.enabled ? self.https.port : 0].filter(q, q == p).size() == 1)").message("spec.listeners: two enabled listeners use the same port"))]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    #[serde(
        default = "listener::on::<143>",
        deserialize_with = "listener::or_port::<143, _>"
    )]
    #[schemars(schema_with = "listener::schema::<143>")]
    pub imap: Listener,
    #[serde(
        default = "listener::on::<993>",
        deserialize_with = "listener::or_port::<993, _>"
    )]
    #[schemars(schema_with = "listener::schema::<993>")]
    pub imaps: Listener,
    #[serde(
        default = "listener::on::<110>",
        deserialize_with = "listener::or_port::<110, _>"
    )]
    #[schemars(schema_with = "listener::schema::<110>")]
    pub pop3: Listener,
    #[serde(
        default = "listener::on::<995>",
        deserialize_with = "listener::or_port::<995, _>"
    )]
    #[schemars(schema_with = "listener::schema::<995>")]
    pub pop3s: Listener,
    #[serde(
        default = "listener::on::<80>",
        deserialize_with = "listener::or_port::<80, _>"
    )]
    #[schemars(schema_with = "listener::schema::<80>")]
    pub http: Listener,
    #[serde(
        default = "listener::on::<443>",
        deserialize_with = "listener::or_port::<443, _>"
    )]
    #[schemars(schema_with = "listener::schema::<443>")]
    pub https: Listener,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            imap: listener::on::<143>(),
            imaps: listener::on::<993>(),
            pop3: listener::on::<110>(),
            pop3s: listener::on::<995>(),
            http: listener::on::<80>(),
            https: listener::on::<443>(),
        }
    }
}

/// One client-facing listener. Its port defaults to the protocol's well-known one, so that
/// `{enabled: false}` is all it takes to turn a listener off.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("listener port must be between 1 and 65535"))]
    pub port: i32,
}

/// Each listener's port default, for the API server (in the schema) and for serde alike.
mod listener {
    use schemars::{JsonSchema, Schema, SchemaGenerator};
    use serde::{Deserialize, Deserializer};

    use super::{Listener, defaults};

    pub fn on<const PORT: i32>() -> Listener {
        Listener {
            enabled: true,
            port: PORT,
        }
    }

    /// A listener as written, its port left out or not.
    #[derive(Deserialize)]
    struct Written {
        #[serde(default = "defaults::enabled")]
        enabled: bool,
        port: Option<i32>,
    }

    pub fn or_port<'de, const PORT: i32, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Listener, D::Error> {
        let written = Written::deserialize(deserializer)?;
        Ok(Listener {
            enabled: written.enabled,
            port: written.port.unwrap_or(PORT),
        })
    }

    /// [`Listener`]'s schema with `PORT` as the port's default: the API server fills it in,
    /// and the port is no longer required.
    pub fn schema<const PORT: i32>(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = Listener::json_schema(generator);
        if let Some(port) = schema
            .get_mut("properties")
            .and_then(|properties| properties.get_mut("port"))
            .and_then(|port| port.as_object_mut())
        {
            port.insert("default".into(), PORT.into());
        }
        schema.remove("required");
        schema.insert(
            "default".into(),
            serde_json::to_value(on::<PORT>()).expect("a listener serializes"),
        );
        schema
    }
}

/// A TLS Secret (type kubernetes.io/tls) in the pool's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 253").message("spec.tls.secretName must name a Secret"))]
    pub secret_name: String,
}

/// Image pull policy of the pool's containers.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The memcached StatefulSet that holds the pool's shared route cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemcachedSpec {
    /// memcached pods; 0 makes each proxy use its embedded in-process cache instead.
    #[serde(default = "defaults::memcached_replicas")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 64").message("spec.memcached.replicas must be between 0 and 64"))]
    pub replicas: i32,
    /// Cache memory per memcached pod, in MiB (memcached -m).
    #[serde(default = "defaults::memcached_memory_mib")]
    #[x_kube(validation = Rule::new("self >= 16 && self <= 65536").message("spec.memcached.memoryMiB must be between 16 and 65536"))]
    #[serde(rename = "memoryMiB")]
    pub memory_mib: i32,
    #[serde(default = "defaults::memcached_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
}

impl Default for MemcachedSpec {
    fn default() -> Self {
        Self {
            replicas: defaults::memcached_replicas(),
            memory_mib: defaults::memcached_memory_mib(),
            image: defaults::memcached_image(),
        }
    }
}

/// Route cache settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteCacheSpec {
    /// How long a learned route stays cached (zimbraReverseProxyCacheEntryTTL).
    #[serde(default = "defaults::cache_ttl_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 604800").message("spec.routeCache.ttlSeconds must be between 1 second and 7 days"))]
    pub ttl_seconds: i64,
}

impl Default for RouteCacheSpec {
    fn default() -> Self {
        Self {
            ttl_seconds: defaults::cache_ttl_seconds(),
        }
    }
}

/// Route Lookup Handler client settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LookupSpec {
    /// Per-handler request timeout before failing over to the next handler.
    #[serde(default = "defaults::lookup_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 300").message("spec.lookup.timeoutSeconds must be between 1 and 300"))]
    pub timeout_seconds: i64,
    /// How long a failed handler is skipped.
    #[serde(default = "defaults::handler_down_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("spec.lookup.handlerDownSeconds must be between 0 and 3600"))]
    pub handler_down_seconds: i64,
    /// Shared secret sent to lookup handlers in `X-Mailproxy-Lookup-Secret`, from a Secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

impl Default for LookupSpec {
    fn default() -> Self {
        Self {
            timeout_seconds: defaults::lookup_timeout_seconds(),
            handler_down_seconds: defaults::handler_down_seconds(),
            secret_ref: None,
        }
    }
}

/// A key of a Secret in the pool's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The client-facing Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations for the Service (cloud load-balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Preserve client source addresses (externalTrafficPolicy: Local) for NodePort and
    /// LoadBalancer Services; the proxy logs and forwards the real client IP.
    #[serde(default)]
    pub preserve_client_ip: bool,
    /// The load balancer in front of the Service sends a PROXY protocol header (v1 or v2) with
    /// the client's address on every connection: an AWS NLB, HAProxy or a cloud load balancer
    /// with the PROXY protocol turned on (usually through `annotations`). Every client-facing
    /// listener then requires the header and takes the client's address from it (logs, login
    /// limits, X-Forwarded-For, IMAP ID and POP3 XOIP to the mailbox servers); connections
    /// from outside `trustedNetworks` are closed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolSpec>,
    /// The Service's IP families on a dual-stack cluster (`PreferDualStack`: clients reach the
    /// proxies over IPv4 and IPv6); unset, the cluster's default (one family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<IpFamilyPolicy>,
}

/// The PROXY protocol from the load balancer in front of the Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyProtocolSpec {
    /// Where the headers may come from: IP addresses and CIDR blocks, the only sources the
    /// listeners serve. List the load balancer's addresses, or the node or pod CIDRs its
    /// connections arrive from (a client allowed to send the header could claim any address,
    /// and escape the per-IP login limits).
    #[schemars(length(max = 1000), inner(length(max = 64)))]
    #[x_kube(
        validation = Rule::new("self.size() > 0").message("spec.service.proxyProtocol.trustedNetworks must not be empty: list the load balancer's addresses or CIDR blocks, the only sources the proxies will serve"),
        validation = Rule::new("self.all(e, isIP(e) || isCIDR(e))").message("spec.service.proxyProtocol.trustedNetworks entries must be IP addresses or CIDR blocks: list addresses such as 192.0.2.7 and blocks such as 10.0.0.0/8 or 2001:db8::/32"),
    )]
    pub trusted_networks: Vec<String>,
}

/// Kubernetes Service `ipFamilyPolicy`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl IpFamilyPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        }
    }
}

/// Kubernetes Service type.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Pod-level overrides for the proxy pods. The node selector, tolerations, priority class and
/// image pull secrets apply to the pool's memcached pods too.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets (in the pool's namespace) for pulling the proxy and memcached images from a
    /// private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How long a terminating pod lets live sessions finish before closing them.
    #[serde(default = "defaults::termination_grace_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400").message("spec.pod.terminationGracePeriodSeconds must be between 0 and 86400"))]
    pub termination_grace_period_seconds: i64,
}

impl Default for PodOverrides {
    fn default() -> Self {
        Self {
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            topology_spread_constraints: Vec::new(),
            priority_class_name: None,
            image_pull_secrets: Vec::new(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            termination_grace_period_seconds: defaults::termination_grace_seconds(),
        }
    }
}

/// PodDisruptionBudget for the proxy pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    #[serde(default = "defaults::max_unavailable")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.disruptionBudget.maxUnavailable must be at least 1"))]
    pub max_unavailable: i32,
}

impl Default for DisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: defaults::max_unavailable(),
        }
    }
}

/// Observed state of a ProxyPool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the proxy pods, for the scale subresource (HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Content version of the route table the proxies are serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_table_version: Option<String>,
    /// MailboxServers the selector matches.
    #[serde(default)]
    pub mailbox_servers: i32,
}

/// Spec defaults, shared with the operator and documentation.
pub mod defaults {
    pub const IMAGE: &str = "mailproxy/mailproxy:0.1.0";
    pub const MEMCACHED_IMAGE: &str = "memcached:1.6-alpine";

    pub fn replicas() -> i32 {
        2
    }
    pub fn image() -> String {
        IMAGE.to_string()
    }
    pub fn enabled() -> bool {
        true
    }
    pub fn memcached_replicas() -> i32 {
        1
    }
    pub fn memcached_memory_mib() -> i32 {
        64
    }
    pub fn memcached_image() -> String {
        MEMCACHED_IMAGE.to_string()
    }
    pub fn cache_ttl_seconds() -> i64 {
        3600
    }
    pub fn lookup_timeout_seconds() -> i64 {
        15
    }
    pub fn handler_down_seconds() -> i64 {
        60
    }
    pub fn max_unavailable() -> i32 {
        1
    }
    pub fn termination_grace_seconds() -> i64 {
        300
    }
}
