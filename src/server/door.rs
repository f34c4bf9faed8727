//! The door: which connections a listener keeps when more arrive than it
//! should hold.
//!
//! Each listener has one [`Door`]. It caps how many connections one peer
//! address holds (`server.max_connections_per_ip`; the addresses of trusted
//! proxies are exempt, since every client behind a proxy shares its address)
//! and, at `server.max_connections`, makes room for a new connection by
//! closing the open one that has sent the fewest bytes, among those open
//! longer than [`GRACE`]: a slow-loris client dribbling its headers, not a
//! webhook that is being read. Making new connections wait for a slot
//! instead, as a plain cap does, lets whoever holds the slots hold every
//! delivery back until its own connections time out.
//!
//! The door never reads or writes a connection: the connection's task counts
//! what arrives through [`Counted`] and closes itself when its [`Pass`] says
//! it was shed. It decides nothing from what a connection sends but the
//! number of bytes.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock;

/// How long a new connection is safe from being shed: long enough for any
/// client that means to send a request to have sent its headers, so a
/// connection just accepted (0 bytes so far) never loses to a dribbler.
pub const GRACE: Duration = Duration::from_secs(1);

/// What the door holds a listener to; read from the config at each accept,
/// so a reload applies to the next connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub total: usize,
    pub per_ip: usize,
    /// Addresses the per-address cap does not apply to.
    pub unlimited: Vec<IpNet>,
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address already holds `held` connections, the cap.
    PerIp { held: usize },
}

/// A connection that was closed to make room for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    pub ip: IpAddr,
    pub received: u64,
    pub open_for: Duration,
}

/// Counts connections per listener; see the module docs.
#[derive(Debug, Default)]
pub struct Door {
    state: Mutex<State>,
    /// Told each time a connection leaves, so a full door re-checks.
    left: Notify,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    open: HashMap<u64, Open>,
    per_ip: HashMap<IpAddr, usize>,
    /// Told to close but not gone yet: they no longer count against the cap.
    leaving: usize,
}

#[derive(Debug)]
struct Open {
    ip: IpAddr,
    since: Instant,
    received: Arc<AtomicU64>,
    shed: CancellationToken,
}

/// One connection's place inside; dropping it (the connection ended) frees it.
#[derive(Debug)]
pub struct Pass {
    door: Arc<Door>,
    id: u64,
    /// Bytes received on the connection; [`Counted`] adds to it.
    pub received: Arc<AtomicU64>,
    /// Cancelled when the door sheds this connection: close it.
    pub shed: CancellationToken,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.door.lock();
        if let Some(open) = state.open.remove(&self.id) {
            if open.shed.is_cancelled() {
                state.leaving -= 1;
            }
            if let Some(held) = state.per_ip.get_mut(&open.ip) {
                *held -= 1;
                if *held == 0 {
                    state.per_ip.remove(&open.ip);
                }
            }
        }
        drop(state);
        self.door.left.notify_one();
    }
}

impl Door {
    pub fn new() -> Arc<Door> {
        Arc::new(Door::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still sound.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Connections open and not being shed.
    #[cfg(test)]
    fn open(&self) -> usize {
        let state = self.lock();
        state.open.len() - state.leaving
    }

    /// Lets a connection from `ip` in: refused at once when its address is
    /// at the cap; at the listener's cap, waits until there is room, shedding
    /// the least-sent connection past [`GRACE`] when there is one (returned,
    /// to be logged and counted). Call for one connection at a time: the
    /// accept loop's order is the order of entry.
    pub async fn enter(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Limits,
    ) -> Result<(Pass, Option<Shed>), Refused> {
        let capped = !limits.unlimited.iter().any(|net| net.contains(&ip));
        let mut shed = None;
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let next_in_grace = {
                let mut state = self.lock();
                let held = state.per_ip.get(&ip).copied().unwrap_or(0);
                if capped && held >= limits.per_ip {
                    return Err(Refused::PerIp { held });
                }
                if state.open.len() - state.leaving < limits.total {
                    return Ok((self.admit(&mut state, ip), shed));
                }
                match state.least_sent() {
                    Ok(id) => {
                        shed = state.shed(id);
                        continue;
                    }
                    Err(next) => next,
                }
            };
            // Full of young connections: wait for one to leave or to age
            // out of its grace, whichever comes first.
            match next_in_grace {
                Some(at) => {
                    tokio::select! {
                        () = left => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => left.await,
            }
        }
    }

    fn admit(self: &Arc<Self>, state: &mut State, ip: IpAddr) -> Pass {
        let id = state.next;
        state.next += 1;
        let received = Arc::new(AtomicU64::new(0));
        let shed = CancellationToken::new();
        state.open.insert(
            id,
            Open {
                ip,
                since: clock::stopwatch(),
                received: received.clone(),
                shed: shed.clone(),
            },
        );
        *state.per_ip.entry(ip).or_default() += 1;
        Pass {
            door: self.clone(),
            id,
            received,
            shed,
        }
    }
}

impl State {
    /// The connection to shed: the fewest bytes received among those past
    /// their grace, the oldest of equals. Without one, when the first
    /// connection still in its grace leaves it (`None` if all are leaving).
    fn least_sent(&self) -> Result<u64, Option<Instant>> {
        let now = clock::stopwatch();
        let mut best: Option<(u64, Instant, u64)> = None;
        let mut first_out_of_grace: Option<Instant> = None;
        for (id, open) in &self.open {
            if open.shed.is_cancelled() {
                continue;
            }
            let out_of_grace = open.since + GRACE;
            if out_of_grace > now {
                first_out_of_grace = Some(first_out_of_grace.map_or(out_of_grace, |t| t.min(out_of_grace)));
                continue;
            }
            let received = open.received.load(Ordering::Relaxed);
            if best.is_none_or(|(r, since, _)| (received, open.since) < (r, since)) {
                best = Some((received, open.since, *id));
            }
        }
        best.map(|(_, _, id)| id).ok_or(first_out_of_grace)
    }

    fn shed(&mut self, id: u64) -> Option<Shed> {
        let open = self.open.get(&id)?;
        open.shed.cancel();
        let shed = Shed {
            ip: open.ip,
            received: open.received.load(Ordering::Relaxed),
            open_for: open.since.elapsed(),
        };
        self.leaving += 1;
        Some(shed)
    }
}

/// A connection's stream that counts the bytes read from it into its
/// [`Pass`], which is all the door knows of what a client sends.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    received: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, received: Arc<AtomicU64>) -> Counted<S> {
        Counted { inner, received }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = buf.filled().len().saturating_sub(before);
            self.received.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize, unlimited: &[&str]) -> Limits {
        Limits {
            total,
            per_ip,
            unlimited: unlimited.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_is_capped_and_others_are_not() {
        let door = Door::new();
        let l = limits(10, 2, &[]);
        let _a = door.enter(ip("192.0.2.1"), &l).await.unwrap();
        let b = door.enter(ip("192.0.2.1"), &l).await.unwrap();
        assert_eq!(
            door.enter(ip("192.0.2.1"), &l).await.unwrap_err(),
            Refused::PerIp { held: 2 }
        );
        let _c = door.enter(ip("192.0.2.2"), &l).await.unwrap();
        drop(b);
        assert!(
            door.enter(ip("192.0.2.1"), &l).await.is_ok(),
            "a slot freed is usable"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_proxies_are_not_capped() {
        let door = Door::new();
        let l = limits(10, 1, &["10.0.0.0/8"]);
        let passes: Vec<_> = enter_times(&door, ip("10.1.2.3"), &l, 5).await;
        assert_eq!(passes.len(), 5);
        assert_eq!(door.open(), 5);
    }

    async fn enter_times(door: &Arc<Door>, ip: IpAddr, l: &Limits, n: usize) -> Vec<Pass> {
        let mut passes = Vec::new();
        for _ in 0..n {
            passes.push(door.enter(ip, l).await.unwrap().0);
        }
        passes
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_least_sent_past_its_grace_is_shed() {
        let door = Door::new();
        let l = limits(3, 10, &[]);
        let (busy, _) = door.enter(ip("192.0.2.1"), &l).await.unwrap();
        let (dribbler, _) = door.enter(ip("192.0.2.2"), &l).await.unwrap();
        let (idle, _) = door.enter(ip("192.0.2.3"), &l).await.unwrap();
        busy.received.store(7_000, Ordering::Relaxed);
        dribbler.received.store(12, Ordering::Relaxed);
        idle.received.store(40, Ordering::Relaxed);
        tokio::time::advance(GRACE).await;
        let (_new, shed) = door.enter(ip("192.0.2.4"), &l).await.unwrap();
        let shed = shed.expect("someone made room");
        assert_eq!((shed.ip, shed.received), (ip("192.0.2.2"), 12));
        assert!(dribbler.shed.is_cancelled());
        assert!(!busy.shed.is_cancelled() && !idle.shed.is_cancelled());
        assert_eq!(door.open(), 3, "the shed one no longer counts");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_door_of_young_connections_waits_for_the_first_to_age() {
        let door = Door::new();
        let l = limits(1, 10, &[]);
        let (young, _) = door.enter(ip("192.0.2.1"), &l).await.unwrap();
        let started = clock::stopwatch();
        let (_new, shed) = door.enter(ip("192.0.2.2"), &l).await.unwrap();
        assert_eq!(started.elapsed(), GRACE, "waited exactly until the grace ended");
        assert_eq!(shed.map(|s| s.ip), Some(ip("192.0.2.1")));
        assert!(young.shed.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_door_lets_the_next_in_as_soon_as_one_leaves() {
        let door = Door::new();
        let l = limits(1, 10, &[]);
        let (first, _) = door.enter(ip("192.0.2.1"), &l).await.unwrap();
        let waiting = {
            let door = door.clone();
            let l = l.clone();
            tokio::spawn(async move { door.enter(ip("192.0.2.2"), &l).await.map(|(_, shed)| shed) })
        };
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(first);
        let shed = waiting.await.unwrap().unwrap();
        assert_eq!(shed, None, "room came from a connection leaving, not shedding");
    }

    #[tokio::test]
    async fn counted_streams_count_what_is_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let received = Arc::new(AtomicU64::new(0));
        let mut counted = Counted::new(server, received.clone());
        client.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = counted.read(&mut buf).await.unwrap();
        assert_eq!((n, received.load(Ordering::Relaxed)), (17, 17));
    }
}
