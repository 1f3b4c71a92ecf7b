//! The one wait loop: try, and until the deadline pause (growing as a [`PollSchedule`] says) and
//! try again. Waits for SSH, for the guest agent, for a VM to run or to be created, for an agent
//! command to exit, and the task-list read-back use it; the task wait (`proxmox::task`) keeps its
//! own loop (it also follows the task's log) and shares the schedule type.

use std::future::Future;
use std::ops::ControlFlow;

use tokio::time::Instant;

pub use crate::proxmox::PollSchedule;

/// Calls `attempt` until it breaks with a value or `deadline` passes. `Continue(last)` is the
/// latest observation: at the deadline it is the `Err`, for the caller's message. There is
/// always a first try, and a last one at the deadline (the pause before it is cut to what is
/// left). A failure that must end the wait at once is a `Break` of the caller's own `Err`.
pub async fn poll_until<T, L, F, Fut>(
    deadline: Instant,
    schedule: PollSchedule,
    mut attempt: F,
) -> Result<T, L>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ControlFlow<T, L>>,
{
    let mut delay = None;
    loop {
        let last = match attempt().await {
            ControlFlow::Break(done) => return Ok(done),
            ControlFlow::Continue(last) => last,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        let d = schedule.next(delay);
        delay = Some(d);
        tokio::time::sleep(d.min(left)).await;
    }
}

/// Pauses of `first`, doubled up to `max`: the cadence of the waits on a guest.
pub const fn doubling(first: std::time::Duration, max: std::time::Duration) -> PollSchedule {
    PollSchedule {
        initial: first,
        factor: 2.0,
        max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // Real time (tokio's paused clock needs its test-util feature): bounds, not exact instants.
    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[tokio::test]
    async fn tries_until_ready_pausing_as_the_schedule_says() {
        let start = Instant::now();
        let mut at = Vec::new();
        let out: Result<usize, ()> = poll_until(
            start + Duration::from_secs(30),
            doubling(Duration::from_millis(20), Duration::from_millis(80)),
            || {
                at.push(start.elapsed());
                let n = at.len();
                async move {
                    if n == 5 {
                        ControlFlow::Break(n)
                    } else {
                        ControlFlow::Continue(())
                    }
                }
            },
        )
        .await;
        assert_eq!(out, Ok(5));
        let gaps: Vec<u128> = at.windows(2).map(|w| ms(w[1] - w[0])).collect();
        for (gap, pause) in gaps.iter().zip([20, 40, 80, 80]) {
            assert!(*gap >= pause, "20, 40, 80, then capped at 80: {gaps:?}");
        }
    }

    #[tokio::test]
    async fn at_the_deadline_a_last_try_and_its_observation_is_the_error() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(1000);
        let mut tries = 0;
        let out: Result<(), Duration> = poll_until(
            deadline,
            doubling(Duration::from_millis(300), Duration::from_secs(5)),
            || {
                tries += 1;
                let t = start.elapsed();
                async move { ControlFlow::Continue(t) }
            },
        )
        .await;
        let last = out.unwrap_err();
        // Tries near 0, 300 and 900 ms; the 1200 ms pause is cut to what is left: one more at
        // the deadline rather than giving up at 900.
        assert!(last >= Duration::from_millis(1000), "{last:?}");
        assert!(
            start.elapsed() < Duration::from_millis(2000),
            "not much later"
        );
        assert!(tries >= 2, "{tries}");
    }

    #[tokio::test]
    async fn a_passed_deadline_still_gets_one_try_and_break_ends_at_once() {
        let mut n = 0;
        let out: Result<(), &str> = poll_until(Instant::now(), PollSchedule::default(), || {
            n += 1;
            async { ControlFlow::Continue("late") }
        })
        .await;
        assert_eq!((out, n), (Err("late"), 1));
        let start = Instant::now();
        let fatal: Result<Result<(), &str>, ()> = poll_until(
            start + Duration::from_secs(30),
            PollSchedule::default(),
            || async { ControlFlow::Break(Err("refused")) },
        )
        .await;
        assert_eq!(fatal, Ok(Err("refused")));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
