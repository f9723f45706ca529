//! Dirty page maps: which pages of guest RAM were written since the last look, one bitmap per
//! RAM region in the memory's order (bit `i` of word `w` is page `64 * w + i` of the region), as
//! [`crate::memory::take_dirty`] returns them. Live migration and pre-copied snapshots both
//! write memory while the guest runs and then the pages these maps name.

/// One bitmap per RAM region.
pub type DirtyMap = Vec<Vec<u64>>;

/// Pages set in `dirty`.
pub fn count(dirty: &[Vec<u64>]) -> u64 {
    dirty.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

/// ORs `more` into `into` (same regions, same lengths).
pub fn merge(into: &mut [Vec<u64>], more: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(more) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// The runs of set bits in `bits` as (first page, count), none longer than `longest`.
pub fn runs(bits: &[u64], longest: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, usize)> = None;
    for (w, &word) in bits.iter().enumerate() {
        if word == 0 && open.is_none() {
            continue;
        }
        for b in 0..64 {
            let page = w * 64 + b;
            if word & (1 << b) != 0 {
                open = match open {
                    Some((first, n)) if n < longest => Some((first, n + 1)),
                    Some(full) => {
                        out.push(full);
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            } else if let Some(run) = open.take() {
                out.push(run);
            }
        }
    }
    out.extend(open);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps_and_at_the_longest() {
        assert_eq!(runs(&[0b1011], 64), vec![(0, 2), (3, 1)]);
        assert_eq!(runs(&[1 << 63, 1], 64), vec![(63, 2)], "a run crosses words");
        assert_eq!(runs(&[u64::MAX, u64::MAX, 1], 64), vec![(0, 64), (64, 64), (128, 1)]);
        assert_eq!(runs(&[0b111], 2), vec![(0, 2), (2, 1)]);
        assert!(runs(&[0, 0], 64).is_empty());
    }

    #[test]
    fn maps_merge_and_count() {
        let mut a = vec![vec![0b1, 0], vec![0b10]];
        merge(&mut a, &[vec![0b100, 1 << 5], vec![0b10]]);
        assert_eq!(a, vec![vec![0b101, 1 << 5], vec![0b10]]);
        assert_eq!(count(&a), 4);
    }
}
