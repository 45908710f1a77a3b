"""The natural-split recipe (Purushwalkam et al. 2019) applied to the synthetic world.

Seen pairs are the training pairs; validation and test each contain seen pairs (a sample of the
training pairs) and unseen pairs; unseen validation and unseen test pairs are disjoint; every
attribute and object keeps at least ``min_seen_per_primitive`` seen pairs, so every primitive is
seen in training. The proportions follow MIT-States (about 64 % of the closed-world pairs seen,
15 % unseen in validation, 20 % unseen in test) and the seen/unseen pair counts in val and test
are equal, as in MIT-States and UT-Zappos.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

Pair = tuple[str, str]


@dataclass(frozen=True)
class PairSplit:
    train: list[Pair]  # seen pairs
    val_unseen: list[Pair]
    test_unseen: list[Pair]
    val_seen: list[Pair]
    test_seen: list[Pair]

    @property
    def val(self) -> list[Pair]:
        return sorted(self.val_seen + self.val_unseen)

    @property
    def test(self) -> list[Pair]:
        return sorted(self.test_seen + self.test_unseen)


def natural_split(pairs: list[Pair], seed: int, val_unseen_frac: float = 0.15,
                  test_unseen_frac: float = 0.20, min_seen_per_primitive: int = 2) -> PairSplit:
    """Split feasible ``pairs`` into seen / unseen-val / unseen-test, deterministically from ``seed``."""
    pairs = sorted(pairs)
    rng = np.random.default_rng([seed, 7919])
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    n_test, n_val = round(test_unseen_frac * len(pairs)), round(val_unseen_frac * len(pairs))
    seen_attr = Counter(a for a, _ in pairs)
    seen_obj = Counter(o for _, o in pairs)
    test_unseen: list[Pair] = []
    val_unseen: list[Pair] = []
    # Greedy: take a pair out of the seen set only while both its primitives stay seen enough.
    for pair in order:
        a, o = pair
        if len(test_unseen) >= n_test and len(val_unseen) >= n_val:
            break
        if seen_attr[a] <= min_seen_per_primitive or seen_obj[o] <= min_seen_per_primitive:
            continue
        target = test_unseen if len(test_unseen) < n_test else val_unseen
        target.append(pair)
        seen_attr[a] -= 1
        seen_obj[o] -= 1
    if len(test_unseen) < n_test or len(val_unseen) < n_val:
        raise ValueError(
            f"cannot hold out {n_test}+{n_val} unseen pairs from {len(pairs)} while keeping "
            f"{min_seen_per_primitive} seen pairs per primitive; lower the unseen fractions"
        )
    held = set(test_unseen) | set(val_unseen)
    train = sorted(p for p in pairs if p not in held)
    pick = lambda n: sorted(train[i] for i in rng.choice(len(train), size=n, replace=False))  # noqa: E731
    return PairSplit(train=train, val_unseen=sorted(val_unseen), test_unseen=sorted(test_unseen),
                     val_seen=pick(len(val_unseen)), test_seen=pick(len(test_unseen)))
