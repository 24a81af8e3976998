//! Socket layer: each TCP socket's life from `sock:inet_sock_set_state`,
//! aggregated in the kernel. An entry per socket collects the time of its
//! state changes (all of them with `--all-tcp-states`; by default not the
//! intermediate ones nothing reads); the whole life goes to user space
//! once, when the socket reaches TCP_CLOSE, in a batch of a CPU's closed
//! lives (`batch`; sockets still open are read from the maps when the
//! recording stops). A socket's entry is a slot of an array picked by a
//! hash of its address — claimed and freed by writing the address, found
//! without a bucket walk, nothing allocated — or, when another socket
//! holds that slot, an entry of a hash map. Two entry points feed it: the
//! raw tracepoint (arguments in registers, `struct sock` offsets from BTF)
//! and, where that can't be used, the classic tracepoint (its record's
//! offsets from tracefs). Nothing is compiled in for one kernel.
//!
//! A life's task is its owner's: the task that connects or listens, and
//! for an accepted socket the listener's owner (`HVP_LISTENERS`), since
//! the handshake that makes it runs on whatever task its packet came in
//! on (for a socket open before the recording, the owner of a listener
//! with its local end). The task filter decides once, when a life begins
//! (or at its first change seen).

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    helpers::{bpf_get_smp_processor_id, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use hvprof_common::{
    KernelOffsets, ListenKey, SOCK_STEPS, SockLifeEvent, SockLivesEvent, SockOffsets, SockOwner,
    SockSlot, SockStateTpOffsets, copy_words, probe, sock_life,
};

use crate::filter::task_wanted;
use crate::maps::{count_lost, current_comm_into, write_current_comm};

#[unsafe(no_mangle)]
static HVP_SOCK_STATE_TP: Global<SockStateTpOffsets> = Global::new(SockStateTpOffsets {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    sport: 0,
    dport: 0,
    family: 0,
    protocol: 0,
    saddr: 0,
    daddr: 0,
    saddr_v6: 0,
    daddr_v6: 0,
});

#[unsafe(no_mangle)]
static HVP_SOCK_OFFSETS: Global<SockOffsets> = Global::new(SockOffsets {
    daddr: 0,
    rcv_saddr: 0,
    dport: 0,
    sport: 0,
    family: 0,
    v6_daddr: 0,
    v6_rcv_saddr: 0,
    protocol: 0,
    valid: 0,
    num: 0,
    net: 0,
    net_inum: 0,
    net_valid: 0,
    _pad: 0,
});

#[unsafe(no_mangle)]
static HVP_KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    tcp_bytes_received: 0,
    tcp_bytes_acked: 0,
    valid: 0,
    _pad: 0,
});

/// Open socket lives, each in the slot its socket's address hashes to
/// (`skaddr` is the slot's owner; 0: free). User space sizes it at load
/// time and sets `HVP_SOCK_SLOT_COUNT` to match. Mappable only for the
/// page alignment that brings: each slot then starts a cache line.
#[map(name = "HVP_SOCK_SLOTS")]
static SLOTS: Array<SockSlot> = Array::with_max_entries(4096, BPF_F_MMAPABLE);

#[unsafe(no_mangle)]
static HVP_SOCK_SLOT_COUNT: Global<u32> = Global::new(4096);

/// Open socket lives whose slot another socket holds, by `struct sock`
/// address. User space sizes it; a socket that finds it full is counted
/// lost.
#[map(name = "HVP_SOCKS")]
static SOCKS: HashMap<u64, SockSlot> = HashMap::with_max_entries(61440, 0);

/// The owners of listening sockets, by local end: noted here when a
/// socket starts listening, and filled by user space with the listeners
/// open when the recording starts.
#[map(name = "HVP_LISTENERS")]
static LISTENERS: HashMap<ListenKey, SockOwner> = HashMap::with_max_entries(4096, 0);

/// Closed lives waiting to cross together, per CPU.
#[map(name = "HVP_SOCK_BATCH")]
static BATCH: PerCpuArray<SockLivesEvent> = PerCpuArray::with_max_entries(1, 0);

/// Non-zero: follow every state change. Zero (the default): skip the
/// changes nothing reads — into FIN_WAIT2, LAST_ACK and CLOSING, about a
/// fifth of a connection's — before any work. Set at load time.
#[unsafe(no_mangle)]
static HVP_SOCK_ALL_STATES: Global<u32> = Global::new(0);

/// One all-zero life, never written: the template of a new entry (a
/// zeroed value on the stack would cost a memset per socket).
#[map(name = "HVP_SOCK_ZERO")]
static ZERO: Array<SockSlot> = Array::with_max_entries(1, 0);

const IPPROTO_TCP: u16 = 6;
const AF_INET6: u16 = 10;
/// Bytes of `sock_common` read at once for the endpoints.
const COMMON_HEAD: usize = hvprof_common::SOCK_COMMON_HEAD as usize;
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;
const TCP_SYN_RECV: u8 = 3;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

/// Where a state change's details come from.
trait Source {
    /// Whether the socket is TCP (asked once per life).
    fn is_tcp(&self) -> bool;
    /// Family, ports and addresses.
    fn endpoints(&self, life: &mut SockSlot);
    /// The local end (but its namespace, see [`listen_key`]): a
    /// listener's, or an accepted socket's while it is still a copy of
    /// its listener (at LISTEN to SYN_RECV).
    fn local(&self) -> ListenKey;
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn hvp_sock_raw(ctx: RawTracePointContext) -> i32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    on_change(sk, old as u8, new as u8, &Sock(sk));
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn hvp_sock_state(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let off = HVP_SOCK_STATE_TP.load();
    let rec = Record(&ctx, off);
    let sk: u64 = rec.get(off.skaddr);
    let old: i32 = rec.get(off.oldstate);
    let new: i32 = rec.get(off.newstate);
    on_change(sk, old as u8, new as u8, &rec);
    0
}

/// Records one state change of socket `sk`; at TCP_CLOSE sends the life.
#[inline(always)]
fn on_change(sk: u64, old: u8, new: u8, src: &impl Source) {
    if sk == 0 {
        return;
    }
    if matches!(new, TCP_FIN_WAIT2 | TCP_LAST_ACK | TCP_CLOSING) && HVP_SOCK_ALL_STATES.load() == 0
    {
        return;
    }
    if new == TCP_LISTEN || (old == TCP_LISTEN && new == TCP_CLOSE) {
        listener(sk, src, new == TCP_LISTEN);
    }
    // A life starts from TCP_CLOSE (connect, listen) or, for a connection
    // a listener accepts, from LISTEN to SYN_RECV (the child is a copy of
    // the listener): no entry to look for, since every life's entry goes
    // at TCP_CLOSE. Any other change of a socket not followed yet is one
    // whose life began before the recording.
    let accepted = old == TCP_LISTEN && new == TCP_SYN_RECV;
    let fresh = old == TCP_CLOSE || accepted;
    let slot = slot_of(sk);
    let found = if fresh { None } else { find(sk, slot) };
    let ptr = match found {
        Some(p) => p,
        None => match begin(sk, slot, src, fresh, accepted) {
            Some(p) => p,
            None => return,
        },
    };
    // SAFETY: a map value; a socket's state changes are serialised by the
    // socket's lock, so no other CPU writes this entry meanwhile.
    let life = unsafe { &mut *ptr };
    if life.flags & SockSlot::IGNORED != 0 {
        if new == TCP_CLOSE {
            free(sk, slot, ptr);
        }
        return;
    }
    // Read once the socket is known to be followed (not for sockets the
    // task filter leaves out).
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = life.steps as usize;
    if i < SOCK_STEPS {
        life.steps += 1;
    } else {
        life.flags |= sock_life::STEPS_DROPPED;
        i = SOCK_STEPS - 1;
    }
    if let (Some(t), Some(o), Some(n)) = (
        life.step_ns.get_mut(i),
        life.step_old.get_mut(i),
        life.step_new.get_mut(i),
    ) {
        *t = now;
        *o = old;
        *n = new;
    }
    if life.flags & SockSlot::TASK_SEEN == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        life.pid = (pid_tgid >> 32) as u32;
        life.tid = pid_tgid as u32;
        current_comm_into(&mut life.comm);
        if life.pid != 0 {
            life.flags |= SockSlot::TASK_SEEN;
        }
    }
    // The 4-tuple is final once established (a client's port is chosen
    // after SYN_SENT); a life that never got there takes it at the end.
    if new == TCP_ESTABLISHED || (new == TCP_CLOSE && life.family == 0) {
        src.endpoints(life);
    }
    if new == TCP_CLOSE {
        life.flags |= sock_life::CLOSED;
        send(life, sk, now);
        free(sk, slot, ptr);
    }
}

/// Frees `sk`'s entry `ptr` (its life is out, or was never followed).
#[inline(always)]
fn free(sk: u64, slot: Option<*mut SockSlot>, ptr: *mut SockSlot) {
    if slot == Some(ptr) {
        // After the life's last read (the helper calls come first).
        // SAFETY: this socket's slot, an aligned u64 (stored whole).
        unsafe { core::ptr::write_volatile(&raw mut (*ptr).skaddr, 0) };
    } else {
        let _ = SOCKS.remove(sk);
    }
}

/// A socket starts listening (`on`, in the `listen` call: the current
/// task owns it) or stops: notes or forgets its owner.
#[inline(always)]
fn listener(sk: u64, src: &impl Source, on: bool) {
    if !src.is_tcp() {
        return;
    }
    let key = listen_key(sk, src);
    if key.port == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if !on {
        // Only its owner's closing forgets it (another process may have
        // taken the port over since).
        // SAFETY: read-only lookup.
        if unsafe { LISTENERS.get(&key) }.is_some_and(|o| o.pid == pid) {
            let _ = LISTENERS.remove(&key);
        }
        return;
    }
    let mut owner = core::mem::MaybeUninit::<SockOwner>::uninit();
    let p = owner.as_mut_ptr();
    // SAFETY: every field written before the value is read.
    let owner = unsafe {
        (*p).pid = pid;
        (*p).tid = pid_tgid as u32;
        write_current_comm(&raw mut (*p).comm);
        (*p).wanted = u32::from(task_wanted());
        (*p)._pad = 0;
        owner.assume_init()
    };
    let _ = LISTENERS.insert(&key, &owner, 0);
}

/// Sends the closed life of `sk`: through this CPU's batch, or alone.
#[inline(always)]
fn send(life: &SockSlot, sk: u64, now: u64) {
    crate::batch::emit(batch(), now, probe::SOCK_STATE, |slot| {
        closed(life, slot, sk, now)
    });
}

/// This CPU's batch of closed lives.
#[inline(always)]
pub fn batch() -> Option<*mut SockLivesEvent> {
    BATCH.get_ptr_mut(0)
}

/// The event of `sk`'s life, closed `now`: its header's time is the last
/// change's (user space sets it for lives still open at the end).
#[inline(always)]
fn closed(life: &SockSlot, out: &mut SockLifeEvent, sk: u64, now: u64) {
    life.fill(out);
    out.header.ts_ns = now;
    // SAFETY: plain helper call.
    out.header.cpu = unsafe { bpf_get_smp_processor_id() };
    bytes(sk, out);
}

/// The slot `sk` hashes to (multiplicative hashing, then a multiply-shift
/// onto the slot count).
#[inline(always)]
fn slot_of(sk: u64) -> Option<*mut SockSlot> {
    let h = sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let i = (h * u64::from(HVP_SOCK_SLOT_COUNT.load())) >> 32;
    SLOTS.get_ptr_mut(i as u32)
}

/// The life of a followed `sk`: in its slot, or else in the hash map.
#[inline(always)]
fn find(sk: u64, slot: Option<*mut SockSlot>) -> Option<*mut SockSlot> {
    if let Some(p) = slot {
        // SAFETY: a slot of `SLOTS`, its owner an aligned u64 (read
        // whole).
        if unsafe { core::ptr::read_volatile(&raw const (*p).skaddr) } == sk {
            return Some(p);
        }
    }
    SOCKS.get_ptr_mut(sk)
}

/// Takes `slot` for `sk` if it is free (or already `sk`'s). The BPF
/// target's `AtomicU64` has no compare-exchange; the intrinsic is the
/// instruction itself (BPF_CMPXCHG). Owners are otherwise read and
/// written as plain aligned words: only this exchange must decide
/// between CPUs.
#[inline(always)]
fn claim(sk: u64, slot: *mut SockSlot) -> bool {
    use core::intrinsics::{AtomicOrdering, atomic_cxchg};
    // SAFETY: an aligned u64 of a slot of `SLOTS`; the exchange decides
    // between CPUs.
    let (owner, _) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::AcqRel }, { AtomicOrdering::Relaxed }>(
            &raw mut (*slot).skaddr,
            0,
            sk,
        )
    };
    owner == 0 || owner == sk
}

/// Socket `sk`'s local end with its network namespace, when this
/// kernel's offsets for it are known (else namespace 0, as user space then
/// fills in too).
#[inline(always)]
fn listen_key(sk: u64, src: &impl Source) -> ListenKey {
    let mut key = src.local();
    let off = HVP_SOCK_OFFSETS.load();
    if off.net_valid != 0 {
        let sock = Sock(sk);
        let net: u64 = sock.read(off.net);
        key.netns = Sock(net).read(off.net_inum);
    }
    key
}

/// The owner of the listener that accepted `sk`, a socket whose life began
/// before the recording, if a listener has its local end: bound to its
/// address, or to the wildcard one. (Its first change seen here may run
/// on another task's time: the peer's FIN, say, arriving over loopback.)
/// No client socket shares a local end with a listener.
#[inline(always)]
fn accepted_before(sk: u64, src: &impl Source) -> Option<&'static SockOwner> {
    let mut key = listen_key(sk, src);
    if key.port == 0 {
        return None;
    }
    // SAFETY: read-only lookups; an aligned write within the key.
    unsafe {
        LISTENERS.get(&key).or_else(|| {
            // As words, each written on its own: the compiler makes a
            // memset of a zeroed array (even of words), which this target
            // runs a byte at a time. `addr` lies at offset 8 of the
            // 4-aligned `#[repr(C)]` key.
            let words = key.addr.as_mut_ptr().cast::<u32>();
            for i in 0..4 {
                words.add(i).write_volatile(0);
            }
            LISTENERS.get(&key)
        })
    }
}

/// A new entry for TCP socket `sk`: its slot, or an entry of the hash
/// map if another socket holds the slot. For a wanted socket (its owner's
/// task passes the filter), a life to follow; for one the filter leaves
/// out, an entry marked [`SockSlot::IGNORED`], so that the filter decides
/// once, at the first change seen (the start of its life unless that was
/// before the recording). An `accepted` socket's owner is its listener's,
/// when known; so is, for a socket not `fresh`, a listener's with its
/// local end.
#[inline(always)]
fn begin(
    sk: u64,
    slot: Option<*mut SockSlot>,
    src: &impl Source,
    fresh: bool,
    accepted: bool,
) -> Option<*mut SockSlot> {
    if !src.is_tcp() {
        return None;
    }
    let owner = if accepted {
        // SAFETY: read-only lookup.
        unsafe { LISTENERS.get(&listen_key(sk, src)) }
    } else if !fresh {
        accepted_before(sk, src)
    } else {
        None
    };
    let wanted = owner.map_or_else(task_wanted, |o| o.wanted != 0);
    let p = match slot {
        Some(p) if claim(sk, p) => p,
        _ => {
            let zero = ZERO.get(0)?;
            let _ = SOCKS.insert(sk, zero, u64::from(BPF_NOEXIST));
            let Some(p) = SOCKS.get_ptr_mut(sk) else {
                // The map is full (a loss only for a life to follow).
                if wanted {
                    count_lost(probe::SOCK_STATE);
                }
                return None;
            };
            p
        }
    };
    // A slot keeps its last life's contents (and a hash entry may be
    // stale): clear what a life reads before it writes it.
    // SAFETY: the entry this socket now owns; see `on_change`.
    unsafe {
        (*p).skaddr = sk;
        (*p).steps = 0;
        (*p).flags = if wanted { 0 } else { SockSlot::IGNORED };
        (*p).family = 0;
        if let Some(o) = owner.filter(|_| wanted) {
            (*p).pid = o.pid;
            (*p).tid = o.tid;
            copy_words(&raw mut (*p).comm, &raw const o.comm);
            (*p).flags |= SockSlot::TASK_SEEN;
        }
    }
    Some(p)
}

/// `tcp_sock` byte counters, when this kernel's offsets are known (else 0).
#[inline(always)]
fn bytes(sk: u64, life: &mut SockLifeEvent) {
    let k = HVP_KERNEL_OFFSETS.load();
    if k.valid == 0 {
        life.bytes_received = 0;
        life.bytes_acked = 0;
        return;
    }
    let base = sk as *const u8;
    // SAFETY: kernel pointer from the tracepoint; probe_read tolerates
    // faults.
    unsafe {
        life.bytes_received =
            bpf_probe_read_kernel(base.add(k.tcp_bytes_received as usize).cast::<u64>())
                .unwrap_or(0);
        life.bytes_acked =
            bpf_probe_read_kernel(base.add(k.tcp_bytes_acked as usize).cast::<u64>()).unwrap_or(0);
    }
}

/// The socket itself (raw tracepoint), read at `HVP_SOCK_OFFSETS`.
struct Sock(u64);

impl Sock {
    #[inline(always)]
    fn read<T: Default>(&self, off: u32) -> T {
        // SAFETY: kernel pointer from the tracepoint, offsets from this
        // kernel's BTF; probe_read tolerates faults.
        unsafe { bpf_probe_read_kernel((self.0 as *const u8).add(off as usize).cast::<T>()) }
            .unwrap_or_default()
    }
}

impl Sock {
    /// The head of `sock_common` in one read: IPv4 addresses, ports and
    /// family lie within its first 24 bytes (user space checks this
    /// kernel's offsets before choosing this program).
    #[inline(always)]
    fn head(&self) -> [u8; COMMON_HEAD] {
        // Read as words: the default of a byte array would be zeroed one
        // byte at a time in a loop on this target.
        let words: [u64; COMMON_HEAD / 8] = self.read(0);
        // SAFETY: same size, any bit pattern is valid.
        unsafe { core::mem::transmute(words) }
    }

    /// The local port in host order: `inet_num`, or `inet_sport` once the
    /// kernel has let go of the port, as it has at the change to TCP_CLOSE
    /// (before the tracepoint runs) for a port not bound explicitly: a
    /// connecting socket's, a listener's bound to port 0.
    #[inline(always)]
    fn local_port(&self, head: &[u8; COMMON_HEAD]) -> u16 {
        let off = HVP_SOCK_OFFSETS.load();
        match u16_at(head, off.num) {
            0 => u16::from_be(self.read(off.sport)),
            port => port,
        }
    }
}

/// An IPv4 address in the first 4 bytes of 16, made of words (a byte
/// array would be zeroed a byte at a time on this target).
#[inline(always)]
fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    let words = [u64::from_ne_bytes([a[0], a[1], a[2], a[3], 0, 0, 0, 0]), 0];
    // SAFETY: same size, any bit pattern is valid.
    unsafe { core::mem::transmute(words) }
}

/// Byte `o` of a `sock_common` head and the next, as one `u16` (`o`
/// wrapped into the head: the verifier sees the bound).
#[inline(always)]
fn u16_at(head: &[u8; COMMON_HEAD], o: u32) -> u16 {
    let at = o as usize % COMMON_HEAD;
    u16::from_ne_bytes([head[at], head[(at + 1) % COMMON_HEAD]])
}

impl Source for Sock {
    #[inline(always)]
    fn is_tcp(&self) -> bool {
        let off = HVP_SOCK_OFFSETS.load();
        off.valid != 0 && self.read::<u16>(off.protocol) == IPPROTO_TCP
    }

    #[inline(always)]
    fn local(&self) -> ListenKey {
        let off = HVP_SOCK_OFFSETS.load();
        let head = self.head();
        let family = u16_at(&head, off.family);
        let addr = if family == AF_INET6 {
            self.read(off.v6_rcv_saddr)
        } else {
            let b = |i: usize| head[(off.rcv_saddr as usize % COMMON_HEAD + i) % COMMON_HEAD];
            v4_in_16([b(0), b(1), b(2), b(3)])
        };
        ListenKey {
            family,
            port: self.local_port(&head),
            netns: 0,
            addr,
        }
    }

    #[inline(always)]
    fn endpoints(&self, life: &mut SockSlot) {
        let off = HVP_SOCK_OFFSETS.load();
        let head = self.head();
        let at = |o: u32| o as usize % COMMON_HEAD;
        let u16_at = |o: u32| u16_at(&head, o);
        life.family = u16_at(off.family);
        life.dport = u16::from_be(u16_at(off.dport));
        life.sport = self.local_port(&head);
        if life.family == AF_INET6 {
            life.saddr = self.read(off.v6_rcv_saddr);
            life.daddr = self.read(off.v6_daddr);
        } else {
            for i in 0..4 {
                life.saddr[i] = head[(at(off.rcv_saddr) + i) % COMMON_HEAD];
                life.daddr[i] = head[(at(off.daddr) + i) % COMMON_HEAD];
            }
        }
    }
}

/// The classic tracepoint's record, read at `HVP_SOCK_STATE_TP`.
struct Record<'a>(&'a TracePointContext, SockStateTpOffsets);

impl Record<'_> {
    #[inline(always)]
    fn get<T: Default>(&self, off: u32) -> T {
        // SAFETY: offsets from this kernel's tracepoint format.
        unsafe { self.0.read_at::<T>(off as usize) }.unwrap_or_default()
    }
}

impl Source for Record<'_> {
    #[inline(always)]
    fn is_tcp(&self) -> bool {
        self.get::<u16>(self.1.protocol) == IPPROTO_TCP
    }

    #[inline(always)]
    fn local(&self) -> ListenKey {
        let off = &self.1;
        let family: u16 = self.get(off.family);
        let addr = if family == AF_INET6 {
            self.get(off.saddr_v6)
        } else {
            v4_in_16(self.get::<u32>(off.saddr).to_ne_bytes())
        };
        ListenKey {
            family,
            port: self.get(off.sport),
            netns: 0,
            addr,
        }
    }

    #[inline(always)]
    fn endpoints(&self, life: &mut SockSlot) {
        let off = &self.1;
        life.family = self.get(off.family);
        life.sport = self.get(off.sport);
        life.dport = self.get(off.dport);
        if life.family == AF_INET6 {
            life.saddr = self.get(off.saddr_v6);
            life.daddr = self.get(off.daddr_v6);
        } else {
            let s: u32 = self.get(off.saddr);
            let d: u32 = self.get(off.daddr);
            life.saddr[..4].copy_from_slice(&s.to_ne_bytes());
            life.daddr[..4].copy_from_slice(&d.to_ne_bytes());
        }
    }
}
