"""heldout.py: McNemar's test on paired outcomes, against hand-computed values."""

import math

import pytest

from heldout import mcnemar


def test_mcnemar_counts_only_the_discordant_items_and_gives_the_exact_binomial_p():
    # 9 items right only after, 2 right only before, 5 right in both, 4 wrong in both
    before = [0] * 9 + [1] * 2 + [1] * 5 + [0] * 4
    after = [1] * 9 + [0] * 2 + [1] * 5 + [0] * 4
    gained, lost, z, p = mcnemar(before, after)
    assert (gained, lost) == (9, 2)
    assert z == pytest.approx(7 / math.sqrt(11))  # 2.11
    assert p == pytest.approx(2 * (1 + 11 + 55) / 2 ** 11)  # P(X <= 2), X ~ Bin(11, 1/2), two-sided: 0.0654


def test_mcnemar_is_symmetric_and_neutral_without_change():
    assert mcnemar([1, 0, 1], [1, 0, 1]) == (0, 0, 0.0, 1.0)
    g, l, z, p = mcnemar([1, 1, 0, 0], [0, 0, 1, 1])  # as many gained as lost
    assert (g, l, z, p) == (2, 2, 0.0, 1.0)
    assert mcnemar([0] * 30, [1] * 30)[2:] == (pytest.approx(math.sqrt(30)), pytest.approx(2 / 2 ** 30))
    with pytest.raises(AssertionError):
        mcnemar([1, 0], [1])
