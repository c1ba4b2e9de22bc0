//! Reconcile errors: each says what failed and, where a user can act, what to do.

/// Why a reconcile failed; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {kind} {namespace}/{name}: {source}")]
    Kube {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("cannot list {kind} in namespace {namespace}: {source}")]
    List {
        kind: &'static str,
        namespace: String,
        #[source]
        source: kube::Error,
    },

    #[error("{0} has no namespace: mailproxy resources are namespaced")]
    NoNamespace(String),

    #[error("cached routes not purged, retrying: {0}")]
    PurgeIncomplete(String),

    #[error("MailboxServer finalizer failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A short, stable label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { action, .. } => match *action {
                "apply" => "apply",
                "delete" => "delete",
                "get" => "get",
                _ => "api",
            },
            Error::List { .. } => "list",
            Error::NoNamespace(_) => "no_namespace",
            Error::PurgeIncomplete(_) => "purge",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(error)
                | kube::runtime::finalizer::Error::CleanupFailed(error) => error.metric_label(),
                _ => "finalizer",
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Kube`] for `map_err`.
pub(crate) fn kube_error<K: kube::Resource<DynamicType = ()>>(
    action: &'static str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let namespace = namespace.to_string();
    let name = name.to_string();
    move |source| Error::Kube {
        action,
        kind: static_kind::<K>(),
        namespace,
        name,
        source,
    }
}

/// The kind of a statically typed resource as a `&'static str`.
pub(crate) fn static_kind<K: kube::Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        std::borrow::Cow::Owned(_) => "object",
    }
}
