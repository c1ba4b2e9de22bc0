//! What the operator needs of the API server (the rules of docs/operator.md and the Helm chart),
//! checked at start with SelfSubjectAccessReviews: a missing rule stops the operator with the
//! list of what is missing, instead of surfacing later as a watch that fails with 403 while
//! `/readyz` says ready.

use anyhow::bail;
use futures::future::join_all;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::Settings;

/// One rule: verbs on a resource (`resource/subresource`) of an API group.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

const CRUD: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

/// Needed wherever the operator watches (every namespace, or `--namespace`).
pub const WATCHED: &[Rule] = &[
    Rule {
        group: "mailproxy.io",
        resource: "mailboxservers",
        verbs: &["get", "list", "watch", "patch"],
    },
    // Pools are only read: their status is written through the subresource, and they carry no
    // finalizer.
    Rule {
        group: "mailproxy.io",
        resource: "proxypools",
        verbs: &["get", "list", "watch"],
    },
    // The children's owner references block the pool's deletion until they are gone, which an
    // API server with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift)
    // allows only to whoever may update the pool's finalizers.
    Rule {
        group: "mailproxy.io",
        resource: "proxypools/finalizers",
        verbs: &["update"],
    },
    Rule {
        group: "mailproxy.io",
        resource: "mailboxservers/status",
        verbs: &["patch"],
    },
    Rule {
        group: "mailproxy.io",
        resource: "proxypools/status",
        verbs: &["patch"],
    },
    Rule {
        group: "",
        resource: "configmaps",
        verbs: CRUD,
    },
    Rule {
        group: "",
        resource: "services",
        verbs: CRUD,
    },
    Rule {
        group: "",
        resource: "serviceaccounts",
        verbs: CRUD,
    },
    Rule {
        group: "",
        resource: "secrets",
        verbs: &["get"],
    },
    Rule {
        group: "apps",
        resource: "deployments",
        verbs: CRUD,
    },
    Rule {
        group: "apps",
        resource: "statefulsets",
        verbs: CRUD,
    },
    Rule {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: CRUD,
    },
    Rule {
        group: "policy",
        resource: "poddisruptionbudgets",
        verbs: CRUD,
    },
    Rule {
        group: "rbac.authorization.k8s.io",
        resource: "roles",
        verbs: CRUD,
    },
    Rule {
        group: "rbac.authorization.k8s.io",
        resource: "rolebindings",
        verbs: CRUD,
    },
    Rule {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// Needed in the leader Lease's namespace only.
pub const LEASE: Rule = Rule {
    group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["get", "create", "patch"],
};

/// Fails with every missing permission named, and what to do about it.
pub async fn check(client: &Client, settings: &Settings) -> anyhow::Result<()> {
    let watched = settings.namespace.as_deref();
    let wanted = WATCHED
        .iter()
        .map(|rule| (rule, watched))
        .chain([(&LEASE, Some(settings.lease_namespace.as_str()))])
        .flat_map(|(rule, namespace)| rule.verbs.iter().map(move |verb| (rule, *verb, namespace)));
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answers = join_all(wanted.map(|(rule, verb, namespace)| {
        let reviews = reviews.clone();
        async move {
            let allowed = allowed(&reviews, rule, verb, namespace).await;
            (rule, verb, namespace, allowed)
        }
    }))
    .await;
    let mut missing = Vec::new();
    for (rule, verb, namespace, allowed) in answers {
        let scope = namespace.map_or("in every namespace".to_string(), |ns| {
            format!("in namespace {ns}")
        });
        match allowed {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{verb} {} {scope}", qualified(rule))),
            Err(error) => bail!(
                "cannot ask the API server what this ServiceAccount may do \
                 (SelfSubjectAccessReview): {error}"
            ),
        }
    }
    if !missing.is_empty() {
        bail!(
            "the operator's ServiceAccount lacks {} permission(s): {}. Install the Helm chart's \
             RBAC (rbac.create=true) or apply the rules in docs/operator.md (a Role in the \
             --namespace it watches, or a ClusterRole), and a Role for leases in the Lease's \
             namespace",
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(())
}

fn qualified(rule: &Rule) -> String {
    match rule.group {
        "" => rule.resource.to_string(),
        group => format!("{}.{group}", rule.resource),
    }
}

async fn allowed(
    reviews: &Api<SelfSubjectAccessReview>,
    rule: &Rule,
    verb: &str,
    namespace: Option<&str>,
) -> kube::Result<bool> {
    let (resource, subresource) = match rule.resource.split_once('/') {
        Some((resource, subresource)) => (resource, Some(subresource.to_string())),
        None => (rule.resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(rule.group.to_string()),
                resource: Some(resource.to_string()),
                subresource,
                verb: Some(verb.to_string()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = reviews.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|status| status.allowed))
}
