"""Unit tests of answer normalisation and exact-match accuracy."""

from __future__ import annotations

import pytest

from safe_cli.data.scoring import accuracy, is_correct, normalize_answer


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        # case and surrounding whitespace
        ("Yes", ["yes"], True),
        ("yes.", ["Yes"], True),
        ("  CAT \n", ["cat"], True),
        # punctuation
        ("cat!", ["cat"], True),
        ("red, blue", ["red blue"], True),
        ("'dog'", ["dog"], True),
        # articles
        ("the cat", ["cat"], True),
        ("A dog", ["dog"], True),
        ("an apple", ["Apple."], True),
        ("theory", ["ory"], False),  # only whole-word articles go
        # number words <-> digits, both directions
        ("three", ["3"], True),
        ("3", ["three"], True),
        ("Twelve.", ["12"], True),
        ("12", ["twelve"], True),
        ("zero", ["0"], True),
        ("twenty", ["20"], True),
        ("The answer is two", ["the answer is 2"], True),
        # numbers keep their sign and decimal point
        ("-3", ["-3"], True),
        ("-3", ["3"], False),
        ("3.5", ["3.5"], True),
        ("3.5", ["35"], False),
        ("3.", ["3"], True),
        ("1,000", ["1000"], True),
        # several references
        ("four", ["4", "quatre"], True),
        ("quatre", ["4", "quatre"], True),
        ("five", ["4", "quatre"], False),
        # negatives
        ("13", ["3"], False),
        ("thirteen", ["3"], False),
        ("no", ["yes"], False),
        ("", ["yes"], False),
        ("...", ["."], False),  # nothing left is never a match
        # an option letter that is also an article is not erased
        ("A", ["a"], True),
        ("A", ["B"], False),
    ],
)
def test_is_correct(prediction, references, expected):
    assert is_correct(prediction, references) is expected


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("Three.", "3"),
        ("  The   Big  DOG!! ", "big dog"),
        ("-3", "-3"),
        ("well-known", "well known"),
        ("3.14", "3.14"),
        ("twenty one", "20 1"),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_a_bare_string_reference_is_one_reference():
    assert is_correct("three", "3")
    assert not is_correct("t", "three")


def test_no_references_raises():
    with pytest.raises(ValueError):
        is_correct("3", [])


def test_accuracy_on_a_small_list():
    predictions = ["three", "Yes.", "13", "the cat"]
    references = [["3"], ["yes", "yeah"], ["3"], ["dog"]]
    assert accuracy(predictions, references) == pytest.approx(0.5)
    assert accuracy(["3"], [["three"]]) == 1.0
    assert accuracy(["4"], [["three"]]) == 0.0


def test_accuracy_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        accuracy(["3", "4"], [["3"]])


def test_accuracy_of_nothing_raises():
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
