//! How datagrams and tun packets reach the engines, in batches: read by the engine's own
//! task when the data path has one thread, or by a receive thread of their own with two or
//! more, so that the system calls and the tun's segmentation run beside the engines' crypto.
//! Either way the driver gets the same `Inbound` batches and hands each back when done, so
//! the buffers are reused and nothing is allocated per packet.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use dockvpn::datapath::offload::Packets;
use dockvpn::datapath::tun::{Tun, TunRead, READ_SCRATCH_LEN};
use dockvpn::datapath::udp::{BatchSocket, RxBatch};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::warn;

/// Datagrams one receive call takes at most.
const DATAGRAMS_PER_BATCH: usize = RxBatch::DEFAULT_SLOTS;
/// Tun packets (after segmentation) a batch collects before the engines get it.
const TUN_PACKETS_PER_BATCH: usize = 64;
/// Batches on their way to the engines: a little slack for bursts, bounded memory.
const BATCHES_IN_FLIGHT: usize = 2;
/// How often the receive thread looks at its stop flag when nothing arrives.
const STOP_CHECK_EVERY: Duration = Duration::from_millis(200);
/// The pause after a failed read: an error that persists costs a log line per pause, not a
/// busy core.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Spent batches on their way back: more than ever exist, so handing one back never waits.
const SPENT_SLOTS: usize = 3 * (BATCHES_IN_FLIGHT + 2);

/// One batch of input for the engines.
pub enum Inbound {
    OpenVpn(RxBatch),
    WireGuard(RxBatch),
    Tun(Packets),
}

/// The receiving ends of the data path, as the driver holds them for sending too.
pub struct Endpoints<'a> {
    pub openvpn: Option<&'a AsyncFd<Arc<BatchSocket>>>,
    pub wireguard: Option<&'a AsyncFd<Arc<BatchSocket>>>,
    pub tun: &'a AsyncFd<Arc<Tun>>,
}

/// The batches the engine task reads into; each is out with the driver while it is used.
pub struct InlineBatches {
    openvpn: Option<RxBatch>,
    wireguard: Option<RxBatch>,
    tun: Option<Packets>,
    tun_scratch: Box<[u8]>,
    malformed: Arc<AtomicU64>,
}

pub enum Reception {
    /// The engine task reads when the sockets or the tun are readable.
    Inline(Box<InlineBatches>),
    /// A receive thread reads and sends full batches over `batches`; spent ones go back.
    Threaded {
        batches: mpsc::Receiver<Inbound>,
        spent: std_mpsc::SyncSender<Inbound>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
        malformed: Arc<AtomicU64>,
    },
}

impl Reception {
    pub fn inline() -> io::Result<Reception> {
        Ok(Reception::Inline(Box::new(InlineBatches {
            openvpn: Some(RxBatch::new(DATAGRAMS_PER_BATCH)?),
            wireguard: Some(RxBatch::new(DATAGRAMS_PER_BATCH)?),
            tun: Some(Packets::new()),
            tun_scratch: vec![0; READ_SCRATCH_LEN].into_boxed_slice(),
            malformed: Arc::default(),
        })))
    }

    pub fn threaded(
        openvpn: Option<Arc<BatchSocket>>,
        wireguard: Option<Arc<BatchSocket>>,
        tun: Arc<Tun>,
    ) -> io::Result<Reception> {
        let (to_engines, batches) = mpsc::channel(BATCHES_IN_FLIGHT);
        // Bounded, so that handing batches back allocates nothing.
        let (spent, returned) = std_mpsc::sync_channel(SPENT_SLOTS);
        let stop = Arc::new(AtomicBool::new(false));
        let malformed = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("dockvpn-receive".into())
            .spawn({
                let stop = stop.clone();
                let malformed = malformed.clone();
                move || {
                    ReceiveThread {
                        openvpn,
                        wireguard,
                        tun,
                        to_engines,
                        returned,
                        spare: Spare::default(),
                        tun_scratch: vec![0; READ_SCRATCH_LEN].into_boxed_slice(),
                        malformed,
                        stop,
                    }
                    .run()
                }
            })?;
        Ok(Reception::Threaded {
            batches,
            spent,
            stop,
            thread: Some(thread),
            malformed,
        })
    }

    /// The next batch with something in it; None when the receive thread has ended (it
    /// logged why), and so nothing will arrive any more.
    pub async fn next(&mut self, endpoints: Endpoints<'_>) -> Option<Inbound> {
        match self {
            Reception::Threaded { batches, .. } => batches.recv().await,
            Reception::Inline(batches) => {
                let InlineBatches {
                    openvpn,
                    wireguard,
                    tun,
                    tun_scratch,
                    malformed,
                } = &mut **batches;
                let tun_reader = TunReader {
                    scratch: tun_scratch,
                    malformed,
                };
                Some(tokio::select! {
                    batch = receive_when_ready(endpoints.openvpn, openvpn) => Inbound::OpenVpn(batch),
                    batch = receive_when_ready(endpoints.wireguard, wireguard) => Inbound::WireGuard(batch),
                    packets = read_tun_when_ready(endpoints.tun, tun, tun_reader) => Inbound::Tun(packets),
                })
            }
        }
    }

    /// Takes a batch back for the next read.
    pub fn give_back(&mut self, inbound: Inbound) {
        match self {
            Reception::Threaded { spent, .. } => {
                // Never full (SPENT_SLOTS); if the thread has ended, the batch is dropped.
                let _ = spent.try_send(inbound);
            }
            Reception::Inline(batches) => match inbound {
                Inbound::OpenVpn(batch) => batches.openvpn = Some(batch),
                Inbound::WireGuard(batch) => batches.wireguard = Some(batch),
                Inbound::Tun(packets) => batches.tun = Some(packets),
            },
        }
    }

    /// Tun reads dropped as malformed (a bad virtio header or super-packet) so far.
    pub fn malformed_from_tun(&self) -> u64 {
        match self {
            Reception::Inline(batches) => batches.malformed.load(Ordering::Relaxed),
            Reception::Threaded { malformed, .. } => malformed.load(Ordering::Relaxed),
        }
    }

    pub fn threads(&self) -> usize {
        match self {
            Reception::Inline(_) => 1,
            Reception::Threaded { .. } => 2,
        }
    }
}

impl Drop for Reception {
    fn drop(&mut self) {
        if let Reception::Threaded {
            stop,
            thread,
            batches,
            ..
        } = self
        {
            stop.store(true, Ordering::Relaxed);
            // Wakes the thread if it waits to hand over a batch nobody will take.
            batches.close();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Waits for `socket` to be readable and receives one batch into the batch in `slot`
/// (taken out; the driver gives it back). Never returns without a socket.
async fn receive_when_ready(
    socket: Option<&AsyncFd<Arc<BatchSocket>>>,
    slot: &mut Option<RxBatch>,
) -> RxBatch {
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return std::future::pending().await;
        };
        let Some(batch) = slot.as_mut() else {
            return std::future::pending().await;
        };
        match socket.get_ref().recv_batch(batch) {
            Ok(0) => continue,
            Ok(_) => return slot.take().expect("checked above"),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
            Err(error) => {
                warn!(%error, "UDP receive failed");
                ready.clear_ready();
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

/// Waits for the tun to be readable and reads what it has, up to one batch.
async fn read_tun_when_ready(
    tun: &AsyncFd<Arc<Tun>>,
    slot: &mut Option<Packets>,
    mut reader: TunReader<'_>,
) -> Packets {
    loop {
        let Ok(mut ready) = tun.readable().await else {
            return std::future::pending().await;
        };
        let Some(packets) = slot.as_mut() else {
            return std::future::pending().await;
        };
        packets.clear();
        match reader.fill(tun.get_ref(), packets) {
            Ok(()) if !packets.is_empty() => return slot.take().expect("checked above"),
            Ok(()) => ready.clear_ready(),
            Err(error) => {
                warn!(%error, "tun read failed");
                ready.clear_ready();
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

/// What a tun read needs besides the tun: room for a whole super-packet, and where
/// malformed ones are counted.
struct TunReader<'a> {
    scratch: &'a mut [u8],
    malformed: &'a AtomicU64,
}

impl TunReader<'_> {
    /// Reads the tun until it has nothing more or the batch is full. WouldBlock is not an
    /// error.
    fn fill(&mut self, tun: &Tun, packets: &mut Packets) -> io::Result<()> {
        while packets.len() < TUN_PACKETS_PER_BATCH {
            match tun.read_into(self.scratch, packets) {
                Ok(TunRead::Appended(_)) => {}
                Ok(TunRead::Dropped(_)) => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if packets.is_empty() => return Err(error),
                // What was read goes on; the error comes back on the next read.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Port {
    OpenVpn,
    WireGuard,
}

#[derive(Default)]
struct Spare {
    openvpn: Vec<RxBatch>,
    wireguard: Vec<RxBatch>,
    tun: Vec<Packets>,
}

struct ReceiveThread {
    openvpn: Option<Arc<BatchSocket>>,
    wireguard: Option<Arc<BatchSocket>>,
    tun: Arc<Tun>,
    to_engines: mpsc::Sender<Inbound>,
    returned: std_mpsc::Receiver<Inbound>,
    spare: Spare,
    tun_scratch: Box<[u8]>,
    malformed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl ReceiveThread {
    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let ready = match self.wait_readable() {
                Ok(ready) => ready,
                Err(error) => {
                    warn!(%error, "the receive thread cannot wait for input; it stops");
                    return;
                }
            };
            while let Ok(inbound) = self.returned.try_recv() {
                match inbound {
                    Inbound::OpenVpn(batch) => self.spare.openvpn.push(batch),
                    Inbound::WireGuard(batch) => self.spare.wireguard.push(batch),
                    Inbound::Tun(packets) => self.spare.tun.push(packets),
                }
            }
            let [openvpn, wireguard, tun] = ready;
            if openvpn && !self.receive(Port::OpenVpn) {
                return;
            }
            if wireguard && !self.receive(Port::WireGuard) {
                return;
            }
            if tun && !self.read_tun() {
                return;
            }
        }
    }

    /// poll() over the three inputs: which are readable.
    fn wait_readable(&self) -> io::Result<[bool; 3]> {
        let fds = [
            self.openvpn.as_ref().map(|s| s.as_raw_fd()),
            self.wireguard.as_ref().map(|s| s.as_raw_fd()),
            Some(self.tun.as_raw_fd()),
        ];
        let mut polled: [libc::pollfd; 3] = fds.map(|fd| libc::pollfd {
            // A negative descriptor is skipped by poll().
            fd: fd.unwrap_or(-1 as RawFd),
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout = STOP_CHECK_EVERY.as_millis() as libc::c_int;
        // SAFETY: `polled` is a valid array of pollfd for the length passed.
        let result = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as _, timeout) };
        if result < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::Interrupted => Ok([false; 3]),
                _ => Err(error),
            };
        }
        Ok(polled.map(|p| p.revents != 0))
    }

    /// Receives one batch from the socket of `port` and hands it on; false when the engines
    /// are gone.
    fn receive(&mut self, port: Port) -> bool {
        let (socket, spare) = match port {
            Port::OpenVpn => (&self.openvpn, &mut self.spare.openvpn),
            Port::WireGuard => (&self.wireguard, &mut self.spare.wireguard),
        };
        let Some(socket) = socket else {
            return true;
        };
        let mut batch = match spare.pop() {
            Some(batch) => batch,
            None => match RxBatch::new(DATAGRAMS_PER_BATCH) {
                Ok(batch) => batch,
                Err(error) => {
                    warn!(%error, "no memory for a receive batch; the receive thread stops");
                    return false;
                }
            },
        };
        match socket.recv_batch(&mut batch) {
            Ok(received) if received > 0 => {
                let inbound = match port {
                    Port::OpenVpn => Inbound::OpenVpn(batch),
                    Port::WireGuard => Inbound::WireGuard(batch),
                };
                self.to_engines.blocking_send(inbound).is_ok()
            }
            Ok(_) => {
                spare.push(batch);
                true
            }
            Err(error) => {
                spare.push(batch);
                if error.kind() != io::ErrorKind::WouldBlock {
                    warn!(%error, "UDP receive failed");
                    std::thread::sleep(ERROR_PAUSE);
                }
                true
            }
        }
    }

    fn read_tun(&mut self) -> bool {
        let mut packets = self.spare.tun.pop().unwrap_or_default();
        packets.clear();
        let mut reader = TunReader {
            scratch: &mut self.tun_scratch,
            malformed: &self.malformed,
        };
        if let Err(error) = reader.fill(&self.tun, &mut packets) {
            warn!(%error, "tun read failed");
            std::thread::sleep(ERROR_PAUSE);
        }
        if packets.is_empty() {
            self.spare.tun.push(packets);
            return true;
        }
        self.to_engines.blocking_send(Inbound::Tun(packets)).is_ok()
    }
}
