//! What a gRPC message may make the daemon reserve before its bytes arrive.
//!
//! tonic reserves a message's whole declared length as soon as its 5-byte header arrives
//! (`Streaming::decode_chunk`: `buf.reserve(len)`, for any length up to the decoding limit,
//! [`MAX_MESSAGE_BYTES`](super::MAX_MESSAGE_BYTES) = 2 GiB - 1: clients such as `tritonclient`
//! send tensors that large). The reservation is infallible: where the allocation fails (a
//! machine with strict overcommit, an address-space limit, a container smaller than the
//! message) the process aborts. Five bytes from any client that may call at all, and the
//! daemon is gone; and many concurrent streams each declaring a large message commit memory
//! for data that never comes.
//!
//! So every request body passes through [`Receiving`] on its way to tonic. It follows the
//! gRPC framing (a flag byte and a big-endian u32 length per message, across HTTP/2 frames)
//! and, before tonic sees the header of a message of at least [`COUNTED_FROM`] bytes, admits
//! its length: against a process-wide budget of bytes being received (`--max-receiving-bytes`,
//! held from the header until the message's last byte has passed), and by reserving that much
//! fallibly first (released at once, then reserved by tonic). A message refused either way
//! fails its call with `RESOURCE_EXHAUSTED` naming the size; tonic never reserves it.
//!
//! Smaller messages (a typical request: an image of a few hundred KB) are neither counted nor
//! probed: what they reserve is small, the probe (an `mmap` and `munmap` past glibc's
//! threshold) would cost each request microseconds, and a budget filled by clients that
//! declare large messages and never send them cannot refuse them. A counted message that stops
//! arriving (no byte for `--receive-idle-timeout-s`, 30 s by default; tonic sets no timeout on
//! a request body) fails its call with `DEADLINE_EXCEEDED` and gives its share back, so
//! clients that declare large messages and send nothing hold the budget against others for
//! that long at most.
//!
//! The same [`Budget`] covers the REST listener's bodies ([`Budget::hold`], read only after
//! the caller's token check) and, unlimited, `opreg`'s responses ([`ReceivingResponses`]:
//! tonic's client reserves a response's declared length just the same).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};
use tonic::{
    body::Body,
    codegen::{
        http::{Request, Response},
        Bytes,
    },
    Status,
};

/// Messages from this size on are counted against the budget and reserved fallibly before
/// tonic reserves them (see the module's documentation for the smaller ones).
pub const COUNTED_FROM: usize = 1 << 20;

/// The bytes of the messages being received, process-wide.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    /// Messages smaller than this pass uncounted ([`COUNTED_FROM`]; 0 in the unit tests).
    from: usize,
    held: AtomicUsize,
    /// How long a counted message may go without a byte before it fails (None: forever).
    idle: Option<Duration>,
}

impl Budget {
    /// A budget of `limit` bytes, whose counted messages fail after `idle` without a byte.
    pub fn new(limit: u64, idle: Option<Duration>) -> Arc<Self> {
        Arc::new(Budget {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            from: COUNTED_FROM,
            held: AtomicUsize::new(0),
            idle,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Takes `len` bytes for a message about to be received (the bytes now held for it:
    /// `len`, or 0 for an uncounted one), or refuses it.
    fn admit(&self, len: usize) -> Result<usize, Status> {
        if len < self.from {
            return Ok(0);
        }
        self.take(len, len)?;
        let mut probe = Vec::<u8>::new();
        if probe.try_reserve_exact(len).is_err() {
            self.release(len);
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes: cannot reserve that much memory now"
            )));
        }
        Ok(len)
    }

    /// Takes `len` bytes of the budget for a message (or body) of `size` bytes, or refuses.
    fn take(&self, len: usize, size: usize) -> Result<(), Status> {
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                h.checked_add(len).filter(|&t| t <= self.limit)
            });
        match taken {
            Ok(_) => Ok(()),
            Err(held) => Err(Status::resource_exhausted(format!(
                "a message of {size} bytes would take the messages being received to more \
                 than --max-receiving-bytes ({} bytes; {held} held now)",
                self.limit
            ))),
        }
    }

    fn release(&self, len: usize) {
        self.held.fetch_sub(len, Ordering::AcqRel);
    }

    /// Holds the budget for a request body of `declared` bytes (its `Content-Length`, 0 when
    /// unknown) read outside gRPC (the REST listener), counted from [`COUNTED_FROM`] bytes on
    /// as a gRPC message is; more as it grows ([`Held::grow`]), given back when the guard
    /// drops. No probe: the caller reserves its buffer fallibly itself.
    pub fn hold(self: &Arc<Self>, declared: usize) -> Result<Held, Status> {
        let mut held = Held {
            budget: self.clone(),
            bytes: 0,
        };
        held.grow(declared)?;
        Ok(held)
    }
}

/// Bytes of a [`Budget`] held for one request body, given back when dropped.
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Held {
    /// Whether the body counts against the budget (is 1 MiB or more so far).
    pub fn counted(&self) -> bool {
        self.bytes > 0
    }

    /// The body now needs `total` bytes: the difference is taken from the budget once the
    /// body counts (`total` of [`COUNTED_FROM`] or more), or the body is refused.
    pub fn grow(&mut self, total: usize) -> Result<(), Status> {
        if total < self.budget.from || total <= self.bytes {
            return Ok(());
        }
        self.budget.take(total - self.bytes, total)?;
        self.bytes = total;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Where the body is in the gRPC framing.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// `n` bytes of a message's 5-byte header read so far.
    Header { bytes: [u8; 5], n: usize },
    /// Inside a message: `left` bytes of it still to come.
    Message { left: usize },
}

/// A request body whose gRPC messages are admitted against a [`Budget`] before tonic sees
/// their headers.
pub struct Receiving {
    inner: Body,
    budget: Arc<Budget>,
    framing: Framing,
    /// Bytes of the budget this body holds (its current message's length).
    held: usize,
    /// A refusal already reported: nothing more is read.
    failed: bool,
    /// The idle clock of a counted message, started when the body first waits for bytes and
    /// restarted by each frame.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Receiving {
    pub fn new(inner: Body, budget: Arc<Budget>) -> Self {
        Receiving {
            inner,
            budget,
            framing: Framing::Header {
                bytes: [0; 5],
                n: 0,
            },
            held: 0,
            failed: false,
            idle: None,
        }
    }

    /// Follows the framing through `data`, admitting each message whose header completes.
    fn follow(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Header { bytes, n } => {
                    let take = (5 - *n).min(data.len());
                    bytes[*n..*n + take].copy_from_slice(&data[..take]);
                    *n += take;
                    data = &data[take..];
                    if *n == 5 {
                        let declared = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                        let len = usize::try_from(declared).unwrap_or(usize::MAX);
                        self.held = self.budget.admit(len)?;
                        self.framing = Framing::Message { left: len };
                        self.finish_message_if_done();
                    }
                }
                Framing::Message { left } => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    data = &data[take..];
                    self.finish_message_if_done();
                }
            }
        }
        Ok(())
    }

    /// The body waits for bytes: a counted message that waited its budget's idle time fails,
    /// its share given back.
    fn wait(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let (held, Some(limit)) = (self.held, self.budget.idle) else {
            return Poll::Pending;
        };
        if held == 0 {
            return Poll::Pending;
        }
        let clock = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if clock.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.failed = true;
        self.budget.release(std::mem::take(&mut self.held));
        Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
            "no byte of a {held}-byte message for {}s (--receive-idle-timeout-s): its share of \
             --max-receiving-bytes is given back",
            limit.as_secs_f64()
        )))))
    }

    /// At a message's end: its bytes are with tonic, which decodes it; the budget goes back.
    fn finish_message_if_done(&mut self) {
        if let Framing::Message { left: 0 } = self.framing {
            self.budget.release(std::mem::take(&mut self.held));
            self.framing = Framing::Header {
                bytes: [0; 5],
                n: 0,
            };
        }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        // A call that ended mid-message (cancelled, refused, disconnected).
        self.budget.release(std::mem::take(&mut self.held));
    }
}

impl http_body::Body for Receiving {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Pending => return this.wait(cx),
            other => return other,
        };
        // Bytes came: the idle clock starts again when the body next waits.
        this.idle = None;
        if let Some(data) = frame.data_ref() {
            if let Err(status) = this.follow(data) {
                this.failed = true;
                return Poll::Ready(Some(Err(status)));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The tower layer that puts every request body through [`Receiving`].
#[derive(Clone)]
pub struct ReceiveLayer {
    budget: Arc<Budget>,
}

impl ReceiveLayer {
    pub fn new(budget: Arc<Budget>) -> Self {
        ReceiveLayer { budget }
    }
}

impl<S> tower::Layer<S> for ReceiveLayer {
    type Service = Budgeted<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Budgeted {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// A service whose request bodies are admitted against the budget.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S, RB> tower::Service<Request<Body>> for Budgeted<S>
where
    S: tower::Service<Request<Body>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let budget = self.budget.clone();
        self.inner
            .call(req.map(|body| Body::new(Receiving::new(body, budget))))
    }
}

/// A client's channel whose response bodies pass through [`Receiving`]: the same tonic
/// decoder reserves a response's declared length in a client, so a server (or anything in
/// between) declaring more than the client can allocate would abort it. `opreg`'s channels
/// take their responses through this, with a budget of `u64::MAX`: only the fallible
/// reservation of messages of [`COUNTED_FROM`] bytes or more applies.
#[derive(Clone)]
pub struct ReceivingResponses<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S> ReceivingResponses<S> {
    pub fn new(inner: S, budget: Arc<Budget>) -> Self {
        ReceivingResponses { inner, budget }
    }
}

impl<S, B> tower::Service<Request<B>> for ReceivingResponses<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let budget = self.budget.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Body::new(Receiving::new(body, budget))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::collections::VecDeque;
    use tonic::Code;

    /// A body of the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    /// Polls `body` to its end: the bytes passed through, or the first error.
    fn drain(
        body: &mut Receiving,
        after_each: &mut dyn FnMut(&Receiving),
    ) -> Result<Vec<u8>, Status> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    out.extend_from_slice(f.data_ref().expect("data"));
                    after_each(body);
                }
                Poll::Ready(Some(Err(s))) => return Err(s),
                Poll::Ready(None) => return Ok(out),
                Poll::Pending => unreachable!("the test body is always ready"),
            }
        }
    }

    /// A budget of `limit` bytes that counts every message.
    fn counting(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            from: 0,
            held: AtomicUsize::new(0),
            idle: None,
        })
    }

    fn body(chunks: Vec<Vec<u8>>, budget: &Arc<Budget>) -> Receiving {
        let chunks = Chunks(chunks.into_iter().map(Bytes::from).collect());
        Receiving::new(Body::new(chunks), budget.clone())
    }

    #[test]
    fn messages_split_anywhere_pass_unchanged_and_hold_the_budget_while_in_flight() {
        // Three messages, cut at every offset into two chunks, and byte by byte.
        let stream: Vec<u8> = [message(3), message(0), message(20)].concat();
        let mut cuts: Vec<Vec<Vec<u8>>> = (0..=stream.len())
            .map(|i| vec![stream[..i].to_vec(), stream[i..].to_vec()])
            .collect();
        cuts.push(stream.iter().map(|&b| vec![b]).collect());
        for chunks in cuts {
            let budget = counting(20);
            let mut b = body(chunks, &budget);
            let mut most = 0;
            let out = drain(&mut b, &mut |b| most = most.max(b.budget.held()))
                .expect("every message fits");
            assert_eq!(out, stream, "the bytes pass through unchanged");
            assert!(most <= 20, "held at most one message at a time: {most}");
            assert_eq!(
                budget.held(),
                0,
                "every message's bytes went back at its end"
            );
        }
    }

    #[test]
    fn a_message_past_the_budget_is_refused_before_its_header_passes() {
        let budget = counting(1000);
        // Another call holds 900 bytes.
        budget.admit(900).expect("room");
        let mut b = body(vec![message(50), message(101)], &budget);
        let mut frames = 0;
        let e = drain(&mut b, &mut |_| frames += 1).expect_err("refused");
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(
            e.message().contains("101 bytes") && e.message().contains("--max-receiving-bytes"),
            "{}",
            e.message()
        );
        assert_eq!(
            frames, 1,
            "the first message passed, the second's header did not"
        );
        // Nothing more is read after the refusal, and dropping the body frees what it held.
        let waker = std::task::Waker::noop();
        assert!(matches!(
            Pin::new(&mut b).poll_frame(&mut Context::from_waker(waker)),
            Poll::Ready(None)
        ));
        drop(b);
        assert_eq!(budget.held(), 900, "only the other call's bytes are held");
    }

    #[test]
    fn rest_bodies_hold_what_they_declare_and_what_they_grow_to() {
        let budget = counting(100);
        let mut a = budget.hold(60).expect("room for 60");
        assert!(a.counted());
        let e = budget.hold(41).map(|_| ()).expect_err("60 + 41 > 100");
        assert_eq!(e.code(), Code::ResourceExhausted);
        a.grow(100).expect("grows into the rest");
        assert_eq!(budget.held(), 100);
        a.grow(80).expect("never shrinks");
        assert!(a.grow(101).is_err(), "past the budget");
        drop(a);
        assert_eq!(budget.held(), 0, "given back whole");
        // Below the threshold of a real budget: nothing held.
        let real = Budget::new(1, None);
        let small = real.hold(COUNTED_FROM - 1).expect("uncounted");
        assert!(!small.counted());
        assert_eq!(real.held(), 0);
    }

    #[test]
    fn a_body_dropped_mid_message_gives_its_bytes_back() {
        let budget = counting(1 << 20);
        let whole = message(1000);
        let mut b = body(vec![whole[..100].to_vec()], &budget);
        drain(&mut b, &mut |_| {}).expect("admitted");
        assert_eq!(budget.held(), 1000, "held while the message is incomplete");
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_client_gets_an_unreservable_response_as_an_error() {
        use tower::Service as _;
        // A "server" answering with a message header that declares 4 GiB - 1, past the
        // client's budget here (in `opreg`, whose budget is unlimited, the fallible
        // reservation refuses what cannot be had).
        let server = tower::service_fn(|_req: Request<Body>| async {
            let head = Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff]);
            let body = Chunks(VecDeque::from([head]));
            Ok::<_, std::convert::Infallible>(Response::new(Body::new(body)))
        });
        let mut client = ReceivingResponses::new(server, counting(1 << 30));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut call = client.call(Request::new(Body::empty()));
        let Poll::Ready(Ok(response)) = call.as_mut().poll(&mut cx) else {
            panic!("the response head is ready");
        };
        let mut body = response.into_body();
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Err(e))) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
                assert!(e.message().contains("4294967295 bytes"), "{}", e.message());
            }
            _ => panic!("the declared length must be refused"),
        }
    }

    #[test]
    fn a_declared_length_that_cannot_be_reserved_is_refused_not_aborted() {
        // More than any allocator can give (and more than `isize::MAX` on 32-bit targets):
        // the fallible probe fails, where tonic's `reserve` would abort the process.
        let budget = Budget::new(u64::MAX, None);
        assert_eq!(
            budget.admit(COUNTED_FROM - 1).expect("small"),
            0,
            "not counted"
        );
        let huge = usize::MAX / 2 + 1;
        let e = budget.admit(huge).expect_err("cannot be reserved");
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("cannot reserve"), "{}", e.message());
        assert_eq!(budget.held(), 0, "a refused probe gives the bytes back");
    }
}
