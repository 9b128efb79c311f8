//! ADS responses as they go on the wire.
//!
//! A response is written as a gRPC message made of a small head (type,
//! nonce, versions, removals) encoded for this response, followed by
//! each resource's entry, encoded once per resource and shared by every
//! stream ([`Resource::sotw_entry`], [`Resource::delta_entry`]). Protobuf
//! appends repeated fields across concatenated encodings, so the result
//! decodes as the whole response.
//!
//! No stream keeps a buffer the size of its largest response: entries are
//! gathered into pieces of at most [`PIECE_BYTES`], each made when the
//! connection takes the one before and freed once written, where a
//! per-stream encode buffer would keep the size of the initial config
//! (megabytes at fleet scale) for the stream's life.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource as DeltaResource,
};
use http::HeaderMap;
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;

use crate::resources::Resource;

/// The largest piece a response is written in. Entries are small (a
/// cluster, one service's endpoints), so pieces are copies of several.
pub const PIECE_BYTES: usize = 64 * 1024;

/// A state-of-the-world response, before encoding.
#[derive(Debug, Clone)]
pub struct SotwReply {
    pub version_info: String,
    pub resources: Vec<Arc<Resource>>,
    pub type_url: &'static str,
    pub nonce: String,
}

/// A delta response, before encoding.
#[derive(Debug, Clone)]
pub struct DeltaReply {
    pub system_version_info: String,
    pub resources: Vec<Arc<Resource>>,
    pub removed_resources: Vec<String>,
    pub type_url: &'static str,
    pub nonce: String,
}

/// A response to put on a stream.
pub trait Reply: Send + 'static {
    /// The response's own fields, without its resources.
    fn head(&self) -> Vec<u8>;
    /// Its resources, in order.
    fn resources(&self) -> &[Arc<Resource>];
    /// One resource's entry in this kind of response.
    fn entry(resource: &Resource) -> &Bytes;

    /// The response as one gRPC message (length-prefixed), in pieces of
    /// at most [`PIECE_BYTES`] made as they are asked for.
    fn pieces(self) -> Pieces<Self>
    where
        Self: Sized,
    {
        Pieces::new(self)
    }
}

/// A response's pieces, each made only when the previous one is taken:
/// a stream holds one piece at a time, not a whole response.
#[derive(Debug)]
pub struct Pieces<R> {
    reply: R,
    /// The gRPC frame prefix and the head, until they are out.
    head: Option<Vec<u8>>,
    next: usize,
}

impl<R: Reply> Pieces<R> {
    fn new(reply: R) -> Self {
        let head = reply.head();
        let len = head.len()
            + reply
                .resources()
                .iter()
                .map(|r| R::entry(r).len())
                .sum::<usize>();
        let mut first = Vec::with_capacity(5 + head.len());
        // gRPC framing: not compressed, then the length (big endian).
        first.put_u8(0);
        first.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        first.extend_from_slice(&head);
        Self {
            reply,
            head: Some(first),
            next: 0,
        }
    }
}

impl<R: Reply> Iterator for Pieces<R> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let resources = self.reply.resources();
        let mut piece = BytesMut::new();
        if let Some(head) = self.head.take() {
            piece.reserve(PIECE_BYTES.min(head.len() + 16 * 1024));
            piece.put_slice(&head);
        }
        while let Some(r) = resources.get(self.next) {
            let entry = R::entry(r);
            if entry.len() >= PIECE_BYTES {
                if piece.is_empty() {
                    // A large entry goes as it is, shared.
                    self.next += 1;
                    return Some(entry.clone());
                }
                break;
            }
            if piece.len() + entry.len() > PIECE_BYTES {
                break;
            }
            piece.put_slice(entry);
            self.next += 1;
        }
        (!piece.is_empty()).then(|| piece.freeze())
    }
}

impl Reply for SotwReply {
    fn head(&self) -> Vec<u8> {
        self.message_head().encode_to_vec()
    }

    fn resources(&self) -> &[Arc<Resource>] {
        &self.resources
    }

    fn entry(resource: &Resource) -> &Bytes {
        resource.sotw_entry()
    }
}

impl Reply for DeltaReply {
    fn head(&self) -> Vec<u8> {
        self.message_head().encode_to_vec()
    }

    fn resources(&self) -> &[Arc<Resource>] {
        &self.resources
    }

    fn entry(resource: &Resource) -> &Bytes {
        resource.delta_entry()
    }
}

impl SotwReply {
    /// The response's own fields, without its resources.
    fn message_head(&self) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: self.version_info.clone(),
            type_url: self.type_url.to_owned(),
            nonce: self.nonce.clone(),
            ..Default::default()
        }
    }

    /// The response as a message (what a client decodes).
    pub fn to_message(&self) -> DiscoveryResponse {
        DiscoveryResponse {
            resources: self.resources.iter().map(|r| r.body.clone()).collect(),
            ..self.message_head()
        }
    }
}

impl DeltaReply {
    /// The response's own fields, without its resources.
    fn message_head(&self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.system_version_info.clone(),
            removed_resources: self.removed_resources.clone(),
            type_url: self.type_url.to_owned(),
            nonce: self.nonce.clone(),
            ..Default::default()
        }
    }

    /// The response as a message (what a client decodes).
    pub fn to_message(&self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            resources: self
                .resources
                .iter()
                .map(|r| DeltaResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            ..self.message_head()
        }
    }
}

/// What a stream's writer hands its body: a response, or the status that
/// ends the stream.
pub type Outgoing<R> = Result<R, tonic::Status>;

/// The HTTP/2 body of an ADS response stream: each response's pieces as
/// the connection takes them, then the gRPC status in trailers.
#[derive(Debug)]
pub struct ReplyBody<R> {
    rx: mpsc::Receiver<Outgoing<R>>,
    current: Option<Pieces<R>>,
    ended: bool,
}

impl<R> ReplyBody<R> {
    pub fn new(rx: mpsc::Receiver<Outgoing<R>>) -> Self {
        Self {
            rx,
            current: None,
            ended: false,
        }
    }
}

fn trailers(status: &tonic::Status) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only a message that cannot be a header fails: send the code.
        let _ = tonic::Status::new(status.code(), "").add_header(&mut headers);
    }
    headers
}

impl<R: Reply + Unpin> http_body::Body for ReplyBody<R> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        loop {
            if let Some(piece) = self.current.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            self.current = None;
            if self.ended {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(reply))) => self.current = Some(reply.pieces()),
                Poll::Ready(Some(Err(status))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let ok = tonic::Status::new(tonic::Code::Ok, "");
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&ok)))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.current.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::envoy::config::cluster::v3::Cluster;

    fn resource(name: &str, padding: usize) -> Arc<Resource> {
        let cluster = Cluster {
            name: name.to_owned(),
            alt_stat_name: "x".repeat(padding),
            ..Default::default()
        };
        Arc::new(Resource::new(name.to_owned(), &cluster))
    }

    /// The gRPC message the pieces make, checked for its framing.
    fn message(pieces: &[Bytes]) -> Vec<u8> {
        let all: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(all[0], 0, "not compressed");
        let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
        assert_eq!(len, all.len() - 5, "the prefix says the message's length");
        all[5..].to_vec()
    }

    #[test]
    fn a_delta_reply_decodes_as_the_whole_response_in_bounded_pieces() {
        let reply = DeltaReply {
            system_version_info: "7".into(),
            resources: (0..40)
                .map(|i| resource(&format!("c{i}"), 5_000))
                .chain([resource("big", 3 * PIECE_BYTES)])
                .collect(),
            removed_resources: vec!["gone".into()],
            type_url: ferry_proto::type_url::CLUSTER,
            nonce: "3".into(),
        };
        let pieces: Vec<Bytes> = reply.clone().pieces().collect();
        assert!(pieces.len() > 2, "{} pieces", pieces.len());
        let big = reply.resources[40].delta_entry().len();
        assert!(
            pieces
                .iter()
                .all(|p| p.len() <= PIECE_BYTES || p.len() == big),
            "a piece over {PIECE_BYTES} bytes that is not one shared entry"
        );
        let decoded = DeltaDiscoveryResponse::decode(&message(&pieces)[..]).unwrap();
        assert_eq!(decoded, reply.to_message());
    }

    #[test]
    fn a_sotw_reply_decodes_as_the_whole_response() {
        let reply = SotwReply {
            version_info: "abc".into(),
            resources: vec![resource("a", 10), resource("b", 20)],
            type_url: ferry_proto::type_url::CLUSTER,
            nonce: "1".into(),
        };
        let pieces: Vec<Bytes> = reply.clone().pieces().collect();
        let decoded = DiscoveryResponse::decode(&message(&pieces)[..]).unwrap();
        assert_eq!(decoded, reply.to_message());
        // An empty response is still one framed message.
        let empty = SotwReply {
            resources: Vec::new(),
            ..reply
        };
        let pieces: Vec<Bytes> = empty.clone().pieces().collect();
        let decoded = DiscoveryResponse::decode(&message(&pieces)[..]).unwrap();
        assert_eq!(decoded, empty.to_message());
    }

    #[test]
    fn entries_are_encoded_once_and_shared() {
        let r = resource("a", 10);
        let first = r.delta_entry().as_ptr();
        assert_eq!(first, r.delta_entry().as_ptr());
    }
}
