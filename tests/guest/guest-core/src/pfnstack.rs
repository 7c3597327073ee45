//! An unbounded stack of PFNs kept in pages taken from the pages being stacked.
//!
//! Used for the balloon's inflated pages: a fixed array sized for "all of RAM" would be 1 KiB
//! of metadata per MiB of RAM reserved up front, while this costs one page per
//! [`PER_NODE`] entries and nothing while the balloon is empty. When a page is pushed and the
//! top node is full (or there is none), the pushed page itself becomes the new node instead of
//! an entry, so a push never needs memory the caller does not already own. Emptied nodes are
//! handed back through a callback.
//!
//! Node layout (32-bit words): `[0]` previous node PFN ([`NONE`] for none), `[1]` entries in
//! this node, `[2..]` the entries.

/// 32-bit words in a page.
pub const WORDS_PER_PAGE: usize = 1024;
/// Entries per node.
pub const PER_NODE: usize = WORDS_PER_PAGE - 2;
/// "No node".
pub const NONE: u32 = u32::MAX;

/// Word access to the pages of the nodes (identity-mapped memory in the guest).
pub trait PageWords {
    /// Word `i` of page `pfn`.
    fn read(&self, pfn: u32, i: usize) -> u32;
    /// Sets word `i` of page `pfn`.
    fn write(&mut self, pfn: u32, i: usize, v: u32);
}

/// The stack. Owns its node pages and the pages it holds as entries.
#[derive(Debug)]
pub struct PfnStack {
    top: u32,
    len: usize,
    nodes: usize,
}

impl Default for PfnStack {
    fn default() -> Self {
        Self::new()
    }
}

impl PfnStack {
    /// An empty stack.
    pub const fn new() -> Self {
        PfnStack {
            top: NONE,
            len: 0,
            nodes: 0,
        }
    }

    /// Entries (not counting node pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// No entries?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages used as nodes.
    pub fn node_pages(&self) -> usize {
        self.nodes
    }

    /// Pushes `pfn`. Returns true if it was stored as an entry, false if it became a node page
    /// (the stack keeps it either way; the caller should push another page).
    pub fn push(&mut self, mem: &mut impl PageWords, pfn: u32) -> bool {
        if self.top == NONE || mem.read(self.top, 1) as usize >= PER_NODE {
            mem.write(pfn, 0, self.top);
            mem.write(pfn, 1, 0);
            self.top = pfn;
            self.nodes += 1;
            return false;
        }
        let n = mem.read(self.top, 1) as usize;
        mem.write(self.top, 2 + n, pfn);
        mem.write(self.top, 1, n as u32 + 1);
        self.len += 1;
        true
    }

    /// Pops the last entry. Node pages that become empty are given to `release`.
    pub fn pop(&mut self, mem: &mut impl PageWords, mut release: impl FnMut(u32)) -> Option<u32> {
        loop {
            if self.top == NONE {
                return None;
            }
            let n = mem.read(self.top, 1) as usize;
            if n == 0 {
                self.drop_top(mem, &mut release);
                continue;
            }
            let pfn = mem.read(self.top, 2 + n - 1);
            mem.write(self.top, 1, n as u32 - 1);
            self.len -= 1;
            if n == 1 {
                self.drop_top(mem, &mut release);
            }
            return Some(pfn);
        }
    }

    fn drop_top(&mut self, mem: &mut impl PageWords, release: &mut impl FnMut(u32)) {
        let node = self.top;
        self.top = mem.read(node, 0);
        self.nodes -= 1;
        release(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Mem(HashMap<u32, Vec<u32>>);
    impl PageWords for Mem {
        fn read(&self, pfn: u32, i: usize) -> u32 {
            self.0.get(&pfn).map_or(0xdead_beef, |p| p[i])
        }
        fn write(&mut self, pfn: u32, i: usize, v: u32) {
            self.0
                .entry(pfn)
                .or_insert_with(|| vec![0xdead_beef; WORDS_PER_PAGE])[i] = v;
        }
    }

    #[test]
    fn lifo_with_nodes_from_pushed_pages() {
        let mut mem = Mem::default();
        let mut s = PfnStack::new();
        let mut owned = Vec::new(); // entries, in push order
        let mut nodes = Vec::new();
        let mut next = 100u32;
        while owned.len() < 3 * PER_NODE + 5 {
            if s.push(&mut mem, next) {
                owned.push(next);
            } else {
                nodes.push(next);
            }
            next += 1;
        }
        assert_eq!(s.len(), owned.len());
        assert_eq!(s.node_pages(), 4);
        assert_eq!(nodes.len(), 4);
        // entries never live in node pages
        for n in &nodes {
            assert!(!owned.contains(n));
        }
        let mut released = Vec::new();
        while let Some(p) = s.pop(&mut mem, |n| released.push(n)) {
            assert_eq!(Some(p), owned.pop());
        }
        assert!(owned.is_empty());
        assert_eq!(s.len(), 0);
        assert_eq!(s.node_pages(), 0);
        released.reverse();
        assert_eq!(released, nodes, "every node page given back");
    }

    #[test]
    fn mixed_push_pop_and_empty_node() {
        let mut mem = Mem::default();
        let mut s = PfnStack::new();
        let mut model = Vec::new();
        let mut released = 0usize;
        let mut next = 0u32;
        let mut rng = 7u64;
        for _ in 0..20000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 5 < 3 {
                if s.push(&mut mem, next) {
                    model.push(next);
                }
                next += 1;
            } else {
                assert_eq!(s.pop(&mut mem, |_| released += 1), model.pop());
            }
            assert_eq!(s.len(), model.len());
            assert!(s.node_pages() <= model.len().div_ceil(PER_NODE) + 1);
        }
        // a node created by the last push, with no entry yet, is released by pop
        let mut s = PfnStack::new();
        assert!(!s.push(&mut mem, 5));
        let mut rel = Vec::new();
        assert_eq!(s.pop(&mut mem, |n| rel.push(n)), None);
        assert_eq!(rel, vec![5]);
        assert_eq!(s.node_pages(), 0);
    }
}
