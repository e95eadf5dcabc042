//! Unit tests of the world's helpers.

use super::{Rng, decimal, retransmit_ms};

#[test]
fn loss_costs_retransmission_timeouts_that_double() {
    let mut rng = Rng::new(7);
    let before = rng.clone().unit_f64();
    assert_eq!(retransmit_ms(&mut rng, 0.0, 100.0), 0.0);
    assert_eq!(rng.unit_f64(), before, "no loss, no draw");
    // every delay is a sum of timeouts 300, 600, 1200, ... ms (a round
    // trip of 100 ms plus 200), and losses are as frequent as drawn
    let n = 100_000;
    let (mut lost, mut twice) = (0, 0);
    for _ in 0..n {
        let ms = retransmit_ms(&mut rng, 0.1, 100.0);
        let k = ((ms / 300.0) + 1.0).log2().round() as u32;
        assert_eq!(ms, 300.0 * f64::from((1u32 << k) - 1), "{ms} is not a run of doubling timeouts");
        lost += u32::from(k >= 1);
        twice += u32::from(k >= 2);
    }
    assert!((9_000..11_000).contains(&lost), "{lost} of {n} messages lost at 10 %");
    assert!((700..1_300).contains(&twice), "{twice} of {n} lost twice at 1 %");
}

#[test]
fn decimal_is_to_string() {
    let mut n = 1u64;
    for x in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX - 1, u64::MAX] {
        assert_eq!(decimal(x, &mut [0; 20]), x.to_string().as_bytes());
    }
    while let Some(m) = n.checked_mul(7) {
        assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        n = m + 3;
    }
}
