//! What the boot needs of the container engine, as one object-safe trait:
//! [`BootRuntime`] is [`Runtime`]'s per-container operations (to start, wait for, kill
//! and clean up bootstrap containers, and to find one a keeld before a restart
//! started) and [`Prefetch`] (their images made ready while the files render).
//!
//! [`Boot`](super::Boot) holds an `Arc<dyn BootRuntime>` rather than a type parameter:
//! the boot's steps are `impl Boot` blocks spread over several files (the derived
//! settings live in [`super::derived`]), and a parameter would have to be threaded
//! through each of them for no gain: the boot calls the engine a handful of times per
//! bootstrap container, against containerd round trips that cost far more than one
//! boxed future each. Every engine with [`Runtime`] + [`Prefetch`] is one, through the
//! blanket implementation here: [`ContainerdRuntime`] in keeld, the fake
//! (`containers::fake`) in unit tests.
//!
//! [`ContainerdRuntime`]: crate::containers::runtime::ContainerdRuntime

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::containers::desired::DesiredContainer;
use crate::containers::engine::Prefetch;
use crate::containers::registry::RegistryConfig;
use crate::containers::runtime::{Existing, Prepared, RunError, Runtime};
use crate::containers::status::ContainerKind;

/// A future the boot awaits, boxed so that the trait can be used as `dyn`.
pub type BootFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The container operations of the boot; see [`Runtime`] and [`Prefetch`] for what
/// each does.
pub trait BootRuntime: Send + Sync {
    /// [`Prefetch::prefetch_image`].
    fn prefetch<'a>(
        &'a self,
        source: &'a str,
        registries: &'a RegistryConfig,
    ) -> BootFuture<'a, ()>;
    /// [`Runtime::find`].
    fn find<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<Option<Existing>, RunError>>;
    /// [`Runtime::prepare`].
    fn prepare<'a>(
        &'a self,
        desired: &'a DesiredContainer,
        registries: &'a RegistryConfig,
    ) -> BootFuture<'a, Result<Prepared, RunError>>;
    /// [`Runtime::start`].
    fn start<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<u32, RunError>>;
    /// [`Runtime::wait`].
    fn wait<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<i32, RunError>>;
    /// [`Runtime::stop`]; a zero `grace` kills at once.
    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BootFuture<'a, Result<Option<i32>, RunError>>;
    /// [`Runtime::delete_task`].
    fn delete_task<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<Option<i32>, RunError>>;
    /// [`Runtime::remove`].
    fn remove<'a>(
        &'a self,
        kind: ContainerKind,
        name: &'a str,
    ) -> BootFuture<'a, Result<(), RunError>>;
}

impl<R: Runtime + Prefetch> BootRuntime for R {
    fn prefetch<'a>(
        &'a self,
        source: &'a str,
        registries: &'a RegistryConfig,
    ) -> BootFuture<'a, ()> {
        Box::pin(Prefetch::prefetch_image(self, source, registries))
    }

    fn find<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<Option<Existing>, RunError>> {
        Box::pin(Runtime::find(self, id))
    }

    fn prepare<'a>(
        &'a self,
        desired: &'a DesiredContainer,
        registries: &'a RegistryConfig,
    ) -> BootFuture<'a, Result<Prepared, RunError>> {
        Box::pin(Runtime::prepare(self, desired, registries))
    }

    fn start<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<u32, RunError>> {
        Box::pin(Runtime::start(self, id))
    }

    fn wait<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<i32, RunError>> {
        Box::pin(Runtime::wait(self, id))
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BootFuture<'a, Result<Option<i32>, RunError>> {
        Box::pin(Runtime::stop(self, id, grace))
    }

    fn delete_task<'a>(&'a self, id: &'a str) -> BootFuture<'a, Result<Option<i32>, RunError>> {
        Box::pin(Runtime::delete_task(self, id))
    }

    fn remove<'a>(
        &'a self,
        kind: ContainerKind,
        name: &'a str,
    ) -> BootFuture<'a, Result<(), RunError>> {
        Box::pin(Runtime::remove(self, kind, name))
    }
}
