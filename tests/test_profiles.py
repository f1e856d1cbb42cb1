"""Profiles (Table 6 as data), resolution and ratio parsing, and the ratio-choice rules."""

from __future__ import annotations

import json
import math

import pytest

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.profile_table import (FORMAT, Profile, RatioChoice, builtin_profiles, choose_ratios,
                                              get_profile, nearest_profile)
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution

# CR-Diff supplementary Table 6, copied by hand: (family, HEIGHTxWIDTH, down, mid, up, native)
TABLE6 = [
    ("sdxl", "1024x1024", 0.295, 0.194, 0.236, True),
    ("sdxl", "512x512", 0.397, 0.434, 0.387, False),
    ("sdxl", "400x560", 0.482, 0.396, 0.469, False),
    ("sdxl", "480x360", 0.434, 0.428, 0.355, False),
    ("sdxl", "1536x1536", 0.300, 0.343, 0.300, False),
    ("sd15", "512x512", 0.433, 0.345, 0.300, True),
    ("sd15", "400x560", 0.319, 0.240, 0.192, False),
    ("sd15", "480x360", 0.467, 0.363, 0.196, False),
    ("sd15", "768x768", 0.185, 0.445, 0.100, False),
    ("sd21", "512x512", 0.623, 0.259, 0.115, True),
    ("sd21", "400x560", 0.534, 0.534, 0.169, False),
    ("sd21", "480x360", 0.651, 0.138, 0.271, False),
    ("sd21", "768x768", 0.277, 0.206, 0.313, False),
]


# --- Table 6 ----------------------------------------------------------------------------------------

def test_builtin_profiles_are_table6_exactly():
    profiles = builtin_profiles()
    assert len(profiles) == 13
    got = {p.name: p for p in profiles}
    assert len(got) == 13
    for family, res, down, mid, up, native in TABLE6:
        p = got[f"{family}@{res}"]
        assert p.family == family
        assert str(p.resolution) == res and p.resolution == Resolution.parse(res)
        assert p.ratios == Ratios(down, mid, up)
        assert p.ratios.as_tuple() == (down, mid, up)
        assert p.native_resolution is native
        assert "Table 6" in p.source and "2604.05524" in p.source


def test_builtin_profiles_order_and_get_profile():
    profiles = builtin_profiles()
    assert [p.family for p in profiles] == sorted(p.family for p in profiles)
    for p in profiles:
        assert get_profile(p.name) == p
        assert p.name == f"{p.family}@{p.resolution.height}x{p.resolution.width}"


def test_height_by_width_convention():
    p = get_profile("sd15@400x560")
    assert (p.resolution.height, p.resolution.width) == (400, 560)
    p = get_profile("sdxl@480x360")
    assert (p.resolution.height, p.resolution.width) == (480, 360)


def test_unknown_profile_error():
    with pytest.raises(CrdiffError) as info:
        get_profile("sd15@999x999")
    message = str(info.value)
    assert "\n" not in message and "unknown profile 'sd15@999x999'" in message and "sd15@512x512" in message


# --- profile files ----------------------------------------------------------------------------------

def test_profile_file_round_trip(tmp_path):
    p = Profile(name="my-search", family="sd15", resolution=Resolution(640, 384), ratios=Ratios(0.31, 0.22, 0.13),
                source="crdiff search", extra={"score": 0.91, "k": 1.2})
    path = tmp_path / "my.json"
    path.write_text(json.dumps(p.to_dict(), indent=2))
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT == "crdiff-profile/1"
    assert data["resolution"] == "640x384" and data["ratios"] == {"down": 0.31, "mid": 0.22, "up": 0.13}
    back = get_profile(str(path))
    assert back == p and back.extra == {"score": 0.91, "k": 1.2} and back.to_dict() == p.to_dict()
    # a builtin written out and read back is the same profile
    for builtin in builtin_profiles():
        f = tmp_path / f"{builtin.name}.json"
        f.write_text(json.dumps(builtin.to_dict()))
        assert get_profile(str(f)) == builtin


@pytest.mark.parametrize("content, words", [
    ("{not json", "not readable JSON"),
    (json.dumps({"name": "x"}), "not a crdiff profile"),
    (json.dumps({"format": FORMAT, "name": "x", "family": "sd15", "resolution": "400x560"}), "lacks the 'ratios' field"),
    (json.dumps([{"format": FORMAT}]), "not a crdiff profile"),
    (json.dumps({"format": FORMAT, "name": "x", "family": "sd15", "resolution": "401x560",
                 "ratios": {"down": 0.1, "mid": 0.1, "up": 0.1}}), "malformed"),
    (json.dumps({"format": FORMAT, "name": "x", "family": "sd15", "resolution": "400x560",
                 "ratios": {"down": 1.5, "mid": 0.1, "up": 0.1}}), "malformed"),
    (json.dumps({"format": FORMAT, "name": "x", "family": "sd15", "resolution": "400x560",
                 "ratios": {"down": "a", "mid": 0.1, "up": 0.1}}), "malformed"),
])
def test_bad_profile_files(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CrdiffError) as info:
        get_profile(str(path))
    assert words in str(info.value) and "\n" not in str(info.value)


# --- nearest profile and ratio choice ---------------------------------------------------------------

@pytest.mark.parametrize("family, res, expected, exact", [
    ("sd15", "400x560", "sd15@400x560", True),
    ("sd15", "408x560", "sd15@400x560", False),
    ("sd15", "1024x1024", "sd15@768x768", False),     # square: closest pixel count among 512², 768²
    ("sd15", "256x256", "sd15@512x512", False),
    ("sd15", "360x480", "sd15@400x560", False),       # portrait-ish: aspect first
    ("sd15", "600x448", "sd15@480x360", False),       # landscape 4:3
    ("sd21", "768x776", "sd21@768x768", False),
    ("sdxl", "1024x1024", "sdxl@1024x1024", True),
    ("sdxl", "2048x2048", "sdxl@1536x1536", False),
    ("sdxl", "800x800", "sdxl@1024x1024", False),     # log-distance: 800² is nearer 1024² than 512²
])
def test_nearest_profile(family, res, expected, exact):
    profile, is_exact = nearest_profile(family, Resolution.parse(res))
    assert (profile.name, is_exact) == (expected, exact)


def test_nearest_profile_unknown_family():
    with pytest.raises(CrdiffError, match="no built-in profile for model family 'unknown'"):
        nearest_profile("unknown", Resolution(512, 512))


def test_choose_ratios_from_res_exact_and_nearest():
    choice = choose_ratios("sd15", ratios=None, profile=None, resolution=Resolution(400, 560))
    assert isinstance(choice, RatioChoice)
    assert choice.ratios == Ratios(0.319, 0.240, 0.192) and choice.warning is None
    assert choice.profile.name == "sd15@400x560"
    choice = choose_ratios("sd15", ratios=None, profile=None, resolution=Resolution(408, 560))
    assert choice.ratios == Ratios(0.319, 0.240, 0.192) and choice.profile.name == "sd15@400x560"
    assert "sd15@400x560" in choice.warning and "408x560" in choice.warning and "nearest" in choice.warning
    choice = choose_ratios("sd15", ratios=None, profile=None, resolution=Resolution(1024, 1024))
    assert choice.profile.name == "sd15@768x768" and "1024x1024" in choice.warning


def test_choose_ratios_precedence():
    res = Resolution(400, 560)
    # --ratios beats the --res profile
    choice = choose_ratios("sd15", ratios="0.1/0.2/0.3", profile=None, resolution=res)
    assert choice.ratios == Ratios(0.1, 0.2, 0.3) and choice.profile is None and choice.warning is None
    assert "--ratios" in choice.origin
    # --profile beats the --res profile
    choice = choose_ratios("sd15", ratios=None, profile="sd15@768x768", resolution=res)
    assert choice.ratios == Ratios(0.185, 0.445, 0.100) and choice.profile.name == "sd15@768x768"
    assert choice.warning == "profile sd15@768x768 was made for 768x768 (HxW), not --res 400x560"
    # a profile of another family warns; an unknown family does not
    choice = choose_ratios("sd15", ratios=None, profile="sdxl@400x560", resolution=None)
    assert choice.ratios == Ratios(0.482, 0.396, 0.469) and "sdxl" in choice.warning and "sd15" in choice.warning
    assert choose_ratios("unknown", ratios=None, profile="sdxl@400x560", resolution=None).warning is None


def test_choose_ratios_errors():
    with pytest.raises(CrdiffError, match="^ratios and profile both given"):
        choose_ratios("sd15", ratios="0.1/0.1/0.1", profile="sd15@512x512", resolution=None)
    with pytest.raises(CrdiffError, match="^ratios missing; pass ratios D/M/U, profile NAME, or resolution HxW"):
        choose_ratios("sd15", ratios=None, profile=None, resolution=None)
    with pytest.raises(CrdiffError, match="unknown profile"):
        choose_ratios("sd15", ratios=None, profile="nope", resolution=None)
    with pytest.raises(CrdiffError, match="must be three numbers"):
        choose_ratios("sd15", ratios="0.3/0.2", profile=None, resolution=None)
    with pytest.raises(CrdiffError, match="no built-in profile"):
        choose_ratios("unknown", ratios=None, profile=None, resolution=Resolution(512, 512))


# --- resolution parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, hw", [
    ("400x560", (400, 560)), ("400X560", (400, 560)), (" 480 x 360 ", (480, 360)), ("400×560", (400, 560)),
    ("8x8", (8, 8)), ("8192x8192", (8192, 8192)), ("1024x576", (1024, 576)),
])
def test_resolution_parse(text, hw):
    res = Resolution.parse(text)
    assert (res.height, res.width) == hw
    assert str(res) == f"{hw[0]}x{hw[1]}"
    assert res.pixels == hw[0] * hw[1] and math.isclose(res.aspect, hw[0] / hw[1])


@pytest.mark.parametrize("text, words", [
    ("401x560", "not a multiple of 8"),
    ("400x561", "not a multiple of 8"),
    ("0x512", "out of range"),
    ("8200x512", "out of range"),
    ("100000x512", "out of range"),
    ("400*560", "not HEIGHTxWIDTH"),
    ("400", "not HEIGHTxWIDTH"),
    ("x560", "not HEIGHTxWIDTH"),
    ("400x560x3", "not HEIGHTxWIDTH"),
    ("-400x560", "not HEIGHTxWIDTH"),
    ("400.0x560", "not HEIGHTxWIDTH"),
    ("", "not HEIGHTxWIDTH"),
    ("abc", "not HEIGHTxWIDTH"),
])
def test_resolution_errors(text, words):
    with pytest.raises(CrdiffError) as info:
        Resolution.parse(text)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_resolution_multiple_of_8_error_suggests_a_fix():
    with pytest.raises(CrdiffError, match="use e.g. 400x560"):
        Resolution.parse("404x563")


# --- ratio parsing ----------------------------------------------------------------------------------

def test_ratios_parse():
    r = Ratios.parse("0.319/0.240/0.192")
    assert r == Ratios(0.319, 0.24, 0.192) and r.as_tuple() == (0.319, 0.24, 0.192)
    assert r["down"] == 0.319 and r["mid"] == 0.24 and r["up"] == 0.192
    assert r.as_dict() == {"down": 0.319, "mid": 0.24, "up": 0.192}
    assert Ratios.from_dict(r.as_dict()) == r
    assert str(r) == "0.319/0.24/0.192" and Ratios.parse(str(r)) == r
    assert Ratios.parse("0/0/0") == Ratios(0, 0, 0)
    assert Ratios.parse("0.999999/0/0").down == 0.999999


@pytest.mark.parametrize("text, words", [
    ("0.3/0.2", "must be three numbers"),
    ("0.3/0.2/0.1/0.1", "must be three numbers"),
    ("a/b/c", "must be three numbers"),
    ("0.3,0.2,0.1", "must be three numbers"),
    ("", "must be three numbers"),
    ("1.0/0.1/0.1", "outside [0, 1)"),
    ("0.1/1/0.1", "outside [0, 1)"),
    ("0.1/0.1/-0.1", "outside [0, 1)"),
    ("nan/0.1/0.1", "outside [0, 1)"),
    ("0.1/inf/0.1", "outside [0, 1)"),
    ("0.1/0.1/2", "outside [0, 1)"),
])
def test_ratios_errors(text, words):
    with pytest.raises(CrdiffError) as info:
        Ratios.parse(text)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_ratio_error_names_the_group():
    with pytest.raises(CrdiffError, match="^mid ratio"):
        Ratios(0.1, 1.0, 0.1)
    with pytest.raises(CrdiffError, match="^up ratio"):
        Ratios(0.1, 0.1, -0.1)
