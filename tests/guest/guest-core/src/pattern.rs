//! The page pattern: every 4 KiB page of workload data describes itself, so any single page can
//! be checked on its own and a lost (zero), stale (older generation) or misplaced page (another
//! page's data) is caught and named by its guest-physical address.
//!
//! Layout of a page at `gpa` with generation `gen` (64-bit words):
//! * word 0: `gen` (never 0 for data, so a zero page always fails),
//! * word 1: `gpa`,
//! * word i >= 2: `seed(gpa, gen) + i * K`, a cheap sequence that differs for every (gpa, gen).

/// 64-bit words per page.
pub const WORDS: usize = 512;
const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// One mismatching word of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Word index in the page.
    pub word: usize,
    /// Value found.
    pub got: u64,
    /// Value expected.
    pub want: u64,
}

/// SplitMix64 finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per-page seed.
pub fn seed(gpa: u64, gen: u64) -> u64 {
    mix(gpa ^ mix(gen.wrapping_add(K)))
}

/// The expected value of word `i` of the page at `gpa`, generation `gen`.
#[inline(always)]
pub fn word(gpa: u64, gen: u64, seed: u64, i: usize) -> u64 {
    match i {
        0 => gen,
        1 => gpa,
        _ => seed.wrapping_add((i as u64).wrapping_mul(K)),
    }
}

/// Fills `page` with the pattern for (`gpa`, `gen`).
pub fn fill(page: &mut [u64; WORDS], gpa: u64, gen: u64) {
    let s = seed(gpa, gen);
    page[0] = gen;
    page[1] = gpa;
    let mut v = s.wrapping_add(2u64.wrapping_mul(K));
    for w in page[2..].iter_mut() {
        *w = v;
        v = v.wrapping_add(K);
    }
}

/// Checks `page` against the pattern for (`gpa`, `gen`); returns the first bad word.
pub fn check(page: &[u64; WORDS], gpa: u64, gen: u64) -> Result<(), Mismatch> {
    let s = seed(gpa, gen);
    // Branch-free accumulation first (vectorises); locate the word only on failure.
    let mut diff = (page[0] ^ gen) | (page[1] ^ gpa);
    let mut v = s.wrapping_add(2u64.wrapping_mul(K));
    for w in page[2..].iter() {
        diff |= *w ^ v;
        v = v.wrapping_add(K);
    }
    if diff == 0 {
        return Ok(());
    }
    for (i, w) in page.iter().enumerate() {
        let want = word(gpa, gen, s, i);
        if *w != want {
            return Err(Mismatch {
                word: i,
                got: *w,
                want,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_detection() {
        let mut p = [0u64; WORDS];
        assert_eq!(check(&p, 0x1000, 1).unwrap_err().word, 0, "zero page fails");
        fill(&mut p, 0x1234_5000, 7);
        check(&p, 0x1234_5000, 7).unwrap();
        let e = check(&p, 0x1234_5000, 6).unwrap_err();
        assert_eq!((e.word, e.got, e.want), (0, 7, 6), "stale generation");
        assert_eq!(
            check(&p, 0x1234_6000, 7).unwrap_err().word,
            1,
            "other page's data"
        );
        p[300] ^= 1;
        let e = check(&p, 0x1234_5000, 7).unwrap_err();
        assert_eq!(e.word, 300);
        assert_eq!(e.got ^ e.want, 1);
    }

    #[test]
    fn words_differ_between_pages_and_generations() {
        let (mut a, mut b) = ([0u64; WORDS], [0u64; WORDS]);
        fill(&mut a, 0x2000, 1);
        fill(&mut b, 0x3000, 1);
        assert!(a[2..].iter().zip(&b[2..]).all(|(x, y)| x != y));
        fill(&mut b, 0x2000, 2);
        assert!(a[2..].iter().zip(&b[2..]).all(|(x, y)| x != y));
        for (i, &w) in a.iter().enumerate() {
            assert_eq!(w, word(0x2000, 1, seed(0x2000, 1), i));
        }
    }
}
