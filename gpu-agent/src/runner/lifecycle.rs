//! One allocation's life on this node: prepare, start, watch, restart by policy,
//! stop on request, and, for a run found after an agent restart, wait for the
//! control plane's word first. The states it reports are the runner's (see
//! [`super`]).

use std::sync::Arc;

use aigrid_api::AllocState;
use tokio::sync::watch;

use super::{Control, Inner};
use crate::driver::{TaskContext, TaskExit, TaskHandle};

/// How a lifecycle begins.
pub(super) enum Start {
    /// A new allocation: prepare, then start.
    Fresh,
    /// A run an earlier agent started that still runs: watch it.
    Attached(Box<dyn TaskHandle>),
    /// Stopped under an earlier agent: starts again once the control plane says
    /// it still wants it.
    Stopped,
}

/// The terminal state and reason of a run that ended and will not be restarted.
pub(super) fn outcome(exit: &TaskExit, restarts: u32) -> (AllocState, Option<String>) {
    if exit.success() {
        (AllocState::Complete, None)
    } else {
        (AllocState::Failed, Some(exit.reason(restarts)))
    }
}

/// What interrupted a wait.
enum Event<T> {
    Done(T),
    Stop,
    Shutdown,
}

/// Waits for `fut`, a stop request or the runner's shutdown, whichever comes first.
async fn until<T>(
    fut: impl std::future::Future<Output = T>,
    control: &mut watch::Receiver<Control>,
    shutdown: &mut watch::Receiver<bool>,
) -> Event<T> {
    tokio::select! {
        value = fut => Event::Done(value),
        () = wait_for(control, |c| *c == Control::Stop) => Event::Stop,
        () = wait_for(shutdown, |s| *s) => Event::Shutdown,
    }
}

/// Resolves once the watched value satisfies `pred`; never, if its sender is gone.
async fn wait_for<T>(rx: &mut watch::Receiver<T>, pred: impl FnMut(&T) -> bool) {
    if rx.wait_for(pred).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One allocation's life on this node, from `start` to a terminal state (or to the
/// runner's shutdown, which leaves the workload running).
pub(super) async fn lifecycle(
    inner: Arc<Inner>,
    mut ctx: TaskContext,
    start: Start,
    mut control: watch::Receiver<Control>,
) {
    let mut shutdown = inner.shutdown.subscribe();
    let id = ctx.alloc.id.clone();
    let mut handle = match start {
        Start::Attached(handle) => handle,
        Start::Fresh => {
            let prepared = inner.driver.prepare(&inner.config, &ctx);
            match until(prepared, &mut control, &mut shutdown).await {
                Event::Done(Ok(())) => {}
                Event::Done(Err(e)) => {
                    tracing::warn!(alloc = %id, reason = %e.reason(), "allocation cannot start");
                    return inner.set(&id, AllocState::Failed, Some(e.reason()));
                }
                Event::Stop => return inner.set(&id, AllocState::Stopped, None),
                Event::Shutdown => return,
            }
            match start_run(&inner, &ctx).await {
                Some(handle) => handle,
                None => return,
            }
        }
        Start::Stopped => {
            match start_when_wanted(&inner, &ctx, &mut control, &mut shutdown).await {
                Some(handle) => handle,
                None => return,
            }
        }
    };
    loop {
        let (limits, restarts) = (handle.limits(), ctx.restarts);
        inner.update(&id, |r| {
            r.state = AllocState::Running;
            r.reason = None;
            r.restarts = restarts;
            r.limits = Some(limits);
        });
        let exit = match until(handle.wait(), &mut control, &mut shutdown).await {
            Event::Done(exit) => exit,
            Event::Stop => {
                handle.stop(ctx.task.kill_timeout()).await;
                tracing::info!(alloc = %id, "allocation stopped");
                return inner.set(&id, AllocState::Stopped, None);
            }
            Event::Shutdown => return,
        };
        drop(handle);
        if !ctx
            .task
            .restart
            .should_restart(exit.success(), ctx.restarts)
        {
            let (state, reason) = outcome(&exit, ctx.restarts);
            tracing::info!(alloc = %id, ?state, ?reason, "allocation ended");
            return inner.set(&id, state, reason);
        }
        let delay = ctx.task.restart.delay(ctx.restarts);
        let reason = format!(
            "{}; restarting in {} ms",
            exit.reason(ctx.restarts),
            delay.as_millis()
        );
        inner.set(&id, AllocState::Pending, Some(reason));
        match until(tokio::time::sleep(delay), &mut control, &mut shutdown).await {
            Event::Done(()) => {}
            Event::Stop => return inner.set(&id, AllocState::Stopped, None),
            Event::Shutdown => return,
        }
        ctx.restarts += 1;
        handle = match start_when_wanted(&inner, &ctx, &mut control, &mut shutdown).await {
            Some(handle) => handle,
            None => return,
        };
    }
}

/// Starts a run of `ctx`'s task; `None` (the allocation failed, reported) when the
/// driver cannot.
async fn start_run(inner: &Inner, ctx: &TaskContext) -> Option<Box<dyn TaskHandle>> {
    match inner.driver.start(&inner.config, ctx).await {
        Ok(handle) => Some(handle),
        Err(e) => {
            let id = &ctx.alloc.id;
            tracing::warn!(alloc = %id, reason = %e.reason(), "allocation cannot start");
            inner.set(id, AllocState::Failed, Some(e.reason()));
            None
        }
    }
}

/// Starts another run of `ctx`'s task once the control plane confirms it still
/// wants it (a reattached or recovered allocation waits for the first apply);
/// `None` when it is stopped instead (reported), the start fails (reported) or
/// the runner shuts down.
async fn start_when_wanted(
    inner: &Inner,
    ctx: &TaskContext,
    control: &mut watch::Receiver<Control>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Box<dyn TaskHandle>> {
    tokio::select! {
        () = wait_for(control, |c| *c != Control::Unconfirmed) => {}
        () = wait_for(shutdown, |s| *s) => return None,
    }
    if *control.borrow() == Control::Stop {
        inner.set(&ctx.alloc.id, AllocState::Stopped, None);
        return None;
    }
    start_run(inner, ctx).await
}
