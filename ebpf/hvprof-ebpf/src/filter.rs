//! Which tasks' events are wanted (`record --pid`, `--comm`, `--cgroup`):
//! sets of thread-group ids, thread names and cgroup ids, filled by user space before
//! attaching. Without any, every task is wanted.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::map,
    maps::HashMap,
};
use hvprof_common::{COMM_LEN, task_filter};

use crate::maps::write_current_comm;

/// `task_filter::PIDS | task_filter::COMMS`: which sets are in force.
#[unsafe(no_mangle)]
static HVP_TASK_FILTER: Global<u32> = Global::new(0);

#[map(name = "HVP_PIDS")]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(task_filter::MAX_PIDS, 0);

#[map(name = "HVP_COMMS")]
static COMMS: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(task_filter::MAX_COMMS, 0);

#[map(name = "HVP_CGROUPS")]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(task_filter::MAX_COMMS, 0);

/// Whether the current task's events are wanted.
#[inline(always)]
pub fn task_wanted() -> bool {
    let f = HVP_TASK_FILTER.load();
    if f == 0 {
        return true;
    }
    if f & task_filter::PIDS != 0 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // SAFETY: read-only lookup.
        if unsafe { PIDS.get(&tgid) }.is_some() {
            return true;
        }
    }
    if f & task_filter::COMMS != 0 {
        // Written whole by the helper (zero padded), not zeroed first: the
        // BPF target zeroes a byte array one byte per turn of a loop.
        let mut comm = core::mem::MaybeUninit::<[u8; COMM_LEN]>::uninit();
        // SAFETY: the helper writes all COMM_LEN bytes (zeros if it fails);
        // then a read-only lookup.
        if unsafe {
            write_current_comm(comm.as_mut_ptr());
            COMMS.get(comm.assume_init_ref())
        }
        .is_some()
        {
            return true;
        }
    }
    if f & task_filter::CGROUPS != 0 {
        // SAFETY: plain helper call.
        let id = unsafe { bpf_get_current_cgroup_id() };
        // SAFETY: read-only lookup.
        if unsafe { CGROUPS.get(&id) }.is_some() {
            return true;
        }
    }
    false
}
