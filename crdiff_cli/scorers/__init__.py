"""Scorers: rate generated images against their prompts (higher is better).

The ratio search scores every candidate pruning with a reward model, in batches, so a scorer is just
``score(images, prompts) -> one float per image`` plus a ``name`` recorded with the results. Scorers
are chosen by a spec ``NAME[:ARG]``:

``imagereward[:CHECKPOINT]``  ImageReward (the paper's reward model, the project default)
``clip:MODEL``                CLIP score, 100 * cosine similarity
``pickscore:MODEL``           PickScore, the CLIP code with PickScore weights
``tiny``                      a seeded random tiny CLIP: meaningless but deterministic, needs no files

Other packages add scorers through the entry-point group ``crdiff.scorers``; an entry point's value
is a callable ``factory(arg: str | None, device: str) -> Scorer``. Built-in names take precedence.

Nothing here imports torch or transformers: each scorer module is imported only when its spec is
loaded, so ``crdiff --help`` stays fast and the optional ImageReward package stays optional.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from crdiff_cli.errors import CrdiffError

if TYPE_CHECKING:
    from PIL import Image

ENTRY_POINT_GROUP = "crdiff.scorers"
DEFAULT_SCORER = "imagereward"

# name -> "module:factory"; built-in factories have the plugin signature and check their own ARG
_BUILTINS = {
    "imagereward": "crdiff_cli.scorers.imagereward:load",
    "clip": "crdiff_cli.scorers.clip:load_clip",
    "pickscore": "crdiff_cli.scorers.clip:load_pickscore",
    "tiny": "crdiff_cli.scorers.clip:load_tiny",
}


@runtime_checkable
class Scorer(Protocol):
    """Rates images against prompts. ``images[i]`` goes with ``prompts[i]``; one float per image."""

    name: str  # identifies the scorer (and its weights) in search records

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]: ...


def check_batch(images: list, prompts: list) -> None:
    """Raise ``ValueError`` unless there is exactly one prompt per image (a caller bug, not a user error)."""
    if len(images) != len(prompts):
        raise ValueError(f"score() needs one prompt per image: got {len(images)} images and {len(prompts)} prompts")


def plugin_scorers() -> dict[str, EntryPoint]:
    """The third-party scorers installed under :data:`ENTRY_POINT_GROUP`, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_scorers() -> list[str]:
    """Every name :func:`load_scorer` accepts: the built-ins, then installed plugins."""
    return [*_BUILTINS, *sorted(set(plugin_scorers()) - set(_BUILTINS))]


def load_scorer(spec: str, *, device: str = "cpu") -> Scorer:
    """Load the scorer named by ``spec`` (``NAME[:ARG]``) onto ``device``."""
    name, _, arg = spec.partition(":")
    name, arg = name.strip(), arg.strip() or None  # "NAME:" is NAME without an argument
    if name in _BUILTINS:
        module, factory = _BUILTINS[name].split(":")
        return getattr(import_module(module), factory)(arg, device)
    plugins = plugin_scorers()
    if name not in plugins:
        raise CrdiffError(f"unknown scorer {name!r} in {spec!r}; known scorers: {', '.join(known_scorers())}")
    scorer = plugins[name].load()(arg, device)
    if not isinstance(scorer, Scorer):
        raise CrdiffError(f"scorer plugin {name!r} ({plugins[name].value}) returned {type(scorer).__name__}, "
                          f"not a Scorer (needs .name and .score(images, prompts)); fix or uninstall the plugin")
    return scorer
