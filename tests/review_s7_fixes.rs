//! Review of session 7's fixes (white-box reading, black-box tests through the public API):
//!
//! - 39ea913: a follower that took a departed driver's call over ("adopted" it) and saw it fail
//!   runs the retry with its own kept `make`, or re-parks as a follower while the others elect
//!   the next driver (`Meta::adopted`, `Meta::kept`, `Run::rejoin`);
//! - 16b183c: HTTP copies drop `Transfer-Encoding`; a buffered body with trailers reports an
//!   inexact size; followers' copies drop the hop-by-hop fields, the leader's keep them.
//!
//! (bcf6993, the shared `FlightSpan`, is reviewed in `review_s7_fixes_tracing.rs`: `tracing`'s
//! callsite interest is process-wide.)
//!
//! Deterministic: the `Group` tests poll by hand with a no-op waker (gates are oneshot
//! channels, nothing needs a runtime unless a clock is involved); the layer tests run on a
//! paused clock moved only by `tokio::time::advance`. No sleeps.
//!
//! It found, all fixed since (each test failed before): an adopter given the failure by
//! `complete` after `rejoin` declined, while a follower that joined meanwhile retried; a
//! `gzip` transfer coding dropped from copies; fields named by `Connection` kept in followers'
//! trailers, or all kept when one element of its value was not text; and a false line in the
//! `Stats` doc (an adopter no longer counts under `max_followers`).

mod support;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use support::{
    assert_clean, check_calls_end_once, check_sum, out, pending, poll, ready, Calls as Probe, Res,
    Waiter,
};
use tokio::sync::oneshot;
use tower_coalesce::{Group, GroupBuilder, Panicked, Run, Stats};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The sum rules `Stats` documents.
fn check(s: &Stats, requests: u64) {
    check_sum(s, requests);
    check_calls_end_once(s);
}

/// A leader (gated) and followers, all polled once so that each is parked.
fn flight(group: &Group<u32>, probe: &Probe) -> (oneshot::Sender<Res>, Waiter) {
    let (tx, make) = probe.gated::<Res>();
    let mut leader = group.run_retryable(1, make);
    assert!(leader.is_leader());
    pending(&mut leader, "leader");
    (tx, leader)
}

// =============================================================================================
// 39ea913: an adopted call's failure
// =============================================================================================

/// A follower adopts, leaves, and a second follower adopts: the first one's kept `make` rides
/// in the orphaned call meanwhile; it must be dropped at the second adoption, never called.
/// The second adopter, whose call did not fail, runs the retry with its own `make`.
#[test]
fn nested_adoption_drops_the_first_adopters_make_and_retries_with_the_second() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_retryable(1, a_probe.now::<Res>(Ok(1)));
    let b_probe = Probe::default();
    let (b_tx, b_make) = b_probe.gated::<Res>();
    let mut b = group.run_retryable(1, b_make);
    pending(&mut a, "a");
    pending(&mut b, "b");

    drop(leader);
    pending(&mut a, "a adopts the leader's call");
    assert_eq!(a_probe.unused(), 0, "a's make is kept while it drives");
    drop(a);
    assert_eq!(
        (a_probe.made(), a_probe.unused()),
        (0, 0),
        "a's make rides in the orphaned call until someone adopts it"
    );
    pending(&mut b, "b adopts");
    assert_eq!(
        (a_probe.made(), a_probe.unused()),
        (0, 1),
        "the second adoption drops the first adopter's make, uncalled"
    );

    l_tx.send(Err("first")).unwrap();
    pending(&mut b, "b runs its own retry");
    assert_eq!(b_probe.made(), 1, "b's own make runs the retry");
    b_tx.send(Ok(8)).unwrap();
    assert_eq!(out(ready(&mut b, "b")), Ok(8));
    assert!(!b.is_leader());
    assert_eq!((a_probe.made(), probe.made()), (0, 1));

    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.followers),
        (2, 1, 1, 2),
        "{s:?}"
    );
    check(&s, 3);
    assert_clean(&group);
}

/// The same, but the second adopter keeps no `make` (`run_result`): the first adopter's `make`
/// must not be used for it. Nobody left can retry, so the failure goes to that adopter.
#[test]
fn nested_adoption_by_a_follower_without_make_never_uses_the_first_adopters_make() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(3).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_retryable(1, a_probe.now::<Res>(Ok(1)));
    let b_probe = Probe::default();
    let mut b = group.run_result(1, b_probe.now::<Res>(Ok(2)));
    pending(&mut a, "a");
    pending(&mut b, "b");

    drop(leader);
    pending(&mut a, "a adopts");
    drop(a);
    pending(&mut b, "b adopts");
    assert_eq!(a_probe.unused(), 1, "a's make dropped at b's adoption");

    l_tx.send(Err("first")).unwrap();
    assert_eq!(out(ready(&mut b, "b")), Err("first"));
    assert_eq!(
        (a_probe.made(), b_probe.made(), b_probe.unused()),
        (0, 0, 1),
        "no make of a departed caller is ever called"
    );
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (1, 0, 1), "{s:?}");
    check(&s, 3);
    assert_clean(&group);
}

/// An adopter with no `make` of its own re-parks as a follower and gets the retry run by a
/// follower that has one: one output for both, the first failure for nobody.
#[test]
fn adopter_without_make_waits_for_a_makers_retry_and_shares_it() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_result(1, a_probe.now::<Res>(Ok(1)));
    let f_probe = Probe::default();
    let (f_tx, f_make) = f_probe.gated::<Res>();
    let mut f = group.run_retryable(1, f_make);
    pending(&mut a, "a");
    pending(&mut f, "f");

    drop(leader);
    pending(&mut a, "a adopts");
    l_tx.send(Err("first")).unwrap();
    pending(&mut a, "a re-parks");
    assert_eq!(f_probe.made(), 0, "f is not elected before it is polled");
    pending(&mut f, "f is elected and runs its retry");
    assert_eq!(f_probe.made(), 1);
    pending(&mut a, "a waits for f's retry");
    f_tx.send(Ok(9)).unwrap();
    assert_eq!(out(ready(&mut f, "f")), Ok(9));
    assert_eq!(out(ready(&mut a, "a")), Ok(9));
    assert!(a.is_shared() && !a.is_leader());

    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.followers),
        (2, 1, 1, 2),
        "{s:?}"
    );
    check(&s, 3);
    assert_clean(&group);
}

/// The adopter's own retry is made lazily: only when the adopted call fails, and its `make`
/// is dropped uncalled (after the output is out) when the adopted call succeeds.
#[test]
fn an_adopters_kept_make_is_only_called_on_failure_and_dropped_otherwise() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_retryable(1, a_probe.now::<Res>(Ok(1)));
    pending(&mut a, "a");
    drop(leader);
    pending(&mut a, "a adopts");
    l_tx.send(Ok(5)).unwrap();
    assert_eq!(out(ready(&mut a, "a")), Ok(5));
    assert_eq!(
        (a_probe.made(), a_probe.unused()),
        (0, 1),
        "never called, dropped by the time its waiter has the output"
    );
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (1, 0, 0), "{s:?}");
    check(&s, 2);
    assert_clean(&group);
}

/// Without `retry_failed` an adopter gets the failure as before; its kept `make` is dropped.
#[test]
fn without_retries_an_adopter_gets_the_failure_and_its_make_is_dropped() {
    let group: Group<u32> = GroupBuilder::new().build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_retryable(1, a_probe.now::<Res>(Ok(1)));
    let mut f = group.run_retryable(1, Probe::default().now::<Res>(Ok(2)));
    pending(&mut a, "a");
    pending(&mut f, "f");
    drop(leader);
    pending(&mut a, "a adopts");
    l_tx.send(Err("first")).unwrap();
    assert_eq!(out(ready(&mut a, "a")), Err("first"));
    assert_eq!(out(ready(&mut f, "f")), Err("first"));
    assert_eq!((a_probe.made(), a_probe.unused()), (0, 1));
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (1, 0, 1), "{s:?}");
    check(&s, 3);
    assert_clean(&group);
}

/// `retry_failed(1)`: the adopter's retry `make` panics. The panic is its own call's failure;
/// with no retry left, it is everybody's (the other follower too), counted once.
#[test]
fn an_adopters_retry_make_panics_with_no_retry_left_everybody_gets_the_panic() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_retryable(1, a_probe.panics::<Res>("adopter's make"));
    let f_probe = Probe::default();
    let mut f = group.run_retryable(1, f_probe.now::<Res>(Ok(2)));
    pending(&mut a, "a");
    pending(&mut f, "f");
    drop(leader);
    pending(&mut a, "a adopts");
    l_tx.send(Err("first")).unwrap();
    let a_out = ready(&mut a, "a").expect_err("a's own make panicked");
    assert_eq!(a_out.message(), "adopter's make");
    let f_out = ready(&mut f, "f").expect_err("no retry left: the panic is shared");
    assert_eq!(f_out.message(), "adopter's make");
    assert_eq!((a_probe.made(), f_probe.made()), (1, 0));
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.panics),
        (2, 1, 1, 1),
        "{s:?}"
    );
    check(&s, 3);
    assert_clean(&group);
}

/// `retry_failed(2)`: the adopter's retry `make` panics; the adopter gets its own panic and
/// the other follower retries once more, for itself.
#[test]
fn an_adopters_retry_make_panics_and_the_other_follower_retries_again() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(2).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let mut a = group.run_retryable(1, a_probe.panics::<Res>("adopter's make"));
    let f_probe = Probe::default();
    let (f_tx, f_make) = f_probe.gated::<Res>();
    let mut f = group.run_retryable(1, f_make);
    pending(&mut a, "a");
    pending(&mut f, "f");
    drop(leader);
    pending(&mut a, "a adopts");
    l_tx.send(Err("first")).unwrap();
    let a_out = ready(&mut a, "a").expect_err("a's own make panicked");
    assert_eq!(a_out.message(), "adopter's make");
    pending(&mut f, "f runs the next retry");
    f_tx.send(Ok(6)).unwrap();
    assert_eq!(out(ready(&mut f, "f")), Ok(6));
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.panics),
        (3, 2, 1, 1),
        "{s:?}"
    );
    check(&s, 3);
    assert_clean(&group);
}

/// A retry's driver leaves; a follower adopts the retry, which fails with no retry left: the
/// adopter gets that failure (nobody can retry), and its own `make` is never called.
#[test]
fn an_adopted_retry_that_fails_with_retries_exhausted_is_everybodys() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, mut leader) = flight(&group, &probe);
    let f1_probe = Probe::default();
    let (f1_tx, f1_make) = f1_probe.gated::<Res>();
    let mut f1 = group.run_retryable(1, f1_make);
    let f2_probe = Probe::default();
    let mut f2 = group.run_retryable(1, f2_probe.now::<Res>(Ok(2)));
    pending(&mut f1, "f1");
    pending(&mut f2, "f2");

    l_tx.send(Err("first")).unwrap();
    assert_eq!(out(ready(&mut leader, "leader")), Err("first"));
    pending(&mut f1, "f1 elected: runs the retry");
    assert_eq!(f1_probe.made(), 1);
    drop(f1);
    pending(&mut f2, "f2 adopts the retry");
    f1_tx.send(Err("second")).unwrap();
    assert_eq!(out(ready(&mut f2, "f2")), Err("second"));
    assert_eq!(
        (f2_probe.made(), f2_probe.unused()),
        (0, 1),
        "no retry left: f2's make is dropped, uncalled"
    );
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (2, 1, 2), "{s:?}");
    check(&s, 3);
    assert_clean(&group);
}

/// The adopter runs its retry and leaves at once: its retry is orphaned and adopted again by
/// the other follower, whose own `make` is kept aside; the retry succeeds for it.
#[test]
fn an_adopter_that_leaves_right_after_starting_its_retry_hands_the_retry_on() {
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let a_probe = Probe::default();
    let (a_tx, a_make) = a_probe.gated::<Res>();
    let mut a = group.run_retryable(1, a_make);
    let f_probe = Probe::default();
    let mut f = group.run_retryable(1, f_probe.now::<Res>(Ok(2)));
    pending(&mut a, "a");
    pending(&mut f, "f");
    drop(leader);
    pending(&mut a, "a adopts");
    l_tx.send(Err("first")).unwrap();
    pending(&mut a, "a runs its retry");
    assert_eq!(a_probe.made(), 1);
    drop(a);
    pending(&mut f, "f adopts a's retry");
    a_tx.send(Ok(3)).unwrap();
    assert_eq!(out(ready(&mut f, "f")), Ok(3));
    assert_eq!((f_probe.made(), f_probe.unused()), (0, 1));
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.errors, s.cancelled),
        (2, 1, 1, 0),
        "{s:?}"
    );
    check(&s, 3);
    assert_clean(&group);
}

/// An adopted retry that succeeds lingers; one that fails for good lingers as an error under
/// `linger_errors`: a later caller gets the adopter's output, with no new call.
#[tokio::test(start_paused = true)]
async fn an_adopted_retrys_output_lingers() {
    for fail in [false, true] {
        let group: Group<u32> = GroupBuilder::new()
            .retry_failed(1)
            .linger(Duration::from_secs(10))
            .linger_errors(Duration::from_secs(10))
            .build();
        let probe = Probe::default();
        let (l_tx, leader) = flight(&group, &probe);
        let a_probe = Probe::default();
        let (a_tx, a_make) = a_probe.gated::<Res>();
        let mut a = group.run_retryable(1, a_make);
        pending(&mut a, "a");
        drop(leader);
        pending(&mut a, "a adopts");
        l_tx.send(Err("first")).unwrap();
        pending(&mut a, "a runs its retry");
        let expected = if fail { Err("second") } else { Ok(4) };
        a_tx.send(expected).unwrap();
        assert_eq!(out(ready(&mut a, "a")), expected);
        tokio::time::advance(Duration::from_secs(1)).await;
        let late_probe = Probe::default();
        let mut late = group.run_retryable(1, late_probe.now::<Res>(Ok(99)));
        assert_eq!(out(ready(&mut late, "late")), expected, "fail = {fail}");
        assert_eq!(late_probe.made(), 0);
        let s = group.stats();
        assert_eq!((s.leaders, s.retried, s.lingered), (2, 1, 1), "{s:?}");
        check(&s, 3);
        tokio::time::advance(Duration::from_secs(10)).await;
        group.purge_expired();
        assert_clean(&group);
    }
}

// --- races through user code that runs unlocked: the failed output's `Clone` ----------------

thread_local! {
    /// Run, one per clone, by `Hooked::clone`.
    static ON_CLONE: RefCell<VecDeque<Box<dyn FnOnce()>>> = RefCell::new(VecDeque::new());
}

/// An error whose `Clone` (user code the registry runs with no lock held) runs the next hook.
#[derive(Debug, PartialEq, Eq)]
struct Hooked(&'static str);

impl Clone for Hooked {
    fn clone(&self) -> Self {
        let hook = ON_CLONE.with(|hooks| hooks.borrow_mut().pop_front());
        if let Some(hook) = hook {
            hook();
        }
        Hooked(self.0)
    }
}

type HRes = Result<u32, Hooked>;

fn on_clone(hook: impl FnOnce() + 'static) {
    ON_CLONE.with(|hooks| hooks.borrow_mut().push_back(Box::new(hook)));
}

fn clear_hooks() {
    ON_CLONE.with(|hooks| hooks.borrow_mut().clear());
}

fn hooked_flight(group: &Group<u32>) -> (oneshot::Sender<HRes>, Run<u32, HRes>) {
    let (tx, make) = Probe::default().gated::<HRes>();
    let mut leader = group.run_retryable(1, make);
    pending(&mut leader, "leader");
    (tx, leader)
}

/// The only follower that could retry leaves while the adopter hands the failure on (in the
/// failure's `Clone`): nobody can retry, so everybody left gets the failure, once.
#[test]
fn the_last_maker_leaving_during_the_adopters_hand_on_gives_everybody_the_failure() {
    clear_hooks();
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let (l_tx, leader) = hooked_flight(&group);
    let mut a = group.run_result(1, Probe::default().now::<HRes>(Ok(1)));
    let f = Rc::new(RefCell::new(Some(
        group.run_retryable(1, Probe::default().now::<HRes>(Ok(2))),
    )));
    let mut c = group.run_result(1, Probe::default().now::<HRes>(Ok(3)));
    pending(&mut a, "a");
    pending(f.borrow_mut().as_mut().unwrap(), "f");
    pending(&mut c, "c");
    drop(leader);
    pending(&mut a, "a adopts");
    let gone = f.clone();
    on_clone(move || drop(gone.borrow_mut().take()));
    l_tx.send(Err(Hooked("first"))).unwrap();
    let a_out = ready(&mut a, "a");
    assert!(f.borrow().is_none(), "the hook ran");
    clear_hooks();
    assert_eq!(a_out.unwrap(), Err(Hooked("first")));
    assert_eq!(ready(&mut c, "c").unwrap(), Err(Hooked("first")));
    let s = group.stats();
    assert_eq!((s.leaders, s.retried, s.errors), (1, 0, 1), "{s:?}");
    check(&s, 4);
    assert_clean(&group);
}

/// The adopter (no `make`) hands the failure on: while it copies it (the failure's `Clone`,
/// unlocked), the only follower that could retry leaves, and then another one that can
/// joins. The hand-on finds nobody, falls back to `complete`, which finds the newcomer and
/// hands the failure to it to retry -- but gives the adopter the failure as its own, as if its
/// call had failed. The adopter and the newcomer end with different outputs of one flight,
/// which is what 39ea913 set out to prevent ("two results with others").
#[test]
fn a_maker_joining_while_the_adopter_falls_back_to_complete_shares_one_output() {
    clear_hooks();
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let (l_tx, leader) = hooked_flight(&group);
    let mut a = group.run_result(1, Probe::default().now::<HRes>(Ok(1)));
    let f = Rc::new(RefCell::new(Some(
        group.run_retryable(1, Probe::default().now::<HRes>(Ok(2))),
    )));
    pending(&mut a, "a");
    pending(f.borrow_mut().as_mut().unwrap(), "f");
    drop(leader);
    pending(&mut a, "a adopts");

    // 1st copy (rejoin's hand-on): the only maker leaves. 2nd copy (complete's): one joins.
    let (gone, gone_check) = (f.clone(), f);
    on_clone(move || drop(gone.borrow_mut().take()));
    let newcomer: Rc<RefCell<Option<Run<u32, HRes>>>> = Rc::default();
    let (g_tx, g_make) = Probe::default().gated::<HRes>();
    let (slot, g) = (newcomer.clone(), group.clone());
    on_clone(move || *slot.borrow_mut() = Some(g.run_retryable(1, g_make)));
    l_tx.send(Err(Hooked("first"))).unwrap();
    let a_first = poll(&mut a);
    clear_hooks();
    assert!(gone_check.borrow().is_none(), "the maker left");
    let joined = newcomer.borrow_mut().take();
    one_output(&group, &mut a, a_first, joined, g_tx);
}

/// Ends the two "maker joins while the adopter hands the failure on" races: if the newcomer
/// joined (it does today, from the second copy of the failure), it and the adopter must end
/// with the same output; if it did not (a fix may copy less), the adopter gets the failure.
fn one_output(
    group: &Group<u32>,
    a: &mut Run<u32, HRes>,
    a_first: Poll<Result<HRes, Panicked>>,
    joined: Option<Run<u32, HRes>>,
    g_tx: oneshot::Sender<HRes>,
) {
    let g_out = joined.map(|mut g| {
        assert!(!g.is_leader(), "the newcomer is a follower of the flight");
        let _ = poll(&mut g);
        let _ = g_tx.send(Ok(9));
        ready(&mut g, "g").unwrap()
    });
    let a_out = match a_first {
        Poll::Ready(out) => out.unwrap(),
        Poll::Pending => ready(a, "a").unwrap(),
    };
    match g_out {
        Some(g_out) => assert_eq!(
            a_out, g_out,
            "one flight, one output: the adopter did not make the failed call"
        ),
        None => assert_eq!(a_out, Err(Hooked("first"))),
    }
    assert_clean(group);
}

/// The same root cause without a maker leaving: the adopter (no `make`) sees the failure when
/// nobody can retry, so `rejoin` declines; `complete` copies the failure, and a follower that
/// can retry joins meanwhile. The newcomer retries; the adopter is given the first failure.
#[test]
fn a_maker_joining_while_rejoin_declined_shares_the_retry_with_the_adopter() {
    clear_hooks();
    let group: Group<u32> = GroupBuilder::new().retry_failed(1).build();
    let (l_tx, leader) = hooked_flight(&group);
    let mut a = group.run_result(1, Probe::default().now::<HRes>(Ok(1)));
    pending(&mut a, "a");
    drop(leader);
    pending(&mut a, "a adopts");

    let newcomer: Rc<RefCell<Option<Run<u32, HRes>>>> = Rc::default();
    let (g_tx, g_make) = Probe::default().gated::<HRes>();
    let (slot, g) = (newcomer.clone(), group.clone());
    on_clone(move || *slot.borrow_mut() = Some(g.run_retryable(1, g_make)));
    l_tx.send(Err(Hooked("first"))).unwrap();
    let a_first = poll(&mut a);
    clear_hooks();
    let joined = newcomer.borrow_mut().take();
    one_output(&group, &mut a, a_first, joined, g_tx);
}

// --- max_followers and the adopter -----------------------------------------------------------

/// A follower that takes a call over no longer holds a follower's place (its slot is removed
/// when it adopts; `Stats`' doc says so): with `max_followers(1)` a newcomer joins beside it.
#[test]
fn an_adopter_no_longer_counts_under_max_followers_as_documented() {
    let group: Group<u32> = GroupBuilder::new().max_followers(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let mut f = group.run_retryable(1, Probe::default().now::<Res>(Ok(1)));
    pending(&mut f, "f");
    drop(leader);
    pending(&mut f, "f adopts");
    let n = group.run_retryable(1, Probe::default().now::<Res>(Ok(2)));
    let alone = n.is_alone();
    drop(n);
    l_tx.send(Ok(0)).unwrap();
    assert_eq!(out(ready(&mut f, "f")), Ok(0));
    assert!(
        !alone,
        "the adopter drives the call: the newcomer is its follower"
    );
}

/// What the layer does today, pinned: an adopter that re-parks after a failure takes a
/// follower's place again, beside the followers who joined while it drove; the flight then
/// holds more followers than `max_followers` for a while, but nobody new joins over it and
/// every count adds up.
#[test]
fn an_adopter_reparking_under_max_followers_keeps_the_counts_consistent() {
    let group: Group<u32> = GroupBuilder::new().max_followers(2).retry_failed(1).build();
    let probe = Probe::default();
    let (l_tx, leader) = flight(&group, &probe);
    let mut a = group.run_result(1, Probe::default().now::<Res>(Ok(1)));
    let f_probe = Probe::default();
    let (f_tx, f_make) = f_probe.gated::<Res>();
    let mut f = group.run_retryable(1, f_make);
    pending(&mut a, "a");
    pending(&mut f, "f");
    drop(leader);
    pending(&mut a, "a adopts");
    // a no longer holds a slot: one place is free.
    let mut n = group.run_retryable(1, Probe::default().now::<Res>(Ok(3)));
    assert!(!n.is_alone(), "a's place is free while it drives");
    pending(&mut n, "n");
    l_tx.send(Err("first")).unwrap();
    pending(&mut a, "a re-parks");
    let mut x = group.run_retryable(1, Probe::default().now::<Res>(Ok(4)));
    assert!(x.is_alone(), "three followers wait: no room");
    assert_eq!(out(ready(&mut x, "x")), Ok(4));
    pending(&mut f, "f elected");
    pending(&mut n, "n waits");
    f_tx.send(Ok(5)).unwrap();
    for (w, name) in [(&mut f, "f"), (&mut n, "n"), (&mut a, "a")] {
        assert_eq!(out(ready(w, name)), Ok(5), "{name}");
    }
    let s = group.stats();
    assert_eq!(
        (s.leaders, s.retried, s.followers, s.over_capacity),
        (2, 1, 3, 1),
        "{s:?}"
    );
    check(&s, 5);
    assert_clean(&group);
}

// --- the tower layer --------------------------------------------------------------------------

mod layer {
    use super::*;
    use support::Boom;
    use tower::Service;
    use tower_coalesce::{CoalesceError, CoalesceLayer, OnTimeout};
    use tower_layer::Layer;
    use tower_test::mock;

    type Req = (u32, u32);

    fn key(r: &Req) -> Option<u32> {
        Some(r.0)
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    fn boom(r: Result<&'static str, CoalesceError>) -> Boom {
        r.expect_err("an error")
            .downcast_ref::<Boom>()
            .expect("the inner error")
            .clone()
    }

    /// `retry_failed(1)` + `follower_timeout(Error)`: the leader leaves, a follower adopts its
    /// call (its wait limit no longer applies), the call fails, and the adopter makes its own
    /// call as the retry (a backend call with its own request). It is not cut at its old
    /// limit; another follower is, and the adopter gets its own call's response.
    #[tokio::test(start_paused = true)]
    async fn an_adopter_runs_its_retry_past_its_old_limit_and_another_follower_times_out() {
        let (mock, mut handle) = mock::pair::<Req, &'static str>();
        let mut svc = CoalesceLayer::new(key as fn(&Req) -> Option<u32>)
            .retry_failed(1)
            .follower_timeout(Duration::from_millis(100))
            .on_follower_timeout(OnTimeout::Error)
            .layer(mock);
        let mut leader = Box::pin(svc.call((1, 0)));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let (r, reply) = handle.next_request().await.expect("leader's call");
        assert_eq!(r, (1, 0));
        let mut a = Box::pin(svc.call((1, 1)));
        let mut g = Box::pin(svc.call((1, 2)));
        assert!(a.is_follower() && g.is_follower());
        assert!(futures::poll!(a.as_mut()).is_pending());
        assert!(futures::poll!(g.as_mut()).is_pending());
        drop(leader);
        assert!(futures::poll!(a.as_mut()).is_pending(), "a adopts");

        tokio::time::advance(Duration::from_millis(50)).await;
        reply.send_error(Boom("first"));
        assert!(
            futures::poll!(a.as_mut()).is_pending(),
            "a starts its retry"
        );
        assert!(futures::poll!(a.as_mut()).is_pending());
        let (r, retry) = handle.next_request().await.expect("the retry");
        assert_eq!(r, (1, 1), "the adopter's own request");

        tokio::time::advance(Duration::from_millis(100)).await;
        settle().await;
        let g_out = futures::poll!(g.as_mut());
        match g_out {
            Poll::Ready(Err(e)) => assert!(e.is_timeout(), "{e:?}"),
            other => panic!("g should time out at its limit: {other:?}"),
        }
        assert!(
            futures::poll!(a.as_mut()).is_pending(),
            "the adopter drives its retry: no limit"
        );
        retry.send_response("retried");
        assert_eq!(a.as_mut().await.expect("the retry's response"), "retried");
        assert!(!a.is_leader() && a.is_follower() && a.is_shared());
        let s = svc.stats();
        assert_eq!(
            (s.leaders, s.retried, s.errors, s.followers, s.timed_out),
            (2, 1, 1, 2, 1),
            "{s:?}"
        );
        check(&s, 3);
        assert_clean(svc.group());
    }

    /// The adopter's own retry fails too, with retries left (`retry_failed(2)`): that failure
    /// is its own (its request made it), and the other follower retries once more.
    #[tokio::test(start_paused = true)]
    async fn an_adopters_failed_retry_is_its_own_and_the_other_follower_retries() {
        let (mock, mut handle) = mock::pair::<Req, &'static str>();
        let mut svc = CoalesceLayer::new(key as fn(&Req) -> Option<u32>)
            .retry_failed(2)
            .layer(mock);
        let mut leader = Box::pin(svc.call((1, 0)));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let (_, reply) = handle.next_request().await.unwrap();
        let mut a = Box::pin(svc.call((1, 1)));
        let mut g = Box::pin(svc.call((1, 2)));
        assert!(futures::poll!(a.as_mut()).is_pending());
        assert!(futures::poll!(g.as_mut()).is_pending());
        drop(leader);
        assert!(futures::poll!(a.as_mut()).is_pending());
        reply.send_error(Boom("first"));
        assert!(futures::poll!(a.as_mut()).is_pending());
        assert!(futures::poll!(a.as_mut()).is_pending());
        let (r, retry) = handle.next_request().await.unwrap();
        assert_eq!(r, (1, 1));
        retry.send_error(Boom("second"));
        let a_out = a.as_mut().await;
        assert_eq!(boom(a_out), Boom("second"), "its own call's failure");
        assert!(futures::poll!(g.as_mut()).is_pending(), "g retries");
        let (r, last) = handle.next_request().await.unwrap();
        assert_eq!(r, (1, 2));
        last.send_response("third");
        assert_eq!(g.as_mut().await.unwrap(), "third");
        let s = svc.stats();
        assert_eq!((s.leaders, s.retried, s.errors), (3, 2, 2), "{s:?}");
        check(&s, 3);
        assert_clean(svc.group());
    }
}

// =============================================================================================
// 16b183c: HTTP copies
// =============================================================================================

#[cfg(feature = "http")]
mod http_copies {
    use super::*;
    use bytes::Bytes;
    use http::header::{self, HeaderMap};
    use http::{Method, Response};
    use http_body::Body;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use support::adapter::{map_bytes as map, request, streamed, Req, B};
    use tower::{service_fn, Layer, Service};
    use tower_coalesce::http::{CoalesceBody, CoalesceHttpLayer, ServedBy};

    struct Read {
        by: ServedBy,
        headers: HeaderMap,
        exact: Option<u64>,
        lower: u64,
        data: Bytes,
        trailers: Option<HeaderMap>,
    }

    async fn read(res: Response<CoalesceBody<B>>) -> Read {
        let by = *res.extensions().get::<ServedBy>().expect("ServedBy");
        let (parts, body) = res.into_parts();
        let hint = body.size_hint();
        let collected = body.collect().await.unwrap();
        Read {
            by,
            headers: parts.headers,
            exact: hint.exact(),
            lower: hint.lower(),
            trailers: collected.trailers().cloned(),
            data: collected.to_bytes(),
        }
    }

    /// A leader and `followers` followers of one call answered with `headers`, `data` and
    /// `trailers`; the leader's read first. The inner service is called once.
    async fn shared(
        method: Method,
        headers: HeaderMap,
        data: &'static [u8],
        trailers: Option<HeaderMap>,
        followers: usize,
    ) -> Vec<Read> {
        let (reads, calls) = burst(method, headers, data, trailers, followers).await;
        assert_eq!(calls, 1, "one call for everybody");
        assert_eq!(reads[0].by, ServedBy::Leader);
        for r in &reads[1..] {
            assert_eq!(r.by, ServedBy::Follower);
        }
        reads
    }

    /// A leader and `followers` followers, every call of the inner service answered with
    /// `headers`, `data` and `trailers`: their reads, the leader's first, and the calls made.
    async fn burst(
        method: Method,
        headers: HeaderMap,
        data: &'static [u8],
        trailers: Option<HeaderMap>,
        followers: usize,
    ) -> (Vec<Read>, usize) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = service_fn(move |_req: Req| {
            counted.fetch_add(1, SeqCst);
            let mut res = Response::new(streamed(&[data], trailers.clone()));
            *res.headers_mut() = headers.clone();
            async move { Ok::<_, Infallible>(res) }
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let mut futs = Vec::new();
        for _ in 0..=followers {
            futs.push(svc.call(request(method.clone(), &[])));
        }
        let mut reads = Vec::new();
        for res in futures::future::join_all(futs).await {
            reads.push(read(res.unwrap()).await);
        }
        (reads, calls.load(SeqCst))
    }

    /// `Transfer-Encoding: gzip, chunked`: the body the handler hands over is gzip-coded
    /// (a proxy's hyper client undoes only `chunked`). The copies once dropped the whole
    /// field, so every waiter got gzip bytes labelled as nothing. Such a response is not
    /// shared now: the leader gets it untouched, the follower is released to its own call.
    #[tokio::test]
    async fn a_gzip_transfer_coding_is_not_lost_from_the_copies() {
        let (reads, calls) = burst(
            Method::GET,
            map(&[("transfer-encoding", b"gzip, chunked")]),
            b"\x1f\x8b-gzip-bytes",
            None,
            1,
        )
        .await;
        assert_eq!(calls, 2, "not shared");
        assert_eq!(
            (reads[0].by, reads[1].by),
            (ServedBy::Leader, ServedBy::Released)
        );
        for r in &reads {
            let te = r
                .headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .map(|v| v.to_str().unwrap().to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(",");
            assert!(
                te.contains("gzip"),
                "{:?}: the body is gzip-coded but nothing says so (transfer-encoding {te:?})",
                r.by
            );
        }
    }

    /// `Transfer-Encoding: chunked` alone is framing only: dropped from every copy, the
    /// leader's too (shared or not), and the size is exact without trailers.
    #[tokio::test]
    async fn chunked_framing_is_dropped_from_every_copy_and_the_size_is_exact() {
        for followers in [0, 2] {
            let reads = shared(
                Method::GET,
                map(&[("transfer-encoding", b"chunked"), ("x-a", b"1")]),
                b"hello",
                None,
                followers,
            )
            .await;
            for r in &reads {
                assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
                assert_eq!(r.headers["x-a"], "1");
                assert_eq!((r.exact, r.data.as_ref()), (Some(5), &b"hello"[..]));
            }
        }
    }

    /// RFC 9110 §7.6.1: an intermediary removes "any header or trailer field(s)" named by
    /// `Connection`. Followers' copies drop such header fields but keep a trailer field of
    /// that name: the leader's connection-specific trailer reaches every follower.
    #[tokio::test]
    async fn a_field_named_by_connection_is_dropped_from_followers_trailers_too() {
        let reads = shared(
            Method::GET,
            map(&[("connection", b"x-hop"), ("trailer", b"x-hop, x-end")]),
            b"data",
            Some(map(&[("x-hop", b"1"), ("x-end", b"2")])),
            1,
        )
        .await;
        let leader = reads[0].trailers.as_ref().expect("leader's trailers");
        assert_eq!(leader["x-hop"], "1", "the leader's copy is untouched");
        let follower = reads[1].trailers.as_ref().expect("follower's trailers");
        assert_eq!(follower["x-end"], "2");
        assert!(
            !follower.contains_key("x-hop"),
            "a field the leader's Connection named reached a follower in the trailers"
        );
    }

    /// A `Connection` value with one non-ASCII (obs-text) element still names `x-hop` as a
    /// token; `to_str` fails for the whole value, so none of its names is removed and `x-hop`
    /// reaches the followers.
    #[tokio::test]
    async fn a_connection_value_with_one_bad_element_still_names_its_other_fields() {
        let reads = shared(
            Method::GET,
            map(&[("connection", b"x-hop, caf\xe9"), ("x-hop", b"1")]),
            b"data",
            None,
            1,
        )
        .await;
        assert!(!reads[1].headers.contains_key("connection"));
        assert!(
            !reads[1].headers.contains_key("x-hop"),
            "x-hop is named by the leader's Connection"
        );
    }

    /// `Connection` naming end-to-end fields (`Content-Type`, `Content-Length`, `Trailer`),
    /// in several field lines and mixed case, and with empty and invalid elements: the
    /// follower's copy drops exactly the named fields and the fixed hop-by-hop set; status,
    /// body, trailers and every other header match the leader's, which keeps everything.
    #[tokio::test]
    async fn connection_naming_end_to_end_fields_changes_only_the_followers_headers() {
        let headers = map(&[
            ("connection", b"Content-Type, , bad name"),
            ("connection", b"TRAILER,content-length"),
            ("content-type", b"text/plain"),
            ("content-length", b"4"),
            ("trailer", b"x-end"),
            ("keep-alive", b"timeout=5"),
            ("proxy-connection", b"keep-alive"),
            ("upgrade", b"h2c"),
            ("te", b"trailers"),
            ("x-kept", b"1"),
        ]);
        let trailers = Some(map(&[("x-end", b"2")]));
        let reads = shared(Method::GET, headers.clone(), b"data", trailers, 2).await;
        let leader = &reads[0];
        assert_eq!(
            leader.headers, headers,
            "the leader's copy keeps every field"
        );
        for f in &reads[1..] {
            for gone in [
                "connection",
                "content-type",
                "content-length",
                "trailer",
                "keep-alive",
                "proxy-connection",
                "upgrade",
                "te",
            ] {
                assert!(!f.headers.contains_key(gone), "{gone}");
            }
            assert_eq!(f.headers.len(), 1, "{:?}", f.headers);
            assert_eq!(f.headers["x-kept"], "1");
            assert_eq!(f.data, leader.data);
            assert_eq!(f.trailers, leader.trailers);
        }
    }

    /// Trailers make every copy's size inexact (lower bound = the data's length), for the
    /// leader (shared, or alone) and the followers; a HEAD copy too. Without trailers, exact.
    #[tokio::test]
    async fn trailers_make_every_copys_size_inexact_and_only_trailers_do() {
        for method in [Method::GET, Method::HEAD] {
            for followers in [0, 1] {
                let with = shared(
                    method.clone(),
                    HeaderMap::new(),
                    b"abc",
                    Some(map(&[("x-t", b"1")])),
                    followers,
                )
                .await;
                for r in &with {
                    assert_eq!((r.exact, r.lower), (None, 3), "{method} {:?}", r.by);
                    assert_eq!(r.trailers.as_ref().unwrap()["x-t"], "1");
                }
                let without =
                    shared(method.clone(), HeaderMap::new(), b"abc", None, followers).await;
                for r in &without {
                    assert_eq!(r.exact, Some(3), "{method} {:?}", r.by);
                }
            }
        }
    }

    /// `max_body_bytes` is judged by the body's size hint first (`lower() > limit`): a body
    /// with trailers exactly at the limit is still shared, and an outer coalescing layer over
    /// an inner one (whose copies now report an inexact size) still buffers and shares it.
    #[tokio::test]
    async fn an_inexact_size_with_trailers_is_still_within_the_limit_when_stacked() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = service_fn(move |_req: Req| {
            counted.fetch_add(1, SeqCst);
            let res = Response::new(streamed(&[b"12345678"], Some(map(&[("x-t", b"1")]))));
            async move { Ok::<_, Infallible>(res) }
        });
        let inner = CoalesceHttpLayer::new().max_body_bytes(8).layer(inner);
        let mut svc = CoalesceHttpLayer::new().max_body_bytes(8).layer(inner);
        let futs = vec![
            svc.call(request(Method::GET, &[])),
            svc.call(request(Method::GET, &[])),
        ];
        let outs = futures::future::join_all(futs).await;
        let mut by = Vec::new();
        for res in outs {
            let res = res.unwrap();
            by.push(*res.extensions().get::<ServedBy>().unwrap());
            let (_, b) = res.into_parts();
            let c = b.collect().await.unwrap();
            assert_eq!(c.trailers().unwrap()["x-t"], "1");
            assert_eq!(c.to_bytes().as_ref(), b"12345678");
        }
        assert_eq!(by, [ServedBy::Leader, ServedBy::Follower]);
        assert_eq!(calls.load(SeqCst), 1);
    }

    /// The leader leaves before the response: the follower that takes its call over is still
    /// a follower, and gets a follower's copy (no hop-by-hop fields of a departed leader).
    #[tokio::test(start_paused = true)]
    async fn a_follower_that_adopts_the_call_gets_a_followers_copy() {
        let (open, gate) = tokio::sync::watch::channel(false);
        let inner = service_fn(move |_req: Req| {
            let mut gate = gate.clone();
            async move {
                gate.wait_for(|o| *o).await.unwrap();
                let mut res = Response::new(streamed(&[b"v"], None));
                *res.headers_mut() = map(&[("connection", b"close, x-hop"), ("x-hop", b"1")]);
                Ok::<_, Infallible>(res)
            }
        });
        let mut svc = CoalesceHttpLayer::new().layer(inner);
        let mut leader = Box::pin(svc.call(request(Method::GET, &[])));
        let mut follower = Box::pin(svc.call(request(Method::GET, &[])));
        assert_eq!(follower.served_by(), ServedBy::Follower);
        assert!(futures::poll!(leader.as_mut()).is_pending());
        assert!(futures::poll!(follower.as_mut()).is_pending());
        drop(leader);
        assert!(futures::poll!(follower.as_mut()).is_pending(), "adopts");
        open.send_replace(true);
        let r = read(follower.await.unwrap()).await;
        assert_eq!(r.by, ServedBy::Follower);
        assert!(!r.headers.contains_key("connection"));
        assert!(!r.headers.contains_key("x-hop"));
        assert_eq!(r.data.as_ref(), b"v");
    }
}

// =============================================================================================
// The gRPC adapter's copies
// =============================================================================================

#[cfg(feature = "grpc")]
mod grpc_copies {
    use super::support;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Body;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use support::adapter::{grpc_body, grpc_request, map, GRPC_PATH};
    use tower::{service_fn, Layer, Service};
    use tower_coalesce::grpc::CoalesceGrpcLayer;
    use tower_coalesce::http::{CoalesceBody, ServedBy};

    /// The gRPC adapter rebuilds followers' copies on its own (not through the HTTP adapter's
    /// `SharedResponse`): gRPC runs over HTTP/2, where the server itself strips
    /// connection-specific fields, so its copies are the leader's response field for field.
    /// Pinned: a follower's copy has the leader's headers, data and trailers (`grpc-status`
    /// included), and with those trailers an inexact size (lower bound = the data), like the
    /// leader's own buffered body.
    #[tokio::test]
    async fn grpc_follower_copies_match_the_leaders_response_and_keep_their_trailers() {
        let (open, gate) = tokio::sync::watch::channel(false);
        let headers = map(&[("content-type", "application/grpc"), ("x-meta", "1")]);
        let inner = service_fn(move |_req: Request<CoalesceBody<Full<Bytes>>>| {
            let mut gate = gate.clone();
            let headers = headers.clone();
            async move {
                gate.wait_for(|o| *o).await.unwrap();
                let mut res = Response::new(grpc_body(map(&[("grpc-status", "0")])));
                *res.headers_mut() = headers;
                Ok::<_, Infallible>(res)
            }
        });
        let mut svc = CoalesceGrpcLayer::new().method(GRPC_PATH).layer(inner);
        let mut leader = Box::pin(svc.call(grpc_request()));
        let mut follower = Box::pin(svc.call(grpc_request()));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        assert!(futures::poll!(follower.as_mut()).is_pending());
        open.send_replace(true);
        let mut seen = Vec::new();
        for res in [leader.await.unwrap(), follower.await.unwrap()] {
            let by = *res.extensions().get::<ServedBy>().unwrap();
            let (parts, body) = res.into_parts();
            let hint = body.size_hint();
            let c = body.collect().await.unwrap();
            let trailers = c.trailers().cloned();
            seen.push((
                by,
                parts.headers,
                hint.exact(),
                hint.lower(),
                trailers,
                c.to_bytes(),
            ));
        }
        assert_eq!(seen[0].0, ServedBy::Leader);
        assert_eq!(seen[1].0, ServedBy::Follower);
        assert_eq!(seen[1].1, seen[0].1, "same headers");
        assert_eq!(seen[1].4, seen[0].4, "same trailers");
        assert_eq!(seen[1].4.as_ref().unwrap()["grpc-status"], "0");
        assert_eq!(seen[1].5, seen[0].5);
        for s in &seen {
            assert_eq!((s.2, s.3), (None, 6), "trailers: no exact size");
        }
    }
}
