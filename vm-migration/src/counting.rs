//! A stream wrapper that counts the bytes written to and read from the transport; its write
//! count is the migration report's `wire_bytes`.
//!
//! It also turns a write that came back short after blocking for the stall limit into a
//! timeout: a socket's send timeout counts per call, and a call that moved some bytes before the
//! peer stopped reading returns them after waiting the whole timeout, so without this a peer that
//! stalls is noticed only after two or three timeouts.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

/// Wraps a stream and counts bytes in both directions, through `Read`/`Write` and through
/// vm-memory's `ReadVolatile`/`WriteVolatile` alike. Adds no buffering.
#[derive(Debug)]
pub struct CountingStream<S> {
    inner: S,
    written: u64,
    read: u64,
    watch: Option<Arc<StreamWatch>>,
    stall_limit: Option<Duration>,
}

/// The most a watched stream writes of guest memory in one call, so that the count moves and a
/// stop takes effect every few milliseconds even when a range is gigabytes long.
pub const WATCH_CHUNK: usize = 4 << 20;

/// What another thread can see of and do to a [`CountingStream`] while it is in use: the bytes
/// written so far (updated once per write call, so per chunk of at most [`WATCH_CHUNK`], not
/// per page) and a stop switch that fails every later write, so a long transfer ends at the
/// next chunk.
#[derive(Debug, Default)]
pub struct StreamWatch {
    written: AtomicU64,
    stopped: AtomicBool,
}

impl StreamWatch {
    /// Bytes written through the watched stream so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Makes every later write fail with [`io::ErrorKind::ConnectionAborted`].
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Whether [`StreamWatch::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn before_write(&self) -> io::Result<()> {
        if self.is_stopped() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "stopped by request",
            ));
        }
        Ok(())
    }

    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl<S> CountingStream<S> {
    /// Wraps `inner` with both counters at zero.
    pub fn new(inner: S) -> Self {
        CountingStream {
            inner,
            written: 0,
            read: 0,
            watch: None,
            stall_limit: None,
        }
    }

    /// Makes a write that returns short after blocking for (90% of) `limit` or longer fail as
    /// timed out (the peer stopped taking data). Set it to the socket's send timeout.
    pub fn with_stall_limit(mut self, limit: Duration) -> Self {
        self.stall_limit = Some(limit);
        self
    }

    /// Counts `n` bytes written by a call that started at `started` and was given `wanted`.
    fn written_by(&mut self, n: usize, wanted: usize, started: Instant) -> io::Result<usize> {
        self.written += n as u64;
        match self.stall_limit {
            // The kernel's timer may end the call a little before `limit` by our clock.
            Some(limit) if n < wanted && started.elapsed() >= limit.mul_f64(0.9) => {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no progress for {limit:?}"),
                ))
            }
            _ => Ok(n),
        }
    }

    /// Lets `watch` follow the bytes written from now on and stop later writes.
    pub fn set_watch(&mut self, watch: Arc<StreamWatch>) {
        self.watch = Some(watch);
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Adds bytes written around the wrapper (for example by `sendmsg` with descriptors).
    pub fn record_written(&mut self, bytes: u64) {
        self.written += bytes;
        if let Some(w) = &self.watch {
            w.wrote(bytes as usize);
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably. Bytes moved through it directly are not counted.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Write> Write for CountingStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(w) = &self.watch {
            w.before_write()?;
        }
        let started = Instant::now();
        let n = self.inner.write(buf)?;
        if let Some(w) = &self.watch {
            w.wrote(n);
        }
        self.written_by(n, buf.len(), started)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<S: Read> Read for CountingStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl<S: WriteVolatile> WriteVolatile for CountingStream<S> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let started = Instant::now();
        let (n, wanted) = match &self.watch {
            Some(w) => {
                w.before_write().map_err(VolatileMemoryError::IOError)?;
                let part = buf.subslice(0, buf.len().min(WATCH_CHUNK))?;
                (self.inner.write_volatile(&part)?, part.len())
            }
            None => (self.inner.write_volatile(buf)?, buf.len()),
        };
        if let Some(w) = &self.watch {
            w.wrote(n);
        }
        self.written_by(n, wanted, started)
            .map_err(VolatileMemoryError::IOError)
    }
}

impl<S: ReadVolatile> ReadVolatile for CountingStream<S> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let n = self.inner.read_volatile(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl<S: AsFd> AsFd for CountingStream<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::send_ranges;
    use crate::ranges::{MemoryRange, MemoryRangeTable};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn counts_plain_and_volatile_io() {
        let mut s = CountingStream::new(Vec::new());
        s.write_all(b"header").unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(0x1000, 0x2000)]).unwrap();
        send_ranges(&mem, &table, &mut s).unwrap();
        s.record_written(10);
        assert_eq!(s.bytes_written(), 6 + 0x2000 + 10);
        assert_eq!(s.get_ref().len(), 6 + 0x2000);

        let data = s.into_inner();
        let mut r = CountingStream::new(data.as_slice());
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"header");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(r.bytes_read(), 6 + 0x2000);
        assert_eq!(r.bytes_written(), 0);
    }

    #[test]
    fn a_watch_follows_writes_and_stops_them() {
        let watch = Arc::new(StreamWatch::default());
        let mut s = CountingStream::new(Vec::new());
        s.write_all(b"before").unwrap();
        s.set_watch(watch.clone());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let table = MemoryRangeTable::from_ranges([MemoryRange::new(0, 0x3000)]).unwrap();
        send_ranges(&mem, &table, &mut s).unwrap();
        s.write_all(b"tail").unwrap();
        assert_eq!(watch.bytes_written(), 0x3000 + 4);
        // A range longer than a chunk goes out in chunks, all of it.
        let big = 3 * WATCH_CHUNK / 2;
        let mem2 = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), big)]).unwrap();
        let table2 = MemoryRangeTable::from_ranges([MemoryRange::new(0, big as u64)]).unwrap();
        let mut chunked = CountingStream::new(Vec::new());
        chunked.set_watch(Arc::new(StreamWatch::default()));
        assert_eq!(
            send_ranges(&mem2, &table2, &mut chunked).unwrap(),
            big as u64
        );
        assert_eq!(chunked.get_ref().len(), big);
        watch.stop();
        assert!(watch.is_stopped());
        let err = s.write_all(b"more").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(send_ranges(&mem, &table, &mut s).is_err());
        assert_eq!(s.bytes_written(), 6 + 0x3000 + 4);
    }

    /// Takes a little per call, then blocks for the whole call: what a socket does when the
    /// peer stops reading in the middle of a write.
    struct StallingWriter {
        delay: Duration,
    }

    impl Write for StallingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(self.delay);
            Ok(buf.len().min(3))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_short_write_after_the_stall_limit_is_a_timeout() {
        let slow = StallingWriter {
            delay: Duration::from_millis(30),
        };
        let mut s = CountingStream::new(slow).with_stall_limit(Duration::from_millis(20));
        let err = s.write_all(b"0123456789").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("no progress"), "{err}");
        assert_eq!(s.bytes_written(), 3);
        // Short writes that come quickly are just short writes.
        let quick = StallingWriter {
            delay: Duration::ZERO,
        };
        let mut s = CountingStream::new(quick).with_stall_limit(Duration::from_secs(5));
        s.write_all(b"0123456789").unwrap();
        assert_eq!(s.bytes_written(), 10);
        // Without a limit nothing changes.
        let slow = StallingWriter {
            delay: Duration::from_millis(1),
        };
        let mut s = CountingStream::new(slow);
        s.write_all(b"0123").unwrap();
    }
}
