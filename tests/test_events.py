"""Entry IDs and the start/end bounds of a replay (pure, no Redis)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from replayd.config import JobSpec
from replayd.events import MAX_SEQ, ZERO, Bound, age_to_id, before, format_id, parse_end, parse_id, parse_start

# 2023-11-14T22:13:20Z
MS = 1_700_000_000_000


def test_max_seq_is_the_largest_sequence_redis_accepts() -> None:
    assert MAX_SEQ == 18446744073709551615


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1700-5", (1700, 5)), (b"1700-5", (1700, 5)), ("0-1", (0, 1)), ("1700", (1700, 0))],
)
def test_parse_id(text: str | bytes, expected: tuple[int, int]) -> None:
    assert parse_id(text) == expected


def test_bare_milliseconds_as_an_end_mean_the_last_entry_of_that_millisecond() -> None:
    assert parse_id("1700", end=True) == (1700, MAX_SEQ)


@pytest.mark.parametrize("text", ["", "abc", "1-x", "-1", "1-", "1-2-3", "1.5-0", "now"])
def test_parse_id_rejects_what_is_not_an_entry_id(text: str) -> None:
    with pytest.raises(ValueError, match="not a stream entry ID"):
        parse_id(text)


def test_format_id_round_trips() -> None:
    assert format_id((1700, 5)) == "1700-5"
    assert parse_id(format_id((MS, MAX_SEQ))) == (MS, MAX_SEQ)


@pytest.mark.parametrize(
    ("id_", "expected"),
    [((5, 3), (5, 2)), ((5, 0), (4, MAX_SEQ)), ((0, 1), (0, 0)), ((0, 0), ZERO)],
)
def test_before_is_the_id_just_below(id_: tuple[int, int], expected: tuple[int, int]) -> None:
    assert before(id_) == expected


def test_ids_compare_in_stream_order() -> None:
    assert parse_id("1700-10") > parse_id("1700-9") > parse_id("1699-" + str(MAX_SEQ))


# --- start bounds: reads resume *after* Bound.id, so an inclusive start is turned into the ID just below


@pytest.mark.parametrize("word", ["beginning", "checkpoint"])
def test_start_words(word: str) -> None:
    assert parse_start(word) == Bound(word)


def test_start_id_is_inclusive() -> None:
    assert parse_start("1700-5") == Bound("id", (1700, 4))


def test_start_at_a_bare_millisecond_includes_its_first_entry() -> None:
    assert parse_start("1700") == Bound("id", (1699, MAX_SEQ))


def test_start_after_an_id_is_exclusive() -> None:
    assert parse_start("1700-5", after=True) == Bound("id", (1700, 5))


def test_start_after_a_bare_millisecond_skips_the_whole_millisecond() -> None:
    assert parse_start("1700", after=True) == Bound("id", (1700, MAX_SEQ))


@pytest.mark.parametrize(
    "text",
    ["2023-11-14T22:13:20Z", "2023-11-14T22:13:20+00:00", "2023-11-14T23:13:20+01:00", "2023-11-14T22:13:20"],
)
def test_start_time_includes_its_millisecond_and_naive_times_are_utc(text: str) -> None:
    assert parse_start(text) == Bound("id", (MS - 1, MAX_SEQ))


def test_start_time_keeps_milliseconds() -> None:
    assert parse_start("2023-11-14T22:13:20.250Z") == Bound("id", (MS + 249, MAX_SEQ))


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("24h", 86_400_000),
        ("7d", 604_800_000),
        ("90m", 5_400_000),
        ("30s", 30_000),
        ("1.5s", 1_500),
        ("1w", 604_800_000),
    ],
)
def test_start_age(text: str, ms: int) -> None:
    assert parse_start(text) == Bound("age", age_ms=ms)


def test_500ms_is_an_age_not_an_entry_id() -> None:
    assert parse_start("500ms") == Bound("age", age_ms=500)


@pytest.mark.parametrize("text", ["yesterday", "24x", "2023-13-45", "1700-5-1", ""])
def test_bad_start_raises_a_message_listing_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO-8601|entry ID"):
        parse_start(text)


# --- end bounds: inclusive


@pytest.mark.parametrize("word", ["now", "follow"])
def test_end_words(word: str) -> None:
    assert parse_end(word) == Bound(word)


def test_end_id_is_inclusive() -> None:
    assert parse_end("1700-5") == Bound("id", (1700, 5))


def test_end_at_a_bare_millisecond_is_the_end_of_that_millisecond() -> None:
    assert parse_end("1700") == Bound("id", (1700, 18446744073709551615))


def test_end_time_is_the_end_of_its_millisecond() -> None:
    assert parse_end("2023-11-14T22:13:20Z") == Bound("id", (MS, MAX_SEQ))
    assert format_id(parse_end("2023-11-14T22:13:20").id) == f"{MS}-18446744073709551615"


def test_end_age() -> None:
    assert parse_end("90m") == Bound("age", age_ms=5_400_000)


# --- ages against Redis's clock


def test_age_as_start_includes_the_first_entry_of_its_millisecond() -> None:
    assert age_to_id(1000, MS, end=False) == (MS - 1001, MAX_SEQ)


def test_age_as_end_includes_its_whole_millisecond() -> None:
    assert age_to_id(1000, MS, end=True) == (MS - 1000, MAX_SEQ)


def test_age_older_than_the_clock_is_the_beginning() -> None:
    assert age_to_id(10_000, 5_000, end=False) == ZERO


# --- JobSpec validates bounds when it is built


def test_jobspec_rejects_a_bad_start() -> None:
    with pytest.raises(ValidationError, match="start"):
        JobSpec(name="j", streams=["s"], handler="m:f", start="someday")


def test_jobspec_after_wins_over_start() -> None:
    spec = JobSpec(name="j", streams=["s"], handler="m:f", start="beginning", after="1700-5")
    assert spec.start_bound == Bound("id", (1700, 5))


def test_jobspec_checkpoint_start_needs_resume() -> None:
    with pytest.raises(ValidationError, match="resume"):
        JobSpec(name="j", streams=["s"], handler="m:f", start="checkpoint", resume=False)
