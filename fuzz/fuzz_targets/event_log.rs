//! `events.log` as `hvprof dump` reads it: the framed, checksummed log
//! reader, then every record it yields decoded and printed as JSON. The
//! input is also decoded as one bare record, so the decoder sees arbitrary
//! payloads without the fuzzer having to forge checksums first.

#![no_main]

use std::sync::OnceLock;

use hvprof::{
    attach::FunctionAddr,
    event,
    rundir::log::{LogError, LogReader, MAX_RECORD},
};
use libfuzzer_sys::fuzz_target;

/// Names for function-entry events, as a run's `meta.json` gives them.
fn context() -> &'static event::Context {
    static CTX: OnceLock<event::Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let f = |addr: u64, function: &str, probe: &str| FunctionAddr {
            addr,
            function: function.into(),
            probe: probe.into(),
        };
        event::Context::new(&[
            f(0xffff_ffff_c010_0000, "virtnet_poll", "virtio:virtnet_poll"),
            f(
                0xffff_ffff_8100_0000,
                "br_handle_frame",
                "bridge:br_handle_frame",
            ),
            f(0, "at_zero", "test:zero"),
            f(u64::MAX, "at_max", "test:max"),
        ])
    })
}

fn decode(record: &[u8]) {
    match event::decode(record, context()) {
        Ok(ev) => {
            let json = serde_json::to_vec(&ev);
            assert!(json.is_ok(), "a decoded event must print: {json:?}");
        }
        Err(e) => drop(e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = LogReader::new(data, "events.log") {
        // Where the next record starts, to check the reader against the
        // framing it documents.
        let mut at = 8usize;
        loop {
            match reader.next_record() {
                Ok(Some(rec)) => {
                    assert!(rec.len() <= MAX_RECORD as usize);
                    let framed = &data[at + 8..at + 8 + rec.len()];
                    assert_eq!(rec, framed, "record at byte {at}");
                    at += 8 + rec.len();
                    decode(rec);
                }
                Ok(None) => {
                    // A clean end consumed everything; a cut tail did not.
                    assert_eq!(reader.truncated_tail, at != data.len());
                    break;
                }
                Err(e @ LogError::Corrupt { .. }) => {
                    drop(e.to_string());
                    break;
                }
                Err(e) => panic!("unexpected error mid-log: {e}"),
            }
        }
    }
    decode(data);
});
