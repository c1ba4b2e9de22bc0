//! The proxies' PodDisruptionBudget (opt out with `spec.disruptionBudget.enabled: false`).

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Pool;
use crate::labels::{self, Component, names};

pub fn pdb(pool: &Pool<'_>) -> Option<PodDisruptionBudget> {
    let budget = &pool.spec.disruption_budget;
    budget.enabled.then(|| PodDisruptionBudget {
        metadata: pool.child_meta(names::proxy(pool.name), Component::Proxy),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(budget.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(labels::selector(pool.name, Component::Proxy)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pool, spec};
    use super::*;
    use serde_json::json;

    #[test]
    fn budget_selects_the_proxies_and_can_be_turned_off() {
        let on = spec(json!({"disruptionBudget": {"maxUnavailable": 2}}));
        let pdb = pdb(&pool(&on)).unwrap().spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(2)));
        assert_eq!(
            pdb.selector.unwrap().match_labels.unwrap()["app.kubernetes.io/component"],
            "proxy"
        );
        let off = spec(json!({"disruptionBudget": {"enabled": false}}));
        assert!(super::pdb(&pool(&off)).is_none());
    }
}
