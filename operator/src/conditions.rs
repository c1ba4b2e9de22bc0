//! Status conditions: a condition keeps its lastTransitionTime while its status stays the same,
//! so an unchanged status is byte-for-byte unchanged and is not written again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// One condition as a reconcile decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Decided {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: String) -> Self {
        Self {
            type_,
            status,
            reason,
            message,
        }
    }
}

/// The conditions to write: `decided` in order, each with the previous lastTransitionTime when
/// its status did not change, else `now`.
pub fn merge(
    previous: &[Condition],
    decided: Vec<Decided>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    decided
        .into_iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_string();
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: d.type_.to_string(),
                status,
                reason: d.reason.to_string(),
                message: d.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The status of condition `type_`, if present.
#[cfg(test)]
pub(crate) fn status_of<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn time(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first = merge(
            &[],
            vec![Decided::new("Ready", false, "NotYet", "m".into())],
            Some(1),
            &time(10),
        );
        assert_eq!(first[0].last_transition_time, time(10));
        let same = merge(
            &first,
            vec![Decided::new("Ready", false, "StillNot", "n".into())],
            Some(2),
            &time(20),
        );
        assert_eq!(same[0].last_transition_time, time(10));
        assert_eq!(same[0].observed_generation, Some(2));
        assert_eq!(same[0].reason, "StillNot");
        let flipped = merge(
            &same,
            vec![Decided::new("Ready", true, "Done", "o".into())],
            Some(2),
            &time(30),
        );
        assert_eq!(flipped[0].last_transition_time, time(30));
        assert_eq!(status_of(&flipped, "Ready"), Some("True"));
        assert_eq!(status_of(&flipped, "Degraded"), None);
    }
}
