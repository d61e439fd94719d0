//! A queued request's headers are packed while it waits for its token. The header map
//! h2 and hyper hand over keeps room for six entries of about a hundred bytes and an
//! index, ~650 bytes on the heap, for the two to four headers a Klaviyo call carries;
//! and a request may queue for minutes, tens of thousands at once. Packed, they are one
//! buffer of their bytes and lengths, unpacked (sharing that buffer) when the wait ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// Awaits `wait` with `headers` packed while it is pending: a wait that is over at its
/// first poll (a token at once) costs nothing more. The headers are back in place
/// when this returns, whatever `wait` gave; if it is dropped mid-wait, so are they.
pub fn parked<F: Future>(wait: F, headers: &mut HeaderMap) -> Parked<'_, F> {
    Parked { wait, headers, packed: None, polled: false }
}

pin_project_lite::pin_project! {
    /// [`parked`]'s future, by hand: an `async fn` would hold `wait` twice (its
    /// argument and its pinned copy) in every queued request.
    pub struct Parked<'a, F> {
        #[pin]
        wait: F,
        headers: &'a mut HeaderMap,
        packed: Option<Packed>,
        polled: bool,
    }
}

impl<F: Future> Future for Parked<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.wait.poll(cx) {
            Poll::Pending => {
                if !std::mem::replace(this.polled, true) {
                    *this.packed = Some(Packed::pack(&std::mem::take(*this.headers)));
                }
                Poll::Pending
            }
            Poll::Ready(out) => {
                *this.polled = true;
                if let Some(packed) = this.packed.take() {
                    **this.headers = packed.unpack();
                }
                Poll::Ready(out)
            }
        }
    }
}

/// Headers as one buffer: their count (4 bytes), then per entry a sensitivity byte,
/// the name's length (2 bytes, as a `HeaderName` is at most 64 KiB), the value's
/// length (4 bytes), the name, the value. Only [`Packed::pack`] writes one, so every
/// name and value in it is valid.
#[derive(Debug)]
pub struct Packed(Bytes);

const COUNT: usize = 4;
const ENTRY_HEAD: usize = 7;

impl Packed {
    /// `headers` packed, in their iteration order (each name's values together, in
    /// order, which is all HTTP gives meaning to).
    pub fn pack(headers: &HeaderMap) -> Self {
        let len: usize = headers.iter().map(|(n, v)| ENTRY_HEAD + n.as_str().len() + v.len()).sum();
        let mut buf = Vec::with_capacity(COUNT + len);
        buf.put_u32_le(u32::try_from(headers.len()).expect("a header map holds at most 32768 entries"));
        for (name, value) in headers {
            buf.put_u8(u8::from(value.is_sensitive()));
            buf.put_u16_le(u16::try_from(name.as_str().len()).expect("a header name is at most 64 KiB"));
            buf.put_u32_le(u32::try_from(value.len()).expect("a header value is bounded by the server"));
            buf.put_slice(name.as_str().as_bytes());
            buf.put_slice(value.as_bytes());
        }
        Packed(Bytes::from(buf))
    }

    /// The headers again; the values share the packed buffer.
    pub fn unpack(self) -> HeaderMap {
        let bytes = self.0;
        let count = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let mut map = HeaderMap::with_capacity(count);
        let mut at = COUNT;
        while at < bytes.len() {
            let head = &bytes[at..at + ENTRY_HEAD];
            let sensitive = head[0] == 1;
            let name_len = usize::from(u16::from_le_bytes([head[1], head[2]]));
            let value_len = u32::from_le_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let name_at = at + ENTRY_HEAD;
            let value_at = name_at + name_len;
            at = value_at + value_len;
            let name = HeaderName::from_bytes(&bytes[name_at..value_at]).expect("packed from a header name");
            let mut value =
                HeaderValue::from_maybe_shared(bytes.slice(value_at..at)).expect("packed from a header value");
            value.set_sensitive(sensitive);
            map.append(name, value);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(map: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        map.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive())).collect()
    }

    proptest! {
        /// Any header map comes back as it went: names, values (any byte a header value
        /// may hold), repeats in order, sensitivity.
        #[test]
        fn headers_come_back_as_they_went(
            headers in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("authorization".to_string()),
                        Just("revision".to_string()),
                        Just("accept".to_string()),
                        "x-[a-z0-9-]{1,20}",
                    ],
                    proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..80),
                    any::<bool>(),
                ),
                0..12,
            )
        ) {
            let mut map = HeaderMap::new();
            for (name, value, sensitive) in headers {
                let mut value = HeaderValue::from_bytes(&value).expect("valid value bytes");
                value.set_sensitive(sensitive);
                map.append(HeaderName::from_bytes(name.as_bytes()).expect("valid name"), value);
            }
            let back = Packed::pack(&map).unpack();
            prop_assert_eq!(entries(&back), entries(&map));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_holds_its_headers_packed_and_gets_them_back() {
        let mut headers = HeaderMap::with_capacity(20);
        headers.insert("authorization", HeaderValue::from_static("Klaviyo-API-Key pk_x"));
        headers.append("accept", HeaderValue::from_static("application/json"));
        headers.append("accept", HeaderValue::from_static("text/plain"));
        let before = entries(&headers);
        let wait = async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            7
        };
        assert_eq!(parked(wait, &mut headers).await, 7);
        assert_eq!(entries(&headers), before);
        // Rebuilt from the packed form: room for its three entries, not the twenty the
        // map had.
        assert!(headers.capacity() < 20, "packed and rebuilt: {}", headers.capacity());
    }

    #[tokio::test]
    async fn a_wait_over_at_once_leaves_the_map_untouched() {
        let mut headers = HeaderMap::with_capacity(20);
        headers.insert("revision", HeaderValue::from_static("2026-07-15"));
        let capacity = headers.capacity();
        assert_eq!(parked(std::future::ready(1), &mut headers).await, 1);
        assert_eq!(headers.capacity(), capacity, "not packed and rebuilt");
    }
}
