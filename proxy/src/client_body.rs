//! The client's request body, watched: when reading it fails (a malformed
//! chunk, a client that hangs up mid-upload), the failure is the
//! client's, never the endpoint's. The upstream exchange that was reading
//! it then ends as [`Failure::ClientBody`](crate::call::Failure): a 400 to
//! the client if it still listens, no endpoint failure, no 5xx, no error
//! in the load reports that feed migration gates (Envoy answers 400 too).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::call::{Body, BoxError};

/// Set once reading the client's body failed, with why.
#[derive(Debug, Clone, Default)]
pub struct ClientFault(Arc<OnceLock<String>>);

impl ClientFault {
    /// Why the client's body could not be read, if it could not.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    fn set(&self, why: String) {
        let _ = self.0.set(why);
    }
}

/// `body`, recording in `fault` any error reading it.
pub fn watched(body: Incoming, fault: ClientFault) -> Body {
    use http_body_util::BodyExt;
    Watched { body, fault }.boxed()
}

struct Watched {
    body: Incoming,
    fault: ClientFault,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.fault.set(e.to_string());
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map(|frame| frame.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
