//! `is_alone`: a call run beside any flight is told apart from a real leader.

use std::convert::Infallible;

use tower::{service_fn, Service};
use tower_coalesce::{CoalesceLayer, GroupBuilder};
use tower_layer::Layer;

#[test]
fn a_call_over_max_in_flight_is_alone_and_nobody_joins_it() {
    let group = GroupBuilder::new().max_in_flight(1).build::<u8>();
    let registered = group.run(1, std::future::pending::<u32>);
    let alone = group.run(2, std::future::pending::<u32>);
    let joiner = group.run(2, std::future::pending::<u32>);
    assert!(registered.is_leader() && !registered.is_alone());
    assert!(alone.is_leader() && alone.is_alone());
    assert!(
        joiner.is_alone(),
        "an alone call is not joinable: the next one is alone too"
    );
    assert_eq!(group.in_flight(), 1);
}

#[test]
fn a_request_over_max_followers_is_alone_through_the_layer() {
    let mut svc = CoalesceLayer::new(|k: &u8| Some(*k))
        .max_followers(1)
        .layer(service_fn(|k: u8| async move { Ok::<_, Infallible>(k) }));
    let leader = svc.call(1);
    let follower = svc.call(1);
    let extra = svc.call(1);
    assert!(leader.is_leader() && !leader.is_alone());
    assert!(follower.is_follower() && !follower.is_alone());
    assert!(extra.is_alone(), "the second follower is over the bound");
    let bypass = CoalesceLayer::new(|_: &u8| None::<u8>)
        .layer(service_fn(|k: u8| async move { Ok::<_, Infallible>(k) }))
        .call(1);
    assert!(bypass.is_bypass() && !bypass.is_alone());
}
