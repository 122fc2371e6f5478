"""`DomainMixture`: a reproducible stream that `set_data_mix` reweights and a checkpoint replays."""

from __future__ import annotations

import itertools
import re

import pytest

from trainer.mixture import DomainMixture

DOMAINS = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(50)]}


def take(mixture: DomainMixture[str], count: int) -> list[str]:
    return list(itertools.islice(iter(mixture), count))


def test_the_stream_is_a_function_of_seed_position_and_weights() -> None:
    """Two mixtures with the same seed give the same examples; restoring a state replays what followed it."""
    first, second = DomainMixture(DOMAINS, seed=3), DomainMixture(DOMAINS, seed=3)
    assert take(first, 20) == take(second, 20)
    state = first.state_dict()
    after = take(first, 10)
    first.load_state_dict(state)
    assert take(first, 10) == after


def test_new_weights_change_what_is_drawn_from_then_on() -> None:
    """With b at weight 0 every later example comes from a; the mix is reported normalised."""
    mixture = DomainMixture(DOMAINS, seed=0)
    take(mixture, 5)
    assert mixture.set_weights({"a": 3.0, "b": 0.0}) == {"a": 1.0, "b": 0.0}
    assert all(example.startswith("a") for example in take(mixture, 40))


def test_skip_counts_whole_steps_of_examples() -> None:
    """skip(2) with batch_size 4 moves the stream 8 examples on."""
    mixture = DomainMixture(DOMAINS, batch_size=4, seed=1)
    ahead = DomainMixture(DOMAINS, batch_size=4, seed=1)
    take(ahead, 8)
    mixture.skip(2)
    assert mixture.index == 8 and take(mixture, 5) == take(ahead, 5)


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        ({"c": 1.0}, re.escape("unknown domain(s) c; this run has a, b")),
        ({"a": -1.0}, "non-negative: a"),
        ({"a": 0.0, "b": 0.0}, "every domain weight zero"),
    ],
)
def test_bad_weights_are_refused_naming_the_domain_and_change_nothing(weights: dict[str, float], words: str) -> None:
    """Unknown, negative and all-zero weights raise with the reason, and the mix stays as it was."""
    mixture = DomainMixture(DOMAINS, weights={"a": 2.0})
    with pytest.raises(ValueError, match=words):
        mixture.set_weights(weights)
    assert mixture.mix() == {"a": 2 / 3, "b": 1 / 3}


def test_a_mixture_needs_examples_in_every_domain() -> None:
    """An empty domain is refused by name."""
    with pytest.raises(ValueError, match=re.escape("domain(s) b have no examples")):
        DomainMixture({"a": ["x"], "b": []})
