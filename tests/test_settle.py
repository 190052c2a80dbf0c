"""claims.settle: the ledger of what guests hold comes before what they want (pure, no root)."""

from __future__ import annotations

import random

import pytest

from virt_forward import claims
from virt_forward.claims import CAP, HELD, NONE, WANTED

pytestmark = pytest.mark.noroot

P8080, P2222, P7000 = ("4-tcp-8080", "*"), ("4-tcp-2222", "*"), ("4-tcp-7000", "*")


@pytest.mark.parametrize("holder,other", [("zeta", "alpha"), ("alpha", "zeta")])
def test_a_clash_keeps_what_the_guest_held_and_never_evicts_the_holder(holder: str, other: str) -> None:
    choice, refused, corrupt = claims.settle(
        [(holder, [P8080, P2222], [P8080, P2222]), (other, [P7000], [P7000, P8080])], cap=100)
    assert choice == {holder: HELD, other: HELD}
    assert refused == {other: (P8080, holder)} and corrupt == []


def test_a_newcomer_that_clashes_gets_nothing() -> None:
    choice, refused, _ = claims.settle([("b", None, [P8080]), ("a", [P8080], [P8080])], cap=100)
    assert choice == {"a": HELD, "b": NONE} and refused == {"b": (P8080, "a")}


def test_every_address_overlaps_one_address() -> None:
    one = ("4-tcp-8080", "198.51.100.1")
    choice, refused, _ = claims.settle([("a", [one], [one]), ("b", None, [P8080])], cap=100)
    assert choice["b"] == NONE and refused["b"] == (P8080, "a")


def test_the_cap_never_evicts_a_holder() -> None:
    # a grows past the cap: it keeps what it held, b (sorted later, held first) keeps all
    choice, refused, _ = claims.settle([("a", [P7000], [P7000, P8080]), ("b", [P2222], [P2222])], cap=2)
    assert choice == {"a": HELD, "b": HELD} and refused == {"a": (None, CAP)}
    # a cap lowered below what is held: nobody loses anything, newcomers are refused
    choice, refused, _ = claims.settle([("a", [P7000], [P7000]), ("b", [P2222], [P2222]), ("c", None, [P8080])],
                                       cap=1)
    assert choice == {"a": HELD, "b": HELD, "c": NONE} and refused == {"c": (None, CAP)}


def test_a_port_given_up_goes_to_who_wants_it_in_the_same_round() -> None:
    # "a" (sorted first) wants the port "b" gives up in the same round
    choice, refused, _ = claims.settle([("a", [P7000], [P7000, P8080]), ("b", [P8080], [P2222])], cap=100)
    assert choice == {"a": WANTED, "b": WANTED} and refused == {}


def test_a_guest_without_config_gives_its_ports_up() -> None:
    choice, _, _ = claims.settle([("a", [P8080], None), ("b", None, [P8080])], cap=100)
    assert choice == {"a": NONE, "b": WANTED}


def test_overlapping_records_keep_the_first_and_say_so() -> None:
    choice, _, corrupt = claims.settle([("b", [P8080], [P8080]), ("a", [P8080], [P8080])], cap=100)
    assert choice == {"a": HELD, "b": NONE} and corrupt == [("b", P8080, "a")]


def test_random_rounds_never_move_a_held_port() -> None:
    """Whatever guests want, a port held before a round is held by the same guest after it,
    unless that guest's own wish dropped it."""
    rng = random.Random(20261207)
    ports = [(f"4-tcp-{p}", pub) for p in (80, 81, 82, 83) for pub in ("*", "198.51.100.1")]
    for _ in range(3000):
        names = rng.sample(["a", "b", "c", "d"], rng.randint(1, 4))
        ledger = claims.Ledger()
        cands: list[claims.Candidate] = []
        for name in names:
            held: list[claims.Claim] | None = None
            if rng.random() < 0.6:
                pick = [c for c in rng.sample(ports, rng.randint(0, 3)) if ledger.clash(name, [c]) is None]
                ledger.take(name, pick)
                held = pick
            wanted = None if rng.random() < 0.1 else rng.sample(ports, rng.randint(0, 3))
            cands.append((name, held, wanted))
        cap = rng.randint(1, 8)
        choice, refused, corrupt = claims.settle(cands, cap)
        assert corrupt == []
        after = claims.Ledger()
        total = 0
        held_total = sum(len(h) for _, h, _ in cands if h)
        for name, held, wanted in cands:
            got = wanted if choice[name] == WANTED else held if choice[name] == HELD else None
            if held is not None and (choice[name] != WANTED and choice[name] != NONE):
                assert got == held
            if choice[name] == NONE and held is not None:
                assert wanted is None, (cands, choice)  # only its own wish gives a held set up
            for c in held or []:
                if wanted is not None and c in wanted and choice[name] != NONE:
                    assert got is not None and c in got
            assert after.clash(name, got or []) is None, (cands, choice)  # no overlap afterwards
            after.take(name, got or [])
            total += len(got or [])
        assert total <= max(cap, held_total), (cands, choice, cap)
        for name, why in refused.items():
            assert choice[name] in (HELD, NONE)


def test_a_guest_may_always_shrink_even_over_the_cap() -> None:
    # the cap was lowered below what is held: giving a port up is never refused
    choice, refused, _ = claims.settle([("a", [P7000, P8080], [P7000]), ("b", [P2222], [P2222])], cap=1)
    assert choice == {"a": WANTED, "b": HELD} and refused == {}
