"""Prompt sets from the MS-COCO 2014 validation captions (``captions_val2014.json``): the paper's 5K sample.

Two samplers (``--coco-sample``):

``paper`` (the default)
    The sample the CR-Diff authors' published preprocessing code draws, pair for pair and in its order:
    captions grouped by image, the images in the order of their first caption in ``annotations`` and each
    image's captions in annotation order; a ``random.Random(42)`` draws ``sample(images, 5000)``; then, for
    each drawn image in turn, an image whose file is missing from the reference folder is skipped *without*
    a draw, and any other one gets ``choice(its captions)`` under the name ``prompt_{i}`` (``i``: its position
    in the draw, so a skipped image leaves a gap). Without a reference folder no file is missing. Captions
    are kept exactly as the JSON has them. The FID reference set is then the drawn images' own files.
    An image's file is its ``images[].file_name`` (``COCO_val2014_{id:012d}.jpg`` when the JSON has no
    ``images`` list); an annotated image that the ``images`` list lacks has no file, so with a folder it
    counts as missing, as it does in the authors' script.
``first``
    crdiff's earlier rule: one caption per image (the annotation with the smallest id, whitespace
    collapsed), every image by ascending id; ``--limit 5000`` keeps the first 5,000. The FID reference
    set is the whole ``--reference-images`` folder.

Only Python's ``json``, ``random`` and ``hashlib`` are used, and nothing iterates over a set, so the same
file gives the same pairs whatever ``PYTHONHASHSEED`` is (``random.sample`` and ``random.choice`` from seed
42 were checked to draw the same values on CPython 3.6 to 3.13).

A :class:`PromptSet` can be saved (:func:`save_prompt_set`, ``crdiff evaluate --save-prompt-set FILE``) as
JSON to inspect, share or pass back as ``--prompts FILE``::

    {"format": "crdiff-coco-prompt-set/1", "sampler": "paper", "source": "captions_val2014.json",
     "source_sha256": "...", "seed": 42, "size": 5000, "reference_images": "/data/val2014" | null,
     "missing": ["COCO_val2014_....jpg", ...],
     "pairs": [{"name": "prompt_0", "image_id": 391895, "caption": "...", "file": "COCO_val2014_....jpg"}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from crdiff_cli.errors import CrdiffError, ParameterError

SAMPLERS = ("paper", "first")
DEFAULT_SAMPLER = "paper"
PAPER_SEED = 42
PAPER_SIZE = 5000
FORMAT = "crdiff-coco-prompt-set/1"
FORMAT_PREFIX = "crdiff-coco-prompt-set/"


def val2014_file(image_id: int) -> str:
    """The file name of an image in COCO's ``val2014`` folder."""
    return f"COCO_val2014_{image_id:012d}.jpg"


@dataclass(frozen=True)
class Captions:
    """A parsed captions JSON.

    ``captions[image_id]``: the image's ``(annotation id, caption)`` in annotation order; the dict's own
    order is each image's first appearance in ``annotations``. ``files``: ``images[].file_name`` by id;
    ``listed``: the JSON has an ``images`` list (then an image missing from it has no file).
    """

    source: str
    sha256: str
    captions: dict[int, list[tuple[object, str]]]
    files: dict[int, str]
    listed: bool = True

    def file_name(self, image_id: int) -> str:
        """The image's file: its ``file_name`` in ``images``, else the val2014 name for its id."""
        return self.files.get(image_id) or val2014_file(image_id)

    def has_file(self, folder: Path, image_id: int) -> bool:
        """Whether the image's file is in ``folder`` (an image the ``images`` list lacks has none)."""
        if self.listed and image_id not in self.files:
            return False
        return os.path.exists(os.path.join(folder, self.file_name(image_id)))


@dataclass(frozen=True)
class Pair:
    """One prompt of a set: its name (``prompt_{i}``), the COCO image, the caption, the image's file name."""

    name: str
    image_id: int
    caption: str
    file: str


@dataclass(frozen=True)
class PromptSet:
    """The prompts an evaluation uses, with where each came from."""

    sampler: str
    source: str
    source_sha256: str
    seed: int | None
    size: int | None
    pairs: tuple[Pair, ...]
    reference_images: Path | None = None
    missing: tuple[str, ...] = ()
    saved: bool = False  # read back from a saved prompt set (not sampled now)

    @property
    def prompts(self) -> list[str]:
        return [p.caption for p in self.pairs]

    def head(self, n: int | None) -> PromptSet:
        """The set cut to its first ``n`` pairs (``--limit``)."""
        return self if n is None else replace(self, pairs=self.pairs[:n])

    def reference_files(self) -> list[Path] | None:
        """FID's real images: with the ``paper`` sampler, the files of this set's pairs in ``reference_images``
        (in pair order); ``None`` with ``first`` (the whole folder is the reference) or without a folder."""
        if self.reference_images is None or self.sampler != "paper":
            return None
        files = [self.reference_images / p.file for p in self.pairs]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise ParameterError("reference_images", self.reference_images,
                                 f"lacks {len(absent):,} of the {len(files):,} images of the prompt set "
                                 f"(e.g. {absent[0].name}); pass the folder the set's images are in")
        return files

    def summary(self) -> dict:
        """What identifies the set in a run's records (results.json, the journal's identity)."""
        return {"sampler": self.sampler, "source": self.source, "source_sha256": self.source_sha256,
                "seed": self.seed, "size": self.size, "missing": len(self.missing),
                "pairs_sha256": hashlib.sha256(_pairs_json(self.pairs).encode()).hexdigest()}

    def to_json(self) -> dict:
        return {"format": FORMAT, "sampler": self.sampler, "source": self.source,
                "source_sha256": self.source_sha256, "seed": self.seed, "size": self.size,
                "reference_images": None if self.reference_images is None else str(self.reference_images),
                "missing": list(self.missing), "pairs": [_pair_dict(p) for p in self.pairs]}


def _pair_dict(pair: Pair) -> dict:
    return {"name": pair.name, "image_id": pair.image_id, "caption": pair.caption, "file": pair.file}


def _pairs_json(pairs) -> str:
    return json.dumps([_pair_dict(p) for p in pairs], ensure_ascii=False, separators=(",", ":"))


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ParameterError("coco_sample", sampler, "is not a sampler; choose paper (the authors' seeded 5K sample) "
                             "or first (the first images by id)")
    return sampler


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> tuple[object, bytes]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CrdiffError(f"prompts file {path} does not exist") from None
    except OSError as exc:
        raise CrdiffError(f"cannot read prompts file {path} ({(exc.strerror or str(exc)).lower()})") from None
    try:
        return json.loads(raw), raw
    except ValueError as exc:
        raise CrdiffError(f"{path} is not valid JSON ({exc}); pass an MS-COCO captions JSON "
                          "(captions_val2014.json), a saved prompt set or a text file with one prompt per line") from None


def _not_captions(path: Path, what: str) -> CrdiffError:
    return CrdiffError(f"{path} is not an MS-COCO captions JSON ({what}); pass captions_val2014.json, a saved "
                       "prompt set or a text file with one prompt per line")


def parse_captions(data, raw: bytes, path: Path) -> Captions:
    """Check and group a captions JSON already read (``data``) from ``raw`` bytes."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise _not_captions(path, 'no "annotations" list')
    captions: dict[int, list[tuple[object, str]]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            raise _not_captions(path, f"annotation {n} lacks an integer image_id or a text caption")
        captions.setdefault(ann["image_id"], []).append((ann.get("id"), ann["caption"]))
    if not captions:
        raise CrdiffError(f"{path} has no captions")
    files: dict[int, str] = {}
    images = data.get("images")
    listed = images is not None
    images = images if listed else []
    if not isinstance(images, list):
        raise _not_captions(path, '"images" is not a list')
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")) or not isinstance(image.get("file_name", ""), str):
            raise _not_captions(path, f"image {n} lacks an integer id or a text file_name")
        if image.get("file_name"):
            files[image["id"]] = image["file_name"]  # the last entry of an id wins, as in a dict comprehension
    return Captions(Path(path).name, hashlib.sha256(raw).hexdigest(), captions, files, listed)


def load_captions(path: Path) -> Captions:
    """Read and check ``captions_val2014.json`` (or any file of that shape)."""
    data, raw = _read_json(path)
    return parse_captions(data, raw, Path(path))


def sample_paper(captions: Captions, reference_images: Path | None = None, *, seed: int = PAPER_SEED,
                 size: int = PAPER_SIZE) -> tuple[list[Pair], list[str]]:
    """The authors' sample: ``(pairs, files missing from reference_images)``, see the module's docstring."""
    image_ids = list(captions.captions)  # first-appearance order
    if len(image_ids) < size:
        raise CrdiffError(f"{captions.source} has captions for {len(image_ids):,} images; the paper's sampler draws "
                          f"{size:,} (use the full captions_val2014.json, or --coco-sample first)")
    rng = random.Random(seed)  # the same stream as random.seed(seed) and the module-level functions
    drawn = rng.sample(image_ids, size)
    pairs, missing = [], []
    for i, image_id in enumerate(drawn):
        file = captions.file_name(image_id)
        if reference_images is not None and not captions.has_file(reference_images, image_id):
            missing.append(file)  # skipped before the caption draw: the random stream does not advance
            continue
        caption = rng.choice([text for _, text in captions.captions[image_id]])
        pairs.append(Pair(f"prompt_{i}", image_id, caption, file))
    return pairs, missing


def sample_first(captions: Captions) -> list[Pair]:
    """crdiff's earlier rule: per image the caption of the smallest annotation id (whitespace collapsed),
    images by ascending id."""
    first: dict[int, tuple[int, str]] = {}
    for image_id, entries in captions.captions.items():
        for ann_id, caption in entries:
            if not _is_int(ann_id):
                raise _not_captions(Path(captions.source), f"an annotation of image {image_id} has no integer id")
            text = " ".join(caption.split())
            if text and (image_id not in first or ann_id < first[image_id][0]):
                first[image_id] = (ann_id, text)
    if not first:
        raise CrdiffError(f"{captions.source} has no captions")
    return [Pair(f"prompt_{i}", image_id, first[image_id][1], captions.file_name(image_id))
            for i, image_id in enumerate(sorted(first))]


def _check_folder(reference_images: Path | None) -> Path | None:
    if reference_images is None:
        return None
    folder = Path(reference_images).expanduser()
    if not folder.is_dir():
        raise ParameterError("reference_images", reference_images, "is not a folder; pass the COCO val2014 image folder")
    return folder.resolve()


def sample(captions: Captions, sampler: str = DEFAULT_SAMPLER, reference_images: Path | None = None) -> PromptSet:
    """A :class:`PromptSet` drawn from parsed captions."""
    check_sampler(sampler)
    folder = _check_folder(reference_images)
    if sampler == "first":
        return PromptSet("first", captions.source, captions.sha256, None, None, tuple(sample_first(captions)),
                         folder)
    pairs, missing = sample_paper(captions, folder)
    if folder is not None and not pairs:
        raise ParameterError("reference_images", reference_images,
                             f"holds none of the {PAPER_SIZE:,} sampled images (e.g. {missing[0]}); pass the COCO "
                             "val2014 image folder")
    return PromptSet("paper", captions.source, captions.sha256, PAPER_SEED, PAPER_SIZE, tuple(pairs), folder,
                     tuple(missing))


def prompt_set(path: Path, sampler: str | None = None, reference_images: Path | None = None) -> PromptSet:
    """The prompt set of a JSON file: a captions JSON sampled with ``sampler`` (default ``paper``), or a set
    saved by :func:`save_prompt_set` (read back as it is; ``sampler``, if given, must be the one it was made with).

    ``reference_images`` is the folder of the val2014 images: the ``paper`` sampler skips the images missing
    from it, as the authors' script does.
    """
    if sampler is not None:
        check_sampler(sampler)
    data, raw = _read_json(path)
    if isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX):
        saved = from_json(data, Path(path))
        if sampler is not None and sampler != saved.sampler:
            raise ParameterError("coco_sample", sampler, f"differs from the sampler of the saved prompt set {path} "
                                 f"({saved.sampler}); omit it to use the set as saved")
        return replace(saved, reference_images=_check_folder(reference_images))
    return sample(parse_captions(data, raw, Path(path)), sampler or DEFAULT_SAMPLER, reference_images)


def from_json(data: dict, path: Path) -> PromptSet:
    """A saved prompt set (the output of :meth:`PromptSet.to_json`), checked."""
    def bad(what: str) -> CrdiffError:
        return CrdiffError(f"{path} is not a readable crdiff prompt set ({what}); save it again with --save-prompt-set")

    if data.get("format") != FORMAT:
        raise bad(f"format {data.get('format')!r}, this crdiff reads {FORMAT}")
    if data.get("sampler") not in SAMPLERS or not isinstance(data.get("pairs"), list) or not data["pairs"]:
        raise bad("no sampler or no pairs")
    pairs = []
    for n, p in enumerate(data["pairs"]):
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and _is_int(p.get("image_id"))
                and isinstance(p.get("caption"), str) and isinstance(p.get("file"), str)):
            raise bad(f"pair {n} lacks a name, an integer image_id, a caption or a file")
        pairs.append(Pair(p["name"], p["image_id"], p["caption"], p["file"]))
    return PromptSet(data["sampler"], str(data.get("source", "")), str(data.get("source_sha256", "")),
                     data.get("seed"), data.get("size"), tuple(pairs), None, tuple(data.get("missing") or ()),
                     saved=True)


def prompt_set_text(ps: PromptSet) -> str:
    """The saved form: the header fields, then one pair per line (easy to read and to diff)."""
    data = ps.to_json()
    pairs, missing = data.pop("pairs"), data.pop("missing")
    head = json.dumps(data, ensure_ascii=False, indent=1)[:-2]  # without the closing "\n}"
    lines = ",\n  ".join(json.dumps(p, ensure_ascii=False) for p in pairs)
    return (f'{head},\n "missing": {json.dumps(missing, ensure_ascii=False)},\n'
            f' "pairs": [\n  {lines}\n ]\n}}\n')


def _output_kind():
    from crdiff_cli.storage.atomic import OutputKind, json_marker

    return OutputKind("prompt set", f'"format": "{FORMAT}"', lambda p: json_marker(p, FORMAT_PREFIX))


def _unchanged(ps: PromptSet, path: Path) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8") == prompt_set_text(ps)
    except (OSError, UnicodeDecodeError):
        return False


def check_save_path(ps: PromptSet, path: Path, *, overwrite: bool = False) -> None:
    """Refuse, before any work, a prompt-set output that cannot or must not be written. A file holding this
    very set passes (a ``--resume`` writes it again unchanged); another crdiff prompt set needs ``overwrite``."""
    from crdiff_cli.storage.atomic import check_output

    check_output(Path(path), overwrite or _unchanged(ps, path), _output_kind())


def save_prompt_set(ps: PromptSet, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``ps`` to ``path`` as JSON, whole or not at all (nothing is written if it already holds ``ps``)."""
    from crdiff_cli.storage.atomic import atomic_path

    path = Path(path)
    text = prompt_set_text(ps)
    if _unchanged(ps, path):
        return path
    with atomic_path(path, overwrite, kind=_output_kind()) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
