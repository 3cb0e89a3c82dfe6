//! [`Repoll`]: a task that wakes itself while it is being polled is polled again in
//! place, instead of going back through the scheduler.
//!
//! hyper's HTTP/1 connection hands a request's body to the handler through a channel
//! whose two ends live in the same task (the connection's): when the handler takes the
//! body, the channel wakes the connection's own task, in the middle of its poll. Tokio's
//! multi-thread scheduler takes a task woken during its own poll for a task that
//! yielded: it puts it at the back of the run queue and wakes an idle worker to share
//! the work. On a host with two workers that is a futex wake, and two context switches
//! of a worker that finds nothing to do, for every request with a body (every PATCH,
//! every POST with JSON). `Repoll` notices the wake and polls again at once; it does so
//! a bounded number of times, and only while the task has cooperative budget left, so a
//! task that really yields (or spins on itself) still goes back to the scheduler.
//!
//! No wake-up is ever lost: a wake that arrives while the inner future is being polled
//! is recorded and answered by polling again; one that arrives at any other time goes
//! to the task's waker as usual.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Most extra polls in one poll of [`Repoll`]: enough for the body hand-off, which
/// wakes the task once or twice per request.
const MAX_REPOLLS: usize = 4;

/// Polls `F`, polling it again in place when it woke its own task during the poll.
pub struct Repoll<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
}

/// What the inner future's waker sees.
struct Flag {
    /// The inner future is being polled now.
    polling: AtomicBool,
    /// A wake arrived since the current poll began.
    woken: AtomicBool,
    /// The task's own waker, from its latest poll.
    outer: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Recorded first, then checked: if the poll ended in between, either the poller
        // sees `woken` and polls again, or this sees `polling` false and passes the wake
        // on (or both, which only costs a spare poll).
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.outer.wake();
        }
    }
}

impl<F: Future> Repoll<F> {
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            outer: AtomicWaker::new(),
        });
        Repoll {
            inner: Box::pin(inner),
            waker: Waker::from(Arc::clone(&flag)),
            flag,
        }
    }
}

impl<F: Future> Future for Repoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // `Repoll` is `Unpin` (the inner future is boxed).
        let this = self.get_mut();
        this.flag.outer.register(cx.waker());
        for _ in 0..=MAX_REPOLLS {
            this.flag.woken.store(false, SeqCst);
            this.flag.polling.store(true, SeqCst);
            let result = this
                .inner
                .as_mut()
                .poll(&mut Context::from_waker(&this.waker));
            this.flag.polling.store(false, SeqCst);
            if result.is_ready() {
                return result;
            }
            if !this.flag.woken.swap(false, SeqCst) {
                return Poll::Pending;
            }
            // Out of budget: the inner future's resources answer Pending (and wake the
            // task) until it yields to the scheduler.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        // Woken again and again, or out of budget: a real yield.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn counting_waker() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (Arc::clone(&counter), Waker::from(counter))
    }

    #[test]
    fn a_wake_during_the_poll_is_answered_by_polling_again_not_by_the_scheduler() {
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&polls);
        // Wakes itself in its first poll (as hyper's body channel does), is ready in
        // its second.
        let mut future = Repoll::new(std::future::poll_fn(move |cx| {
            if seen.fetch_add(1, SeqCst) == 0 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(7)
            }
        }));
        let (counter, waker) = counting_waker();
        let result = Pin::new(&mut future).poll(&mut Context::from_waker(&waker));
        assert_eq!(result, Poll::Ready(7));
        assert_eq!(polls.load(SeqCst), 2);
        assert_eq!(counter.0.load(SeqCst), 0, "the task's waker was not used");
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task() {
        let stored: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let keep = Arc::clone(&stored);
        let mut future = Repoll::new(std::future::poll_fn(move |cx| {
            *keep.lock().expect("not poisoned") = Some(cx.waker().clone());
            Poll::<()>::Pending
        }));
        let (counter, waker) = counting_waker();
        assert!(Pin::new(&mut future)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert_eq!(counter.0.load(SeqCst), 0);
        // Later, from anywhere (another thread here): the task is woken.
        let later = stored
            .lock()
            .expect("not poisoned")
            .take()
            .expect("the inner future kept its waker");
        std::thread::spawn(move || later.wake())
            .join()
            .expect("the waking thread ran");
        assert_eq!(counter.0.load(SeqCst), 1);
    }

    #[test]
    fn a_future_that_always_wakes_itself_still_yields() {
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&polls);
        let mut future = Repoll::new(std::future::poll_fn(move |cx| {
            seen.fetch_add(1, SeqCst);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        }));
        let (counter, waker) = counting_waker();
        assert!(Pin::new(&mut future)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert_eq!(polls.load(SeqCst), MAX_REPOLLS + 1);
        assert_eq!(counter.0.load(SeqCst), 1, "one real yield to the scheduler");
    }
}
