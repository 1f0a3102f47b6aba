//! What the sans-IO engines hand their driver, in one shape for both transports, and the
//! free list their output buffers come from.

/// `To` is where a datagram goes (OpenVPN: a `Link`; WireGuard: a socket address), `Event`
/// the engine's connect and disconnect news.
#[derive(Debug)]
pub enum Output<To, Event> {
    Transmit { to: To, datagram: Vec<u8> },
    Tun(Vec<u8>),
    Event(Event),
}

/// The buffers an engine's `Transmit` and `Tun` outputs are made in. The driver owns each
/// output until it has sent or written it, then hands the buffer back (`recycle` on the
/// engine), so that in steady state a packet costs no allocation either way.
#[derive(Debug)]
pub struct BufferPool {
    free: Vec<Vec<u8>>,
}

impl BufferPool {
    /// Free buffers kept at most (a burst of outputs handed back at once frees the rest):
    /// bounds what the pool holds to about half a MiB of full-datagram buffers.
    pub const MAX_FREE: usize = 256;
    /// A new buffer holds a whole datagram: a 1500-byte packet and either protocol's
    /// overhead. A larger packet grows its buffer, which is kept up to MAX_KEPT_CAPACITY.
    pub const CAPACITY: usize = 2048;
    /// Larger buffers are dropped: 256 kept ones stay under 2 MiB.
    pub const MAX_KEPT_CAPACITY: usize = 8192;

    pub fn new() -> BufferPool {
        // Reserved up front, so that filling the list never allocates either.
        BufferPool {
            free: Vec::with_capacity(Self::MAX_FREE),
        }
    }

    /// An empty buffer with room for a whole datagram.
    pub fn take(&mut self) -> Vec<u8> {
        let mut buffer = self.reused();
        buffer.clear();
        buffer
    }

    /// A buffer of `len` bytes for a callee that writes its output at the start and says how
    /// long it is: the bytes are left from earlier use (not zeroed again), and the caller
    /// truncates to what was written.
    pub fn take_len(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.reused();
        buffer.resize(len, 0);
        buffer
    }

    /// A buffer holding a copy of `bytes`, for what is not made in place.
    pub fn copy_of(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buffer = self.take();
        buffer.extend_from_slice(bytes);
        buffer
    }

    /// Keeps `buffer` for reuse, unless the list is full, or the buffer is too small to hold
    /// a datagram without growing (the driver may hand back buffers it did not get from
    /// here), or grew for one rare large packet (kept, it would hold its memory for good).
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if self.free.len() < Self::MAX_FREE
            && (Self::CAPACITY..=Self::MAX_KEPT_CAPACITY).contains(&capacity)
        {
            self.free.push(buffer);
        }
    }

    fn reused(&mut self) -> Vec<u8> {
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::CAPACITY))
    }
}

impl Default for BufferPool {
    fn default() -> BufferPool {
        BufferPool::new()
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    #[test]
    fn a_recycled_buffer_comes_back_empty_or_at_the_asked_length() {
        let mut pool = BufferPool::new();
        let mut buffer = pool.take();
        assert!(buffer.is_empty() && buffer.capacity() >= BufferPool::CAPACITY);
        buffer.extend_from_slice(&[7; 100]);
        let address = buffer.as_ptr();
        pool.recycle(buffer);
        let again = pool.take();
        assert_eq!((again.as_ptr(), again.len()), (address, 0));
        pool.recycle(again);
        assert_eq!(pool.take_len(40).len(), 40);
    }

    #[test]
    fn small_buffers_and_buffers_past_the_limit_are_dropped() {
        let mut pool = BufferPool::new();
        pool.recycle(Vec::with_capacity(16));
        assert!(pool.free.is_empty());
        for _ in 0..BufferPool::MAX_FREE + 10 {
            pool.recycle(Vec::with_capacity(BufferPool::CAPACITY));
        }
        assert_eq!(pool.free.len(), BufferPool::MAX_FREE);
        assert_eq!(pool.free.capacity(), BufferPool::MAX_FREE);
    }
}
