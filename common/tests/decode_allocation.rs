//! A length claim inside a small frame allocates nothing beyond the frame: the attack of a peer
//! that sends 20 bytes claiming a 250 MB string, so that the receiver allocates (and zeroes)
//! 250 MB before decoding fails, flood after flood.
//!
//! The allocator of this test binary counts every byte allocated; the test fails if decoding any
//! of the bombs allocated more than a few kilobytes in all. (One test in this binary, so that no
//! other test's allocations are counted.)

use std::alloc::System;

use cohort_common::wire::{decode_frame, decode_payload, ClientMsg, ServerMsg, TensorBytes, PROTOCOL_VERSION};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The bytes `f` allocated (and reallocated).
fn bytes_allocated(f: impl FnOnce()) -> usize {
    let region = Region::new(ALLOCATOR);
    f();
    let change = region.change();
    change.bytes_allocated + change.bytes_reallocated.max(0) as usize
}

/// bincode's variable-length integer: one byte below 251, else a marker and the value.
fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [vec![251], (n as u16).to_le_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![252], (n as u32).to_le_bytes().to_vec()].concat(),
        _ => [vec![253], n.to_le_bytes().to_vec()].concat(),
    }
}

fn payload(body: &[u8]) -> Vec<u8> {
    [PROTOCOL_VERSION.to_be_bytes().to_vec(), body.to_vec()].concat()
}

/// The messages of the attack: a hello whose device string claims 250 MB, a decline whose
/// reason does, an update whose tensor bytes do, and a bare byte vector claiming 2^40.
fn bombs() -> Vec<(&'static str, Vec<u8>)> {
    let claim = 250_000_000;
    vec![
        ("hello", payload(&[varint(0), varint(claim), b"abc".to_vec()].concat())),
        ("decline", payload(&[varint(2), varint(7), varint(claim), b"no".to_vec()].concat())),
        // Update { round, samples, delta: TensorBytes(bytes) , .. }
        ("update", payload(&[varint(1), varint(7), varint(600), varint(claim), vec![0; 4]].concat())),
        ("tensor", payload(&[varint(1 << 40), vec![1, 2, 3]].concat())),
    ]
}

#[test]
fn a_length_claim_allocates_nothing_beyond_its_frame() {
    for (what, payload) in bombs() {
        assert!(payload.len() <= 20, "{what}: {} bytes", payload.len());
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        let mut errors = Vec::new();
        let allocated = bytes_allocated(|| {
            if what == "tensor" {
                errors.push(decode_payload::<TensorBytes>(&payload).unwrap_err());
            } else {
                errors.push(decode_frame::<ClientMsg>(&frame, 64 << 10).unwrap_err());
            }
            errors.push(decode_payload::<ServerMsg>(&payload).unwrap_err());
        });
        assert!(allocated <= 4096, "{what}: decoding a {}-byte payload allocated {allocated} bytes", payload.len());
        if what != "tensor" {
            assert!(errors[0].to_string().contains("claims more than"), "{what}: {}", errors[0]);
        }
    }
}
