//! `meta.json`: parsed and checked as every reader does, then used as the
//! readers use it (naming function-entry events, picking a guest's clock
//! offset) and written back, which must read again.

#![no_main]

use hvprof::{correlate, event, rundir::meta::Meta};
use hvprof_fuzz::{Header, func_event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let meta = match Meta::parse(data, "meta.json") {
        Ok(m) => m,
        Err(e) => {
            drop(format!("{e:#}"));
            return;
        }
    };
    // `hvprof dump`: function-entry events are named through `functions`,
    // the probe possibly a few bytes into the function.
    let ctx = event::Context::new(&meta.functions);
    let h = Header {
        ts_ns: meta.monotonic_start_ns,
        probe: hvprof_common::probe::FUNC,
        cpu: 0,
        pid: 1,
        tid: 1,
        comm: "fuzz",
    };
    for f in meta.functions.iter().take(16) {
        for delta in [0, 4, 63, 64] {
            let rec = func_event(&h, f.addr.wrapping_add(delta), 0);
            let ev = event::decode(&rec, &ctx);
            assert!(ev.is_ok(), "a whole func record decodes: {ev:?}");
        }
    }
    // `hvprof dump --guests`: each guest's offset from the host's meta.
    for v in meta.clock_offsets.iter().take(16) {
        if let Some(guest) = v.get("guest").and_then(|g| g.as_str()) {
            drop(correlate::best_offset(&meta.clock_offsets, guest));
        }
    }
    drop(correlate::best_offset(&meta.clock_offsets, "guest-0"));
    // The collector and the recorder write it back (`rundir::write_json`).
    let text = serde_json::to_vec_pretty(&meta);
    let text = match text {
        Ok(t) => t,
        Err(e) => panic!("a parsed meta.json must serialise: {e}"),
    };
    if let Err(e) = Meta::parse(&text, "rewritten meta.json") {
        panic!("what hvprof writes it must read back: {e:#}");
    }
});
