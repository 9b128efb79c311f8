//! The one place the proxy's upstream layers are put together. A routed
//! request ([`Call`]) goes, outermost first, through:
//!
//! 1. [`observe`](crate::observe): failures become local replies; every
//!    request is counted once in metrics and load reports;
//! 2. [`timeout`](crate::timeout) (request): the route's timeout over all
//!    attempts;
//! 3. [`retry`](crate::retry): the body handed to one attempt at a time,
//!    then retries by the route's policy within the cluster's budget;
//! 4. [`timeout`](crate::timeout) (per try);
//! 5. [`balance`](crate::balance): p2c over peak-EWMA cost, skipping
//!    ejected endpoints; feeds latency and outcomes back;
//! 6. [`forward`](crate::forward): pooled HTTP/1.1 or HTTP/2 to the
//!    endpoint.

use std::time::Duration;

use tower::ServiceBuilder;
use tower::retry::{Retry, RetryLayer};
use tower::util::MapRequest;

use crate::balance::{Balance, BalanceLayer};
use crate::call::Call;
use crate::forward::Forward;
use crate::observe::{Observe, ObserveLayer};
use crate::outlier::Clock;
use crate::retry;
use crate::timeout::{Limit, Timeout, TimeoutLayer};

pub type Stack =
    Observe<Timeout<MapRequest<Retry<retry::Policy, Timeout<Balance<Forward>>>, fn(Call) -> Call>>>;

pub fn build(forward: Forward, default_timeout: Duration, clock: Clock) -> Stack {
    ServiceBuilder::new()
        .layer(ObserveLayer)
        .layer(TimeoutLayer(Limit::Request {
            default: default_timeout,
        }))
        .map_request(retry::prepare as fn(Call) -> Call)
        .layer(RetryLayer::new(retry::Policy))
        .layer(TimeoutLayer(Limit::PerTry))
        .layer(BalanceLayer { clock })
        .service(forward)
}
