//! Types shared by the eBPF programs (`hvprof-ebpf`) and user space: the
//! event records the programs write into the ring buffer, the probe ids that
//! index per-probe counters, and the offsets user space resolves from the
//! running kernel's BTF and hands to the programs as read-only globals.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of pointers and padding
//! holes that differ between targets, so one byte layout serves the kernel
//! side (`bpfel-unknown-none`), user space and the on-disk event log.
#![no_std]

/// Length of a task's `comm`.
pub const COMM_LEN: usize = 16;

/// Size of the per-probe counter arrays (lost events, hits).
pub const MAX_PROBES: u32 = 64;

/// The task filter (`record --pid`, `--comm`): the `HVP_TASK_FILTER`
/// global's bits and the sizes of its sets.
pub mod task_filter {
    /// Keep tasks whose thread-group id is in `HVP_PIDS`.
    pub const PIDS: u32 = 1;
    /// Keep tasks whose name (`comm`) is in `HVP_COMMS`.
    pub const COMMS: u32 = 2;
    /// Keep tasks whose cgroup (v2 id) is in `HVP_CGROUPS`.
    pub const CGROUPS: u32 = 4;
    pub const MAX_PIDS: u32 = 1024;
    pub const MAX_COMMS: u32 = 64;
}

/// Probe ids: index into the per-probe counter maps and tag on every event.
/// Stable numbers: they are written into run directories.
pub mod probe {
    /// `sock:inet_sock_set_state`: TCP state changes of every socket.
    pub const SOCK_STATE: u16 = 0;
    /// perf-event CPU-clock sampling with kernel and user stacks.
    pub const CPU_SAMPLE: u16 = 1;
    /// `sched:sched_switch`: on-CPU time and run-queue delay per thread.
    pub const SCHED_SWITCH: u16 = 2;
    /// `sched:sched_wakeup` (and `sched_wakeup_new`): run-queue entry.
    pub const SCHED_WAKEUP: u16 = 3;
    /// `net:net_dev_start_xmit`: a packet is handed to a device's driver.
    pub const DEV_XMIT: u16 = 4;
    /// `net:netif_receive_skb`: a packet entered the stack from a device.
    pub const DEV_RECV: u16 = 5;
    /// Kernel function entries (kprobe or fentry), one program for all;
    /// the function is told by the event's instruction pointer.
    pub const FUNC: u16 = 6;
    /// `kvm:kvm_exit` and `kvm:kvm_entry`: time vCPUs spend exited.
    pub const KVM_EXIT: u16 = 7;
    pub const KVM_ENTRY: u16 = 8;
}

/// Per-vCPU-thread VM-exit accounting, aggregated in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuExits {
    pub exits: u64,
    /// Time from each exit to the next entry.
    pub exit_ns: u64,
    /// When the last exit happened (0: in the guest).
    pub last_exit_ns: u64,
}

/// Offset of `exit_reason` in the `kvm:kvm_exit` record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmTpOffsets {
    pub exit_reason: u32,
    pub _pad: u32,
}

/// Event kinds: what follows the [`EventHeader`].
pub mod kind {
    // 1 was one event per TCP state change, before socket lives were
    // aggregated in the kernel; retired.
    /// [`super::SampleEvent`]
    pub const CPU_SAMPLE: u16 = 2;
    /// [`super::DevPacketEvent`]
    pub const DEV_PACKET: u16 = 3;
    /// [`super::FuncEvent`]
    pub const FUNC: u16 = 4;
    /// [`super::SockLifeEvent`]
    pub const SOCK_LIFE: u16 = 5;
    /// [`super::SockLivesEvent`]: in the ring buffer only (the recorder
    /// writes each life as its own `SOCK_LIFE` record).
    pub const SOCK_LIVES: u16 = 6;
    /// [`super::DevPacketsEvent`]: in the ring buffer only (the recorder
    /// writes each packet as its own `DEV_PACKET` record).
    pub const DEV_PACKETS: u16 = 7;
}

/// A probed kernel function was entered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuncEvent {
    pub header: EventHeader,
    /// Address of the function (`bpf_get_func_ip`).
    pub ip: u64,
    /// First argument (often the `sk_buff` or the NAPI context).
    pub arg0: u64,
}

/// A TCP/IPv4 packet seen at a device boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevPacketEvent {
    pub header: EventHeader,
    pub skbaddr: u64,
    /// Inode number of the device's network namespace (0 if unknown).
    pub netns: u32,
    pub ifindex: u32,
    /// `skb->len`.
    pub len: u32,
    /// TCP sequence and acknowledgment numbers, host order.
    pub seq: u32,
    pub ack: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// TCP payload bytes (IP total length minus headers).
    pub payload: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// 0: transmitted by the device, 1: received from it.
    pub dir: u8,
    pub ifname: [u8; 16],
    /// Zero; makes the padding explicit, so every byte is written.
    pub _pad: u32,
}

/// Offsets for reading packets and devices, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevOffsets {
    pub skb_head: u32,
    /// `sk_buff.data`: on receive the IP header is there (the Ethernet
    /// header was pulled, `network_header` is not set yet).
    pub skb_data: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub dev_ifindex: u32,
    pub dev_name: u32,
    /// `net_device.nd_net` (a `possible_net_t` holding `struct net *`).
    pub dev_nd_net: u32,
    /// `net.ns.inum`.
    pub net_inum: u32,
    /// `skbaddr` and `len` in the `net_dev_start_xmit` record...
    pub tp_xmit_skbaddr: u32,
    pub tp_xmit_len: u32,
    /// ...and in the `netif_receive_skb` record.
    pub tp_recv_skbaddr: u32,
    pub tp_recv_len: u32,
    /// Non-zero when all of the above were resolved.
    pub valid: u32,
    /// Non-zero: only devices in the `HVP_DEVICES` map are traced.
    pub filter: u32,
    /// `sk_buff.len` (the raw-tracepoint programs read the length there;
    /// the classic ones have it in their record).
    pub skb_len: u32,
}

/// Frames kept per stack (kernel and user each).
pub const MAX_FRAMES: usize = 64;

/// One CPU sample: who was running and both stacks (innermost first).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleEvent {
    pub header: EventHeader,
    /// Bytes of `kstack` filled (`bpf_get_stack`'s result; negative on
    /// error, then treated as 0).
    pub kstack_bytes: i32,
    pub ustack_bytes: i32,
    pub kstack: [u64; MAX_FRAMES],
    pub ustack: [u64; MAX_FRAMES],
}

/// Per-thread scheduler accounting, aggregated in the kernel (map value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadStats {
    /// Thread-group id, when seen switching out (0 until then).
    pub tgid: u32,
    pub _pad: u32,
    /// Time on CPU.
    pub oncpu_ns: u64,
    /// Time runnable but waiting for a CPU.
    pub runq_ns: u64,
    /// When the thread last went on CPU (0: not on CPU).
    pub last_on_ns: u64,
    /// When the thread last became runnable (0: not waiting).
    pub last_enq_ns: u64,
    pub switches: u64,
    pub wakeups: u64,
    pub comm: [u8; COMM_LEN],
}

/// Per-CPU idle time (map value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuIdle {
    pub idle_ns: u64,
    pub idle_since_ns: u64,
}

/// Offsets in the `sched:sched_switch` and `sched:sched_wakeup` records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedTpOffsets {
    pub prev_comm: u32,
    pub prev_pid: u32,
    pub prev_state: u32,
    pub next_comm: u32,
    pub next_pid: u32,
    pub wakeup_pid: u32,
}

/// Offsets in `struct task_struct` for the raw-tracepoint scheduler
/// programs, from the running kernel's BTF. `valid == 0`: not resolved
/// (the classic tracepoint programs read their records instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.pid` (the thread id, i32).
    pub pid: u32,
    /// `task_struct.comm`.
    pub comm: u32,
    /// `task_struct.__state` (`state` before 5.14): an unsigned int.
    pub state: u32,
    pub valid: u32,
}

/// Common head of every event written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// One of [`kind`].
    pub kind: u16,
    /// One of [`probe`].
    pub probe: u16,
    /// CPU the program ran on.
    pub cpu: u32,
    /// Thread-group id (the user-visible pid) of the current task.
    pub pid: u32,
    /// Thread id of the current task.
    pub tid: u32,
    /// `comm` of the current task, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// State changes a [`SockLifeEvent`] keeps; a life with more keeps the
/// first `SOCK_STEPS - 1` and the last.
pub const SOCK_STEPS: usize = 8;

/// [`SockLifeEvent::flags`] bits.
pub mod sock_life {
    /// The life ended (the socket reached TCP_CLOSE); without it the socket
    /// was still open when the recording stopped.
    pub const CLOSED: u8 = 1;
    /// More than [`super::SOCK_STEPS`] state changes: middle ones dropped.
    pub const STEPS_DROPPED: u8 = 2;
}

/// One TCP socket's life (`sock:inet_sock_set_state`), aggregated in the
/// kernel: a map entry per socket collects each state change's time and
/// the whole life crosses to user space once, when the socket closes (or
/// when the recording stops). One event per endpoint instead of one per
/// state change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLifeEvent {
    /// `ts_ns`: the last state change; `pid`/`tid`/`comm`: the socket's
    /// owner — the task that connected or listened, for an accepted
    /// socket its listener's owner ([`SockOwner`]) — or, where that isn't
    /// known (a life that began before the recording, a listener not
    /// found), the first task with a pid seen changing its state.
    pub header: EventHeader,
    /// Kernel address of the `struct sock`: identifies one endpoint for its
    /// lifetime.
    pub skaddr: u64,
    /// `tcp_sock.bytes_received` at the end (0 if unknown on this kernel).
    pub bytes_received: u64,
    /// `tcp_sock.bytes_acked` at the end (0 if unknown).
    pub bytes_acked: u64,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// State changes recorded in `step_*` (at most [`SOCK_STEPS`]).
    pub steps: u8,
    /// [`sock_life`] bits.
    pub flags: u8,
    /// Local address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    /// Remote address: IPv4 in the first 4 bytes, or IPv6.
    pub daddr: [u8; 16],
    /// Time of each state change (`bpf_ktime_get_ns`).
    pub step_ns: [u64; SOCK_STEPS],
    /// TCP states before and after each change, as the kernel numbers them
    /// (TCP_ESTABLISHED = 1 ...).
    pub step_old: [u8; SOCK_STEPS],
    pub step_new: [u8; SOCK_STEPS],
}

/// An open socket's life as the kernel keeps it (a slot of the socket
/// table, or a value of its overflow map); it crosses to user space as a
/// [`SockLifeEvent`] ([`SockSlot::fill`]). Laid out for the state
/// changes: each touches only the first 64 bytes — the owner, the
/// counts, both states and (for the first four changes, all a connection
/// has by default) the time — and the slots are 192 bytes in a
/// page-aligned table, so that is one cache line, the one another CPU
/// last wrote. The rest is written once per life.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockSlot {
    /// Kernel address of the `struct sock` (0: a free slot).
    pub skaddr: u64,
    /// State changes recorded in `step_*` (at most [`SOCK_STEPS`]).
    pub steps: u8,
    /// [`sock_life`] bits, and [`SockSlot::TASK_SEEN`].
    pub flags: u8,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub step_old: [u8; SOCK_STEPS],
    pub step_new: [u8; SOCK_STEPS],
    pub step_ns: [u64; SOCK_STEPS],
    /// The socket's owner (see [`SockLifeEvent::header`]).
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub _pad: [u64; 5],
}

impl SockSlot {
    /// `flags` bit: `pid`, `tid` and `comm` are set (kept in the kernel).
    pub const TASK_SEEN: u8 = 0x80;
    /// `flags` bit: a socket the task filter left out at the first change
    /// seen (when its life began, unless before the recording), held so
    /// that its later changes are left out too (they often run on another
    /// task's time: the peer's, over loopback). Never sent.
    pub const IGNORED: u8 = 0x40;

    /// Writes this life into `life` as the event log stores it, but for
    /// the header's time and CPU and the byte counts, which the caller
    /// knows.
    #[inline(always)]
    pub fn fill(&self, life: &mut SockLifeEvent) {
        life.header.kind = kind::SOCK_LIFE;
        life.header.probe = probe::SOCK_STATE;
        life.header.pid = self.pid;
        life.header.tid = self.tid;
        life.skaddr = self.skaddr;
        life.family = self.family;
        life.sport = self.sport;
        life.dport = self.dport;
        life.steps = self.steps;
        life.flags = self.flags & !Self::TASK_SEEN;
        // SAFETY: fields of both, at offsets that are multiples of 8 in
        // 8-aligned structs (`layout_is_stable`).
        unsafe {
            copy_words(&mut life.header.comm, &self.comm);
            copy_words(&mut life.saddr, &self.saddr);
            copy_words(&mut life.daddr, &self.daddr);
            copy_words(&mut life.step_ns, &self.step_ns);
            copy_words(&mut life.step_old, &self.step_old);
            copy_words(&mut life.step_new, &self.step_new);
        }
    }
}

/// A listening TCP socket's local end, the key of its [`SockOwner`]: a
/// socket it accepts starts as a copy of it, so the accepted socket's
/// first state change (LISTEN to SYN_RECV) finds its owner by the same
/// key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Local port, host byte order.
    pub port: u16,
    /// The network namespace (its inode number; 0 where the kernel's
    /// offsets for it are unknown): the same address and port may listen
    /// in several.
    pub netns: u32,
    /// Local address as bound (zeros: any): IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

/// The process that listens on a [`ListenKey`], and so owns the sockets
/// it accepts: the handshake that makes one runs on whatever task its
/// packet came in on (the client, over loopback), not on the owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// Non-zero: the task filter keeps its sockets (always, without one).
    pub wanted: u32,
    pub _pad: u32,
}

/// Copies `*src` to `*dst` 8 bytes at a time. For the eBPF programs: the
/// BPF target turns a copy of a byte array (and some larger copies) into a
/// call to a `memmove` that moves one byte per turn of a loop; volatile
/// word moves stay what they are.
///
/// # Safety
/// Both 8-aligned, valid for `size_of::<T>()` bytes, a multiple of 8.
#[inline(always)]
pub unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: as the caller promised.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
}

/// Lives a [`SockLivesEvent`] carries at most.
pub const SOCK_BATCH: usize = 8;
/// Packets a [`DevPacketsEvent`] carries at most.
pub const DEV_BATCH: usize = 16;

/// Events of one kind that cross to user space together: a CPU gathers
/// them and sends them in one ring-buffer record (a reservation per event
/// cost a quarter of the socket program and about a third of the device
/// programs, the ring's lock and positions being shared by all CPUs).
/// Also the per-CPU map value they gather in. The record holds `count`
/// events, not always `N`; the recorder writes each as its own record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch<T, const N: usize> {
    /// `ts_ns`: when the record was sent; no task.
    pub header: EventHeader,
    /// Events in `items` (at most `N`).
    pub count: u32,
    pub _pad: u32,
    /// In the map: 1 while a program on this CPU changes the batch (one
    /// sending a waiting batch may interrupt the one adding to it).
    /// Meaningless in the ring.
    pub held: u64,
    /// When the first of them was added.
    pub first_ns: u64,
    pub items: [T; N],
}

impl<T: Copy + Default, const N: usize> Default for Batch<T, N> {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            count: 0,
            _pad: 0,
            held: 0,
            first_ns: 0,
            items: [T::default(); N],
        }
    }
}

/// Closed socket lives sent together ([`kind::SOCK_LIVES`]).
pub type SockLivesEvent = Batch<SockLifeEvent, SOCK_BATCH>;
/// Device packets sent together ([`kind::DEV_PACKETS`]).
pub type DevPacketsEvent = Batch<DevPacketEvent, DEV_BATCH>;

/// Bytes at the start of `sock_common` the raw-tracepoint socket program
/// reads in one go: the IPv4 addresses, both ports and family must lie in
/// them ([`SockOffsets`] is valid only then).
pub const SOCK_COMMON_HEAD: u32 = 24;

/// Offsets in `struct sock` for the raw-tracepoint socket program, from the
/// running kernel's BTF. `valid == 0`: not resolved (the program is then
/// not used; the classic tracepoint one reads its record instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sock_common.skc_daddr`, `skc_rcv_saddr` (IPv4, network order).
    pub daddr: u32,
    pub rcv_saddr: u32,
    /// `sock_common.skc_dport` and `inet_sock.inet_sport` (network
    /// order; `inet_sport` is read where `skc_num` is already 0, as when
    /// a socket closes without ever being established).
    pub dport: u32,
    pub sport: u32,
    /// `sock_common.skc_family`.
    pub family: u32,
    /// `sock_common.skc_v6_daddr`, `skc_v6_rcv_saddr`.
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    /// `sock.sk_protocol` (u16).
    pub protocol: u32,
    pub valid: u32,
    /// `sock_common.skc_num`: the local port in host order, while the
    /// socket holds one.
    pub num: u32,
    /// `sock_common.skc_net` (a `struct net *`) and, in `struct net`,
    /// `ns.inum`: the socket's network namespace, as `/proc/PID/ns/net`
    /// numbers it. Read for [`ListenKey::netns`] by both socket programs
    /// when `net_valid` is non-zero (kernels without network namespaces
    /// have no such fields).
    pub net: u32,
    pub net_inum: u32,
    pub net_valid: u32,
    pub _pad: u32,
}

/// Byte offsets inside the `sock:inet_sock_set_state` tracepoint record, read
/// by user space from `events/sock/inet_sock_set_state/format`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStateTpOffsets {
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

/// Offsets inside kernel structs, resolved from the running kernel's BTF.
/// A zero offset with `valid == 0` means "not available on this kernel".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `tcp_sock.bytes_received`
    pub tcp_bytes_received: u32,
    /// `tcp_sock.bytes_acked`
    pub tcp_bytes_acked: u32,
    /// Non-zero when the fields above were resolved.
    pub valid: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and byte arrays, no padding holes
    // that matter, valid for any bit pattern.
    unsafe impl aya::Pod for super::SockStateTpOffsets {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::SockLifeEvent {}
    unsafe impl<T: aya::Pod, const N: usize> aya::Pod for super::Batch<T, N> {}
    unsafe impl aya::Pod for super::SockSlot {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::SockOwner {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::ThreadStats {}
    unsafe impl aya::Pod for super::CpuIdle {}
    unsafe impl aya::Pod for super::SchedTpOffsets {}
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::DevOffsets {}
    unsafe impl aya::Pod for super::DevPacketEvent {}
    unsafe impl aya::Pod for super::FuncEvent {}
    unsafe impl aya::Pod for super::VcpuExits {}
    unsafe impl aya::Pod for super::KvmTpOffsets {}
}

/// Decoding helpers for user space (the ring buffer and the event log hand
/// out unaligned byte slices).
impl EventHeader {
    /// Reads a header from the start of `bytes`, if long enough.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        read_unaligned(bytes)
    }
}

impl SockLifeEvent {
    pub fn read(bytes: &[u8]) -> Option<Self> {
        read_unaligned(bytes)
    }

    /// The record as the event log stores it (a life read back from the
    /// kernel's map by user space).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: no padding holes (see `layout_is_stable`).
        unsafe { bytes_of(self) }
    }
}

/// The bytes of `v`.
///
/// # Safety
/// `T` is `#[repr(C)]` integers and byte arrays with no padding holes, so
/// every byte is initialised.
unsafe fn bytes_of<T>(v: &T) -> &[u8] {
    // SAFETY: as the caller promised.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) }
}

impl<T, const N: usize> Batch<T, N> {
    /// Offset of `items`.
    pub const ITEMS_AT: usize = core::mem::offset_of!(Self, items);

    /// The events a record of this kind carries, each as the event log
    /// stores it (a short or hostile record yields what it holds whole).
    pub fn items_in(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
        let at = core::mem::offset_of!(Self, count);
        let count = read_unaligned::<u32>(bytes.get(at..).unwrap_or_default()).unwrap_or(0);
        bytes
            .get(Self::ITEMS_AT..)
            .unwrap_or_default()
            .chunks_exact(core::mem::size_of::<T>())
            .take((count as usize).min(N))
    }
}

impl FuncEvent {
    pub fn read(bytes: &[u8]) -> Option<Self> {
        read_unaligned(bytes)
    }
}

impl DevPacketEvent {
    pub fn read(bytes: &[u8]) -> Option<Self> {
        read_unaligned(bytes)
    }

    /// The record as the event log stores it (a packet read back from the
    /// kernel's map by user space).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: no padding holes (see `layout_is_stable`).
        unsafe { bytes_of(self) }
    }
}

impl SampleEvent {
    pub fn read(bytes: &[u8]) -> Option<Self> {
        read_unaligned(bytes)
    }

    /// Kernel frames, innermost first.
    pub fn kernel_frames(&self) -> &[u64] {
        frames(&self.kstack, self.kstack_bytes)
    }

    /// User frames, innermost first.
    pub fn user_frames(&self) -> &[u64] {
        frames(&self.ustack, self.ustack_bytes)
    }
}

fn frames(stack: &[u64; MAX_FRAMES], bytes: i32) -> &[u64] {
    let n = if bytes > 0 { bytes as usize / 8 } else { 0 };
    &stack[..n.min(MAX_FRAMES)]
}

/// Copies a `T` out of the start of `bytes`; `None` when too short.
/// Only for the plain-old-data types of this crate.
fn read_unaligned<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a #[repr(C)] POD type of this crate, valid
    // for any bit pattern.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_lives_yields_only_the_whole_lives_it_claims() {
        let mut ev = SockLivesEvent {
            count: 3,
            ..Default::default()
        };
        for (i, l) in ev.items.iter_mut().enumerate() {
            l.skaddr = i as u64 + 1;
        }
        // SAFETY: a batch of lives has no padding holes
        // (`layout_is_stable`).
        let bytes = unsafe { bytes_of(&ev) };
        let addrs = |b: &[u8]| -> usize {
            SockLivesEvent::items_in(b)
                .map(|l| SockLifeEvent::read(l).map_or(0, |l| l.skaddr as usize))
                .sum()
        };
        assert_eq!(addrs(bytes), 1 + 2 + 3);
        // Cut inside the third life: two whole ones.
        let size = core::mem::size_of::<SockLifeEvent>();
        assert_eq!(
            addrs(&bytes[..SockLivesEvent::ITEMS_AT + 2 * size + 5]),
            1 + 2
        );
        // A count beyond the batch, or a record too short for its count.
        ev.count = u32::MAX;
        // SAFETY: as above.
        let bytes = unsafe { bytes_of(&ev) };
        assert_eq!(SockLivesEvent::items_in(bytes).count(), SOCK_BATCH);
        assert_eq!(SockLivesEvent::items_in(&bytes[..10]).count(), 0);
    }

    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::size_of::<EventHeader>(), 40);
        assert_eq!(SockLivesEvent::ITEMS_AT, 64);
        assert_eq!(DevPacketsEvent::ITEMS_AT, 64);
        // No padding holes: the fields' sizes add up to the whole.
        assert_eq!(
            core::mem::size_of::<DevPacketEvent>(),
            40 + 8 + 4 * 7 + 2 * 3 + 2 + 16 + 4
        );
        assert_eq!(
            core::mem::size_of::<SockLivesEvent>(),
            64 + SOCK_BATCH * core::mem::size_of::<SockLifeEvent>()
        );
        assert_eq!(
            core::mem::size_of::<SockLifeEvent>(),
            40 + 24 + 8 + 32 + 8 * SOCK_STEPS + 2 * SOCK_STEPS
        );
        // The slots' layout (see `SockSlot`); the fields `fill` copies by
        // words lie at multiples of 8.
        assert_eq!(core::mem::size_of::<SockSlot>(), 192);
        for at in [
            core::mem::offset_of!(SockSlot, comm),
            core::mem::offset_of!(SockSlot, saddr),
            core::mem::offset_of!(SockSlot, daddr),
            core::mem::offset_of!(SockSlot, step_ns),
            core::mem::offset_of!(SockSlot, step_old),
            core::mem::offset_of!(SockSlot, step_new),
            core::mem::offset_of!(SockLifeEvent, header) + core::mem::offset_of!(EventHeader, comm),
            core::mem::offset_of!(SockLifeEvent, saddr),
            core::mem::offset_of!(SockLifeEvent, daddr),
            core::mem::offset_of!(SockLifeEvent, step_ns),
            core::mem::offset_of!(SockLifeEvent, step_old),
            core::mem::offset_of!(SockLifeEvent, step_new),
        ] {
            assert_eq!(at % 8, 0, "{at}");
        }
        assert_eq!(core::mem::align_of::<SockLifeEvent>(), 8);
        assert_eq!(core::mem::align_of::<SockSlot>(), 8);
        assert_eq!(core::mem::offset_of!(SockSlot, step_ns), 32);
        assert_eq!(core::mem::offset_of!(SockSlot, pid), 96);
        // Hash keys without holes; the owner's comm, copied by words into
        // a slot, at a multiple of 8.
        assert_eq!(core::mem::size_of::<ListenKey>(), 24);
        assert_eq!(core::mem::size_of::<SockOwner>(), 32);
        assert_eq!(core::mem::offset_of!(SockOwner, comm), 8);
        assert_eq!(
            core::mem::size_of::<SampleEvent>(),
            40 + 8 + 2 * 8 * MAX_FRAMES
        );
    }
}
