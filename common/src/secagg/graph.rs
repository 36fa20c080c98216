//! The neighbour graph of SecAgg+ (Bell et al. 2020): every client shares its secrets with, and
//! masks against, only its k neighbours. A Harary graph H(k, n) (each node joined to the k/2
//! nearest on either side of a ring, plus the opposite node when k is odd) over a seeded random
//! permutation of the cohort: k-regular, and chosen from public randomness so every client can
//! compute it.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// `neighbours[i]`: the sorted neighbour indices of cohort member `i`. Requires `degree < n`,
/// and `n` even when `degree` is odd (checked by the caller).
pub fn harary(n: usize, degree: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
    let mut position = vec![0; n];
    for (p, &node) in order.iter().enumerate() {
        position[node] = p;
    }
    (0..n)
        .map(|node| {
            let p = position[node];
            let mut ns: Vec<usize> =
                (1..=degree / 2).flat_map(|d| [order[(p + d) % n], order[(p + n - d) % n]]).collect();
            if degree % 2 == 1 {
                ns.push(order[(p + n / 2) % n]);
            }
            ns.sort_unstable();
            ns.dedup();
            ns
        })
        .collect()
}

/// The sizes of the connected parts of `graph` among `members` (edges between members only):
/// the groups whose sums a server could unmask one by one.
pub fn part_sizes(graph: &[Vec<usize>], members: &BTreeSet<usize>) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut sizes = Vec::new();
    for &start in members {
        if !seen.insert(start) {
            continue;
        }
        let (mut stack, mut size) = (vec![start], 0);
        while let Some(i) = stack.pop() {
            size += 1;
            for &j in graph.get(i).map_or(&[][..], Vec::as_slice) {
                if members.contains(&j) && seen.insert(j) {
                    stack.push(j);
                }
            }
        }
        sizes.push(size);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_symmetric_and_seeded() {
        for (n, k) in [(10, 4), (10, 9), (8, 3), (100, 20), (5, 4)] {
            let g = harary(n, k, 7);
            for (i, ns) in g.iter().enumerate() {
                assert_eq!(ns.len(), k, "n {n} k {k} node {i}: {ns:?}");
                assert!(!ns.contains(&i));
                for &j in ns {
                    assert!(g[j].contains(&i), "edge {i}-{j} is not symmetric");
                }
            }
            assert_eq!(g, harary(n, k, 7));
        }
        assert_ne!(harary(20, 4, 1), harary(20, 4, 2));
    }

    #[test]
    fn parts_of_a_ring_with_gaps() {
        // A ring of 10 (degree 2, identity order when the graph is built by hand).
        let ring: Vec<Vec<usize>> = (0..10).map(|i| vec![(i + 9) % 10, (i + 1) % 10]).collect();
        let all: BTreeSet<usize> = (0..10).collect();
        assert_eq!(part_sizes(&ring, &all), vec![10]);
        let gaps: BTreeSet<usize> = [0, 1, 2, 4, 5, 6, 7, 8].into_iter().collect();
        let mut sizes = part_sizes(&ring, &gaps);
        sizes.sort();
        assert_eq!(sizes, vec![3, 5], "removing 3 and 9 cuts the ring in two");
    }
}
