//! A budget for routine log lines that come by the thousand under load.
//!
//! A commit and a successful apply each log one info line. At a few per minute that is
//! the audit trail an operator reads; at thousands per second (an orchestrator or a load
//! test driving the API) it would be most of keeld's CPU spent on logging, and journald,
//! which by default keeps 10,000 lines per 30 s of one service, would then drop keeld's
//! warnings and errors along with them. So each kind of routine line gets a budget:
//! [`LINES`] lines per [`WINDOW`] are logged one by one, the rest are counted, and when
//! the window ends one line says how many were left out. Nothing is lost to a reader who
//! needs every one: `GET /events` carries each commit and apply, `GET /history` each
//! commit and `GET /apply/log` the recent applies.
//!
//! Warnings and errors are never budgeted; only call sites of routine successes use this.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Lines of one kind logged one by one per window.
pub const LINES: u32 = 100;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Where the line about left-out lines goes: `(what, how many, over how long)`.
type Summary = fn(&'static str, u64, Duration);

/// One kind of routine line (see the module comment).
pub struct LogBudget {
    /// What the lines are about, plural ("commits"): the summary line names it.
    what: &'static str,
    lines: u32,
    window: Duration,
    summary: Summary,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window started; `None` between windows.
    start: Option<Instant>,
    logged: u32,
    left_out: u64,
    /// A task will close this window when it ends.
    timer: bool,
}

fn log_summary(what: &'static str, left_out: u64, over: Duration) {
    tracing::info!(
        what,
        left_out,
        over = %humantime::format_duration(over),
        "{left_out} more {what} were not logged one by one (at most {LINES} lines per {} \
         each; GET /events has every one)",
        humantime::format_duration(WINDOW)
    );
}

impl LogBudget {
    pub const fn new(what: &'static str) -> LogBudget {
        LogBudget::with(what, LINES, WINDOW, log_summary)
    }

    const fn with(what: &'static str, lines: u32, window: Duration, summary: Summary) -> Self {
        LogBudget {
            what,
            lines,
            window,
            summary,
            state: Mutex::new(Window {
                start: None,
                logged: 0,
                left_out: 0,
                timer: false,
            }),
        }
    }

    /// Whether this occurrence may be logged on its own line. When it may not, it is
    /// counted, and the window's end logs the count.
    pub fn admit(&'static self) -> bool {
        let now = Instant::now();
        let Ok(mut window) = self.state.lock() else {
            // A panic while the lock was held: log rather than lose lines.
            return true;
        };
        if let Some(start) = window.start {
            if now.duration_since(start) >= self.window {
                // Over, and no timer closed it (no runtime to run one).
                self.close(&mut window, now);
            }
        }
        let start = *window.start.get_or_insert(now);
        if window.logged < self.lines {
            window.logged += 1;
            return true;
        }
        window.left_out += 1;
        if !window.timer {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                window.timer = true;
                let end = start + self.window;
                runtime.spawn(async move {
                    tokio::time::sleep_until(end).await;
                    if let Ok(mut window) = self.state.lock() {
                        if window.start == Some(start) {
                            self.close(&mut window, end);
                        }
                    }
                });
            }
        }
        false
    }

    /// Ends the current window at `now`, with its summary line if lines were left out.
    fn close(&self, window: &mut Window, now: Instant) {
        if let Some(start) = window.start {
            if window.left_out > 0 {
                (self.summary)(self.what, window.left_out, now.duration_since(start));
            }
        }
        *window = Window::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SUMMARIES: Mutex<Vec<(&'static str, u64, Duration)>> = Mutex::new(Vec::new());

    fn record(what: &'static str, left_out: u64, over: Duration) {
        SUMMARIES
            .lock()
            .expect("summaries")
            .push((what, left_out, over));
    }

    fn summaries_of(what: &'static str) -> Vec<(u64, Duration)> {
        SUMMARIES
            .lock()
            .expect("summaries")
            .iter()
            .filter(|s| s.0 == what)
            .map(|s| (s.1, s.2))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_logged_up_to_the_budget_then_counted_once_at_the_window_end() {
        static BUDGET: LogBudget = LogBudget::with("bursts", 3, WINDOW, record);
        let admitted: Vec<bool> = (0..10).map(|_| BUDGET.admit()).collect();
        assert_eq!(
            admitted,
            [true, true, true, false, false, false, false, false, false, false]
        );
        assert!(
            summaries_of("bursts").is_empty(),
            "nothing before the window ends"
        );
        tokio::time::sleep(WINDOW).await;
        tokio::task::yield_now().await;
        assert_eq!(summaries_of("bursts"), [(7, WINDOW)]);
        // The next window starts whole, and a quiet one logs no summary.
        assert!((0..3).all(|_| BUDGET.admit()));
        tokio::time::sleep(WINDOW * 3).await;
        assert!(BUDGET.admit());
        assert_eq!(summaries_of("bursts").len(), 1);
    }

    #[test]
    fn without_a_runtime_the_next_line_after_the_window_closes_it() {
        static BUDGET: LogBudget =
            LogBudget::with("no-runtime", 1, Duration::from_millis(20), record);
        assert!(BUDGET.admit());
        assert!(!BUDGET.admit());
        assert!(!BUDGET.admit());
        std::thread::sleep(Duration::from_millis(30));
        assert!(BUDGET.admit());
        let seen = summaries_of("no-runtime");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, 2);
        assert!(seen[0].1 >= Duration::from_millis(20));
    }
}
