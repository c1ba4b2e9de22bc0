//! The Helm chart rendered and linted by a real helm: what it installs, with which permissions,
//! and how it refuses bad values. Installing it on a real API server is in `local_cluster.rs`.

use std::collections::BTreeSet;

use mailproxy_e2e::{chart_dir, helm, helm_ok, object, render, workspace_root};
use mailproxy_operator::permissions::{LEASE, Rule, WATCHED};
use serde_json::{Value, json};

const RELEASE: &str = "mp";
const NAMESPACE: &str = "mailproxy-system";
const FULLNAME: &str = "mp-mailproxy-operator";

/// `Kind/name` of every object, sorted.
fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|object| {
            format!(
                "{}/{}",
                object["kind"].as_str().unwrap(),
                object["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn the_chart_lints_clean_in_strict_mode() {
    let chart = chart_dir();
    let out = helm_ok(&["lint", "--strict", chart.to_str().unwrap()]).unwrap();
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    for file in [
        "mailproxy.io_mailboxservers.yaml",
        "mailproxy.io_proxypools.yaml",
    ] {
        let generated = std::fs::read_to_string(workspace_root().join("crds").join(file)).unwrap();
        let in_chart = std::fs::read_to_string(chart_dir().join("crds").join(file)).unwrap();
        assert!(
            generated == in_chart,
            "charts/mailproxy-operator/crds/{file} differs from crds/{file}: run scripts/gen-crds.sh"
        );
    }
}

#[test]
fn a_default_install_watches_every_namespace_with_a_cluster_role_and_leases_only_at_home() {
    let objects = render(RELEASE, NAMESPACE, &[]).unwrap();
    assert_eq!(
        kinds(&objects),
        [
            format!("ClusterRole/{FULLNAME}"),
            format!("ClusterRoleBinding/{FULLNAME}"),
            "CustomResourceDefinition/mailboxservers.mailproxy.io".to_string(),
            "CustomResourceDefinition/proxypools.mailproxy.io".to_string(),
            format!("Deployment/{FULLNAME}"),
            format!("Role/{FULLNAME}-leader-election"),
            format!("RoleBinding/{FULLNAME}-leader-election"),
            format!("Service/{FULLNAME}-metrics"),
            format!("ServiceAccount/{FULLNAME}"),
        ]
    );
    let leases = object(&objects, "Role", &format!("{FULLNAME}-leader-election")).unwrap();
    assert_eq!(leases["metadata"]["namespace"], NAMESPACE);
    let binding = object(&objects, "ClusterRoleBinding", FULLNAME).unwrap();
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}])
    );
}

/// `(group, resource, verb)` of every grant in `rules` (a Role's or ClusterRole's).
fn grants(rules: &Value) -> BTreeSet<(String, String, String)> {
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item.as_str().unwrap().to_string())
            .collect()
    };
    let mut grants = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    grants.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    grants
}

fn required(rules: &[Rule]) -> BTreeSet<(String, String, String)> {
    rules
        .iter()
        .flat_map(|rule| {
            rule.verbs.iter().map(|verb| {
                (
                    rule.group.to_string(),
                    rule.resource.to_string(),
                    verb.to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn the_charts_rules_are_exactly_what_the_operator_checks_it_holds() {
    for set in [&[][..], &["watchNamespace=mail"][..]] {
        let objects = render(RELEASE, NAMESPACE, set).unwrap();
        let kind = if set.is_empty() {
            "ClusterRole"
        } else {
            "Role"
        };
        let watched = object(&objects, kind, FULLNAME).unwrap();
        assert_eq!(grants(&watched["rules"]), required(WATCHED), "{kind}");
        let leases = object(&objects, "Role", &format!("{FULLNAME}-leader-election")).unwrap();
        assert_eq!(grants(&leases["rules"]), required(&[LEASE]));
    }
}

#[test]
fn the_operator_pod_runs_as_non_root_read_only_with_no_capabilities() {
    let objects = render(RELEASE, NAMESPACE, &[]).unwrap();
    let deployment = object(&objects, "Deployment", FULLNAME).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], FULLNAME);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "mailproxy/mailproxy-operator:0.1.0");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let args = container["args"].as_array().unwrap();
    assert!(
        args.contains(&json!(format!("--lease-name={FULLNAME}"))),
        "{args:?}"
    );
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter().all(|var| var["name"] != "WATCH_NAMESPACE"),
        "no namespace restriction by default: {env:?}"
    );
}

/// The pod labels the Deployment selects by, and by which each pool's memcached admits the
/// operator (`POD_LABELS`), stay the chart's whatever `podLabels` says.
#[test]
fn pod_labels_add_to_the_selector_labels_and_cannot_replace_them() {
    let objects = render(
        RELEASE,
        NAMESPACE,
        &[
            "podLabels.team=mail",
            "podLabels.app\\.kubernetes\\.io/name=other",
        ],
    )
    .unwrap();
    let deployment = object(&objects, "Deployment", FULLNAME).unwrap();
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        labels,
        &json!({
            "app.kubernetes.io/name": "mailproxy-operator",
            "app.kubernetes.io/instance": RELEASE,
            "team": "mail",
        })
    );
    let selected = &deployment["spec"]["selector"]["matchLabels"];
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let pod_labels = env.iter().find(|var| var["name"] == "POD_LABELS").unwrap();
    assert_eq!(
        pod_labels["value"],
        format!(
            "app.kubernetes.io/name={},app.kubernetes.io/instance={}",
            selected["app.kubernetes.io/name"].as_str().unwrap(),
            selected["app.kubernetes.io/instance"].as_str().unwrap()
        )
    );
}

#[test]
fn a_namespaced_install_holds_no_cluster_wide_permission() {
    let objects = render(
        RELEASE,
        NAMESPACE,
        &["watchNamespace=mail", "replicas=2", "image.tag=1.2.3"],
    )
    .unwrap();
    let kinds = kinds(&objects);
    assert!(
        kinds.iter().all(|kind| !kind.starts_with("ClusterRole")),
        "{kinds:?}"
    );
    let role = object(&objects, "Role", FULLNAME).unwrap();
    assert_eq!(role["metadata"]["namespace"], "mail");
    let binding = object(&objects, "RoleBinding", FULLNAME).unwrap();
    assert_eq!(binding["metadata"]["namespace"], "mail");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    let deployment = object(&objects, "Deployment", FULLNAME).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "mailproxy/mailproxy-operator:1.2.3");
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "WATCH_NAMESPACE", "value": "mail"})),
        "{container}"
    );
    let budget = object(&objects, "PodDisruptionBudget", FULLNAME).unwrap();
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
}

#[test]
fn bad_values_are_refused_with_the_field_named() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for (value, expected) in [
        ("replicas=two", "/replicas"),
        ("logFormat=xml", "/logFormat"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("replica=2", "additional properties 'replica' not allowed"),
    ] {
        let output = helm(&["template", RELEASE, chart, "--set", value]).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{value} was accepted");
        assert!(stderr.contains(expected), "{value}: {stderr}");
    }
    let output = helm(&[
        "template",
        RELEASE,
        chart,
        "--set",
        "serviceAccount.create=false",
    ])
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("serviceAccount.name is required when serviceAccount.create is false"),
        "{stderr}"
    );
}
