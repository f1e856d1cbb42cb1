"""Property tests for every parser of user input: any input parses to a valid value or raises the
project's one-line :class:`CrdiffError`, never anything else (no traceback can reach the user).

Budget: the ``ci`` Hypothesis profile (tests/conftest.py); ``CRDIFF_FUZZ=long`` runs many more examples
(see docs/testing.md for the recorded 10-minute run).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from crdiff_cli.errors import CrdiffError

NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                   st.sampled_from(["0.3", ".5", "1", "1e-3", "-0", "nan", "inf", "0x1p-2", "", " ", "1_0"]))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                     max_size=5), max_leaves=12)


def outcome(parse, *args, **kwargs):
    """``parse(*args, **kwargs)``'s value, or None when it raised a one-line CrdiffError; anything else fails the test."""
    try:
        return parse(*args, **kwargs)
    except CrdiffError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None


def joined(parts, sep):
    return st.lists(parts, min_size=0, max_size=5).map(sep.join)


@given(st.one_of(st.text(max_size=40), joined(NUMBER, "/")))
def test_ratios(text):
    from crdiff_cli.pruning.ratios import Ratios

    ratios = outcome(Ratios.parse, text)
    if ratios is not None:
        assert all(math.isfinite(r) and 0 <= r < 1 for r in ratios.as_tuple())
        assert Ratios.parse(str(ratios)) == ratios or str(ratios).count("/") == 2


@given(st.one_of(st.text(max_size=30), st.from_regex(r"\A\s*[0-9]{0,5}\s*[xX×*]\s*[0-9]{0,5}\s*\Z")))
def test_resolutions(text):
    from crdiff_cli.pruning.resolution import MAX_SIDE, MIN_SIDE, Resolution

    res = outcome(Resolution.parse, text)
    if res is not None:
        assert all(side % 8 == 0 and MIN_SIDE <= side <= MAX_SIDE for side in (res.height, res.width))
        assert Resolution.parse(str(res)) == res


@given(st.one_of(st.text(max_size=30), joined(NUMBER, ":")), st.booleans())
def test_bounds(text, ratio):
    from crdiff_cli.cli.commands.search import parse_bounds

    bounds = outcome(parse_bounds, text, "--bounds", ratio=ratio)
    if bounds is not None:
        lo, hi = bounds
        assert math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi and (hi < 1 or not ratio)


@given(st.one_of(st.text(max_size=60), joined(joined(NUMBER, "/"), ",")),
       st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)).map(sorted))
def test_init_seeds(text, bounds):
    from crdiff_cli.cli.commands.search import parse_init

    seeds = outcome(parse_init, text, tuple(bounds))
    if seeds is not None:
        assert seeds and all(len(s) == 3 and all(bounds[0] <= x <= bounds[1] for x in s) for s in seeds)


@given(st.one_of(st.text(max_size=40), joined(st.integers().map(str) | NUMBER, ",")))
def test_image_seed_lists(text):
    from crdiff_cli.cli.commands.search import parse_seeds
    from crdiff_cli.validation import MAX_SEED, MIN_SEED

    seeds = outcome(parse_seeds, text)
    if seeds is not None:
        assert seeds and len(set(seeds)) == len(seeds) and all(MIN_SEED <= s <= MAX_SEED for s in seeds)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_k(k):
    from crdiff_cli.dual.options import check_k

    try:
        check_k(k)
    except CrdiffError as exc:
        assert "\n" not in str(exc)
        assert not (math.isfinite(k) and k >= 0)
    else:
        assert math.isfinite(k) and k >= 0


VALID_PROFILE = {"format": "crdiff-profile/1", "name": "p", "family": "sd15", "resolution": "64x64",
                 "ratios": {"down": 0.1, "mid": 0.2, "up": 0.3}}


def _mutated(base: dict):
    """``base`` with one key dropped or one value replaced by arbitrary JSON, or arbitrary JSON outright."""
    keys = sorted(base)
    return st.one_of(
        JSONISH,
        st.sampled_from(keys).map(lambda k: {x: v for x, v in base.items() if x != k}),
        st.tuples(st.sampled_from(keys), JSONISH).map(lambda kv: {**base, kv[0]: kv[1]}),
    )


@given(st.one_of(_mutated(VALID_PROFILE), st.fixed_dictionaries(
    {"ratios": _mutated(VALID_PROFILE["ratios"])}).map(lambda d: {**VALID_PROFILE, **d})))
def test_profile_json(data):
    from crdiff_cli.pruning.profile_table import Profile

    profile = outcome(Profile.from_dict, data, "p.json")
    if profile is not None:
        assert all(0 <= r < 1 for r in profile.ratios.as_tuple()) and isinstance(profile.family, str)


@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_profile_files(content):
    from crdiff_cli.pruning.profile_table import get_profile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.json"
        path.write_bytes(content)
        outcome(get_profile, str(path))


@given(st.binary(max_size=300) | st.lists(st.text(max_size=30), max_size=8).map(
    lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")))
def test_prompts_files(content):
    from crdiff_cli.pipelines.prompts import read_prompts

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.txt"
        path.write_bytes(content)
        prompts = outcome(read_prompts, path)
        if prompts is not None:
            assert prompts and all(p.strip() == p and p and not p.startswith("#") for p in prompts)


HEADER = json.dumps({"format": "crdiff-search-journal/1", "identity": {"steps": 2}}, separators=(",", ":"))


@given(st.lists(st.one_of(st.just(HEADER), st.text(max_size=40), JSONISH.map(json.dumps)), max_size=5),
       st.booleans(), st.booleans())
def test_journal_lines(lines, trailing_newline, resume):
    from crdiff_cli.storage.journal import check_journal, read_journal

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "j.jsonl"
        content = "\n".join(lines) + ("\n" if trailing_newline else "")
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
        before = path.read_bytes()
        entries = outcome(check_journal, path, {"steps": 2}, resume=resume, overwrite=not resume)
        assert path.read_bytes() == before  # checking never writes
        if entries is not None and resume:
            header, parsed, durable = read_journal(path)
            assert parsed == entries and 0 <= durable <= len(before)


def _valid_table() -> dict[str, str]:
    from crdiff_cli.exporters.metadata import ArtifactMetadata
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.pruning.spec import GroupSpec, PruneSpec

    ratios = Ratios(0.1, 0.2, 0.3)
    groups = {g: GroupSpec(r, 2, 100, 0.0625 * (i + 1), 10 * (i + 1)) for i, (g, r) in enumerate(ratios.as_dict().items())}
    spec = PruneSpec(ratios, groups, "float32")
    meta = ArtifactMetadata(spec, 1.5, Resolution(64, 64), "sd15", {"in_channels": 4}, "0" * 64,
                            {"down": ["a"], "mid": ["b"], "up": ["c"]})
    return meta.to_strings()


VALID_TABLE = _valid_table()


@given(st.one_of(
    st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5),
    st.sampled_from(sorted(VALID_TABLE)).map(lambda k: {x: v for x, v in VALID_TABLE.items() if x != k}),
    st.tuples(st.sampled_from(sorted(VALID_TABLE)), st.text(max_size=30) | JSONISH.map(json.dumps)).map(
        lambda kv: {**VALID_TABLE, kv[0]: kv[1]}),
    st.tuples(st.sampled_from(["down", "mid", "up"]), st.sampled_from(["bits", "value", "ratio", "layers"]),
              JSONISH | st.from_regex(r"\A-?0x[0-9a-f]{0,12}\Z")).map(lambda t: _nested(t[0], t[1], t[2]))))
def test_artifact_metadata(table):
    from crdiff_cli.exporters.metadata import ArtifactMetadata

    meta = outcome(ArtifactMetadata.from_strings, table, "a.safetensors")
    if meta is not None:
        assert ArtifactMetadata.from_strings(meta.to_strings(), "again") == meta


def _nested(group: str, field: str, value) -> dict[str, str]:
    """The valid table with one field of one group's threshold or spec replaced."""
    table = dict(VALID_TABLE)
    key = "crdiff.thresholds" if field in ("bits", "value") else "crdiff.groups"
    data = json.loads(table[key])
    data[group][field] = value
    table[key] = json.dumps(data)
    return table


def test_the_valid_examples_are_valid():
    """The mutation bases above parse, so the properties explore near-valid inputs, not only garbage."""
    from crdiff_cli.exporters.metadata import ArtifactMetadata
    from crdiff_cli.pruning.profile_table import Profile

    assert ArtifactMetadata.from_strings(VALID_TABLE, "x").k == 1.5
    assert Profile.from_dict(VALID_PROFILE, "x").name == "p"
    with pytest.raises(CrdiffError):
        Profile.from_dict([VALID_PROFILE], "x")
