//! What the boot and the host containers need of the container engine beyond the
//! per-container operations of [`Runtime`]: getting an image ready ahead of a start
//! ([`Prefetch`]) and finding the containers keeld created, by their labels
//! ([`Inventory`]). With [`Runtime`] they are the whole seam between keeld's logic
//! (boot sequencing, resume, supervision) and containerd: [`ContainerdRuntime`] is the
//! real thing, and unit tests drive the same logic against a fake with paused time.
//!
//! Implemented here for [`ContainerdRuntime`], from its public surface, so that the
//! client and the image pipeline stay behind it.
//!
//! [`Runtime`]: super::runtime::Runtime

use std::future::Future;

use super::registry::RegistryConfig;
use super::runtime::{ContainerdRuntime, RunError, LABEL_KIND, LABEL_MANAGED, LABEL_NAME};
use super::status::ContainerKind;

/// Getting images ready before they are needed.
pub trait Prefetch: Send + Sync + 'static {
    /// Makes `source` ready to run (pulled or imported, unpacked). A failure is left
    /// for the start of the container to report (and retry), so nothing is answered.
    fn prefetch_image(
        &self,
        source: &str,
        registries: &RegistryConfig,
    ) -> impl Future<Output = ()> + Send;
}

/// The containers keeld created, in this run or an earlier one.
pub trait Inventory: Send + Sync + 'static {
    /// The names of the `kind` containers whose records carry keeld's labels.
    fn managed(
        &self,
        kind: ContainerKind,
    ) -> impl Future<Output = Result<Vec<String>, RunError>> + Send;
}

impl Prefetch for ContainerdRuntime {
    async fn prefetch_image(&self, source: &str, registries: &RegistryConfig) {
        self.prefetch(source, registries).await;
    }
}

impl Inventory for ContainerdRuntime {
    async fn managed(&self, kind: ContainerKind) -> Result<Vec<String>, RunError> {
        let records = self.cd.containers_labelled(LABEL_MANAGED, "true").await?;
        Ok(records
            .into_iter()
            .filter(|c| c.labels.get(LABEL_KIND).map(String::as_str) == Some(kind.as_str()))
            .filter_map(|c| c.labels.get(LABEL_NAME).cloned())
            // The name becomes a path keeld removes from (`remove`): only a name the
            // settings model could have given (a label written by someone else that
            // says `../x` is not keeld's container).
            .filter(|name| {
                let valid = settings_model::types::Identifier::new(name.as_str()).is_ok();
                if !valid {
                    tracing::warn!(kind = kind.as_str(), name = %name.escape_debug(), "a container labelled as keeld's has a name keeld never gives; left alone");
                }
                valid
            })
            .collect())
    }
}
