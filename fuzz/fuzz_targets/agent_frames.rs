//! The agent protocol's read side, as both ends run it on bytes from the
//! network: a stream of length-prefixed frames through `read_frame` (the
//! collector reading an agent, or an agent reading the collector), and
//! the input as one frame body through `Frame::decode`. Every frame read
//! goes through what its receiver does first: the challenge answered and
//! checked, an answer verified, a guest `meta.json` validated.

#![no_main]

use hvprof::{
    agent::proto::{self, Frame, NONCE_LEN},
    rundir::meta::Meta,
};
use hvprof_fuzz::ready;
use libfuzzer_sys::fuzz_target;

const TOKEN: &[u8] = b"fuzzing-token-0123456789";
const NONCE: [u8; NONCE_LEN] = [0x5a; NONCE_LEN];

fn receive(f: &Frame) {
    // Decoding is exact: what was read re-encodes to the same frame.
    let bytes = f.encode();
    match Frame::decode(&bytes[4..]) {
        Ok(back) => assert_eq!(&back, f),
        Err(e) => panic!("{} frame does not re-decode: {e}", f.name()),
    }
    match f {
        Frame::Challenge { nonce, .. } => {
            let answer = proto::mac(TOKEN, nonce);
            assert!(proto::verify(TOKEN, nonce, &answer).is_ok());
        }
        Frame::Auth { mac } => {
            let expected = proto::mac(TOKEN, &NONCE);
            assert_eq!(proto::verify(TOKEN, &NONCE, mac).is_ok(), *mac == expected);
        }
        Frame::Meta(m) | Frame::End(m) => drop(Meta::parse(m, "agent meta")),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    loop {
        match ready(proto::read_frame(&mut stream)) {
            Ok(f) => receive(&f),
            Err(e) => {
                drop(e.to_string());
                break;
            }
        }
    }
    if let Ok(f) = Frame::decode(data) {
        // Canonical: one encoding per frame.
        assert_eq!(&f.encode()[4..], data);
        receive(&f);
    }
});
