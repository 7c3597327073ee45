//! The page pattern. Every 4 KiB page of workload data names itself, so one page can be checked
//! alone, and a lost page (all zero), a stale one (an older generation) or a misplaced one (another
//! page's contents) is caught and named by its address.
//!
//! A page at virtual address `addr` holding generation `generation` (64-bit words):
//! * word 0: `generation` (never 0 for workload data, so a zero page always fails);
//! * word 1: `addr`;
//! * word i >= 2: `start + i * STEP`, where `start` is a hash of (`addr`, `generation`). An add per
//!   word keeps fill and check at memory speed, and every (address, generation) gives other words.

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words per page.
pub const WORDS: usize = PAGE_SIZE / 8;

/// One page as words.
pub type Page = [u64; WORDS];

/// Distance between consecutive words of a page (odd, so 512 steps never wrap to a repeat).
const STEP: u64 = 0xd6e8_feb8_6659_fd93;

/// The first mismatching word of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Index of the word in the page.
    pub word: usize,
    /// Value found.
    pub got: u64,
    /// Value expected.
    pub want: u64,
}

/// A 64-bit finaliser (MurmurHash3's fmix64): spreads every input bit over the output.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The value of word 0 of the sequence part, from which words 2.. are derived.
fn start(addr: u64, generation: u64) -> u64 {
    fmix64(addr.rotate_left(17) ^ fmix64(generation ^ 0x5851_f42d_4c95_7f2d))
}

/// The expected value of word `index` of the page at `addr`, generation `generation`.
pub fn expected_word(addr: u64, generation: u64, index: usize) -> u64 {
    match index {
        0 => generation,
        1 => addr,
        _ => start(addr, generation).wrapping_add((index as u64).wrapping_mul(STEP)),
    }
}

/// Fills `page` with the pattern of (`addr`, `generation`).
pub fn fill(page: &mut Page, addr: u64, generation: u64) {
    page[0] = generation;
    page[1] = addr;
    let mut value = start(addr, generation).wrapping_add(2u64.wrapping_mul(STEP));
    for word in page[2..].iter_mut() {
        *word = value;
        value = value.wrapping_add(STEP);
    }
}

/// Checks `page` against the pattern of (`addr`, `generation`); returns its first bad word.
pub fn check(page: &Page, addr: u64, generation: u64) -> Result<(), Mismatch> {
    // One pass that only ORs the differences together (cheap, vectorises); the bad word is looked
    // for only when something differs.
    let mut differences = (page[0] ^ generation) | (page[1] ^ addr);
    let mut value = start(addr, generation).wrapping_add(2u64.wrapping_mul(STEP));
    for word in page[2..].iter() {
        differences |= *word ^ value;
        value = value.wrapping_add(STEP);
    }
    if differences == 0 {
        return Ok(());
    }
    match page
        .iter()
        .enumerate()
        .find(|&(index, &word)| word != expected_word(addr, generation, index))
    {
        Some((word, &got)) => Err(Mismatch {
            word,
            got,
            want: expected_word(addr, generation, word),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: u64 = 0x7f12_3456_7000;

    #[test]
    fn filled_page_checks_and_matches_expected_words() {
        let mut page = [0u64; WORDS];
        fill(&mut page, ADDR, 3);
        assert_eq!(check(&page, ADDR, 3), Ok(()));
        for (index, &word) in page.iter().enumerate() {
            assert_eq!(word, expected_word(ADDR, 3, index), "word {index}");
        }
    }

    #[test]
    fn zero_stale_misplaced_and_flipped_pages_fail() {
        let zero = [0u64; WORDS];
        assert_eq!(
            check(&zero, ADDR, 1),
            Err(Mismatch {
                word: 0,
                got: 0,
                want: 1
            })
        );

        let mut page = [0u64; WORDS];
        fill(&mut page, ADDR, 7);
        assert_eq!(
            check(&page, ADDR, 8),
            Err(Mismatch {
                word: 0,
                got: 7,
                want: 8
            }),
            "stale generation"
        );
        let other = ADDR + PAGE_SIZE as u64;
        assert_eq!(
            check(&page, other, 7),
            Err(Mismatch {
                word: 1,
                got: ADDR,
                want: other
            }),
            "misplaced"
        );

        page[300] ^= 1 << 40;
        let mismatch = check(&page, ADDR, 7).unwrap_err();
        assert_eq!(mismatch.word, 300);
        assert_eq!(mismatch.got ^ mismatch.want, 1 << 40);
    }

    #[test]
    fn pages_and_generations_differ_in_every_word() {
        let (mut a, mut b, mut c) = ([0u64; WORDS], [0u64; WORDS], [0u64; WORDS]);
        fill(&mut a, ADDR, 1);
        fill(&mut b, ADDR + PAGE_SIZE as u64, 1);
        fill(&mut c, ADDR, 2);
        for index in 0..WORDS {
            // Word 0 is the generation only, word 1 the address only.
            if index != 1 {
                assert_ne!(a[index], c[index], "generation, word {index}");
            }
            if index != 0 {
                assert_ne!(a[index], b[index], "address, word {index}");
            }
        }
        // No two words of a page repeat.
        let mut words = a[2..].to_vec();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), WORDS - 2);
    }
}
