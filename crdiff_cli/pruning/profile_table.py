"""Pruning-ratio profiles: Table 6 of the paper (shipped in ``crdiff_cli.profiles``) and search outputs.

A profile is a small JSON file (format ``crdiff-profile/1``) holding a family, a resolution
(HEIGHTxWIDTH) and ``ratios`` ``{down, mid, up}``; profiles written by ``crdiff search`` add the score,
k and how they were found. ``--profile`` takes a built-in name (``sdxl@400x560``) or a file path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from crdiff_cli.errors import CrdiffError, ParameterError
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.storage.atomic import OutputKind, json_marker

FORMAT = "crdiff-profile/1"
PROFILE = OutputKind("profile", f'"format": "{FORMAT}"', lambda path: json_marker(path, "crdiff-profile/"))


@dataclass(frozen=True)
class Profile:
    name: str
    family: str
    resolution: Resolution
    ratios: Ratios
    source: str
    native_resolution: bool = False
    extra: dict = field(default_factory=dict, compare=False)  # search results: score, k, scorer, ...

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CrdiffError(f"{origin} is not a crdiff profile (expected a JSON object with \"format\": "
                              f"\"{FORMAT}\"); see docs/profiles.md for the format")
        try:
            known = {"format", "name", "family", "resolution", "ratios", "source", "native_resolution"}
            return cls(name=str(data["name"]), family=str(data["family"]),
                       resolution=Resolution.parse(data["resolution"]), ratios=Ratios.from_dict(data["ratios"]),
                       source=str(data.get("source", origin)), native_resolution=bool(data.get("native_resolution")),
                       extra={k: v for k, v in data.items() if k not in known})
        except KeyError as exc:
            raise CrdiffError(f"profile {origin} lacks the {exc.args[0]!r} field; see docs/profiles.md for the "
                              "format") from None
        except (TypeError, ValueError, AttributeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CrdiffError(f"profile {origin} is malformed ({reason}); see docs/profiles.md for the format") from None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "name": self.name, "family": self.family, "resolution": str(self.resolution),
                "ratios": self.ratios.as_dict(), "native_resolution": self.native_resolution,
                "source": self.source, **self.extra}


def builtin_profiles() -> list[Profile]:
    """Every Table 6 profile, ordered by family then resolution."""
    folder = files("crdiff_cli.profiles")
    out = [Profile.from_dict(json.loads(p.read_text()), p.name) for p in folder.iterdir() if p.name.endswith(".json")]
    return sorted(out, key=lambda p: (p.family, p.resolution.pixels, p.resolution.height))


def get_profile(name_or_path: str) -> Profile:
    """A built-in profile by name (``sd15@400x560``) or a profile JSON file by path."""
    for profile in builtin_profiles():
        if profile.name == name_or_path:
            return profile
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CrdiffError(f"profile file {path} is not readable JSON ({exc})") from None
        return Profile.from_dict(data, str(path))
    if path.exists():
        raise CrdiffError(f"profile {path} is a folder; pass a profile JSON file")
    if _looks_like_file(name_or_path):
        raise CrdiffError(f"profile file {path} does not exist; check the path (built-in profiles: `crdiff profiles`)")
    names = ", ".join(p.name for p in builtin_profiles())
    raise CrdiffError(f"unknown profile {name_or_path!r}; use a profile file or one of: {names}")


def _looks_like_file(name: str) -> bool:
    """A path rather than a built-in name (``family@HxW``): has a folder part or a .json suffix."""
    return "/" in name or "\\" in name or name.lower().endswith(".json") or name.startswith("~")


def nearest_profile(family: str, resolution: Resolution) -> tuple[Profile, bool]:
    """The family's profile at ``resolution``, or its nearest one; the flag says whether it was exact."""
    candidates = [p for p in builtin_profiles() if p.family == family]
    if not candidates:
        raise CrdiffError(f"no built-in profile for model family {family!r}; pass --ratios D/M/U or --profile")
    best = min(candidates, key=lambda p: (resolution.distance(p.resolution), p.name))
    return best, best.resolution == resolution


@dataclass(frozen=True)
class RatioChoice:
    """The ratios a command will use, where they came from, and a warning to show, if any."""

    ratios: Ratios
    origin: str
    warning: str | None = None
    profile: Profile | None = None


def check_ratio_source(*, ratios: str | None, profile: str | None, resolution: Resolution | None) -> None:
    """Everything :func:`choose_ratios` can refuse without the model: call it before loading one."""
    if ratios is not None and profile is not None:
        raise ParameterError("ratios", None, "and profile both given; pass only one of them", mentions=("profile",))
    if ratios is not None:
        Ratios.parse(ratios)
    elif profile is not None:
        get_profile(profile)
    elif resolution is None:
        raise ParameterError("ratios", None, "missing; pass ratios D/M/U, profile NAME, or resolution HxW (the "
                             "paper's choice for this model family)", mentions=("ratios", "profile", "resolution"))


def choose_ratios(family: str, *, ratios: str | None, profile: str | None,
                  resolution: Resolution | None) -> RatioChoice:
    """Explicit ``--ratios``, else ``--profile``, else the family's profile nearest to ``--res``."""
    check_ratio_source(ratios=ratios, profile=profile, resolution=resolution)
    if ratios is not None:
        return RatioChoice(Ratios.parse(ratios), f"--ratios {ratios}")
    if profile is not None:
        chosen = get_profile(profile)
        warnings = []
        if family not in ("unknown", chosen.family):
            warnings.append(f"profile {chosen.name} was searched for {chosen.family}, but this model looks like {family}")
        if resolution is not None and resolution != chosen.resolution:
            warnings.append(f"profile {chosen.name} was made for {chosen.resolution} (HxW), not --res {resolution}")
        return RatioChoice(chosen.ratios, f"profile {chosen.name}", "; ".join(warnings) or None, chosen)
    chosen, exact = nearest_profile(family, resolution)
    if exact:
        return RatioChoice(chosen.ratios, f"profile {chosen.name}", None, chosen)
    return RatioChoice(chosen.ratios, f"profile {chosen.name} (nearest to {resolution})",
                       f"no {family} profile at {resolution} (HxW); using the nearest one, {chosen.name}", chosen)

