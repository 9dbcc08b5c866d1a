"""Dataset discovery: the layouts users bring, turned into one plain description.

:func:`discover` reads a dataset's index (directory listings, label files,
``data.yaml``, COCO JSON) without decoding any image and returns a
:class:`SplitSpec`: the image paths of one split, their labels ``(n_i, 5)``
float32 ``[class, cx, cy, w, h]`` normalised to the ORIGINAL image (EXIF
orientation applied), and the class names.  :mod:`jaxyolo.data.images` then
decodes and letterboxes the images.

Three layouts:

* **Ultralytics data.yaml**, resolved as ``ultralytics.data.utils.
  check_det_dataset`` (8.4.190) does: ``path`` (default: the yaml's folder;
  a relative ``path`` is looked up from the working directory as upstream, then
  from the yaml's folder instead of upstream's global ``datasets_dir``);
  ``train``/``val``/``test`` each a directory (searched recursively), an image
  list ``.txt`` (lines starting ``./`` are relative to the list, as upstream;
  other relative lines to the working directory, else to the list), or a list
  of those, relative to ``path`` (a missing ``../x`` retries ``x``, as
  upstream); ``val`` may be spelled ``validation``; ``names`` a list or an
  ``{id: name}`` dict with ids ``0..n-1``; optional ``nc`` that must equal
  ``len(names)`` (``nc`` alone names the classes ``class_0...``).  Label files
  follow ``img2label_paths``: the last ``/images/`` of the image path becomes
  ``/labels/`` and the extension ``.txt``; an image without one is a
  background image.
* **COCO**: a directory with ``annotations/instances_<split>*.json`` (the
  images in ``<dir>/<json stem without instances_>``, e.g. ``train2017/``, or
  ``<dir>/images/<stem>``, ``<dir>/<split>``, ``<dir>/images/<split>``,
  ``<dir>/images``, ``<dir>``: the first that holds the first listed file), or
  one JSON file with an explicit images directory.  ``bbox`` ``[x, y, w, h]``
  pixels is clipped to the image (YOLOX's ``COCODataset`` rule) and dropped if
  the clipped width or height is not positive (ultralytics' ``convert_coco``
  rule), then normalised by the image's declared ``width``/``height``;
  ``iscrowd`` boxes are ignored as both do; category ids map to contiguous
  classes in sorted id order (YOLOX's ``class_ids``) with the category names.
  Every listed image is kept, those without boxes as background images.
* **Plain directory**: ``root/images/<split>`` + ``root/labels/<split>`` (or
  ``root/images`` + ``root/labels`` for every split); names from
  ``root/classes.txt``, else ``nc`` or the largest class id + 1 numbered
  classes.

Label lines (YOLO txt, every layout but COCO): ``class cx cy w h``
normalised, or a polygon ``class x1 y1 x2 y2 x3 y3 ...`` (reduced to its
bounding box as upstream's ``segments2boxes``; a file may not mix the two);
values within ``[-0.01, 1.01]`` (upstream's tolerance), then clipped to
``[0, 1]``; exact duplicate rows are dropped (upstream drops them too, but
also re-sorts the rows; we keep the first occurrences in file order).

Every problem a user can fix raises :class:`DataError` with one line naming
the file (and line) or the yaml key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "IMG_FORMATS",
    "SplitSpec",
    "discover",
    "discover_coco",
    "discover_plain",
    "discover_yaml",
    "label_path",
    "read_label_file",
]

# ultralytics.data.utils.IMG_FORMATS (8.4.190).  Formats Pillow cannot open
# here (e.g. HEIC without a plugin) count as unreadable images later.
IMG_FORMATS = frozenset(
    ("avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
)


class DataError(ValueError):
    """A dataset problem the user can fix; the message is one line naming the file or key."""


def _one_line(e) -> str:
    return " ".join(str(e).split())


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """One split of a dataset as found on disk (no image decoded yet).

    Attributes:
      files: N image paths.
      labels: N arrays ``(n_i, 5)`` float32 ``[class, cx, cy, w, h]``,
        normalised to the original image (after EXIF orientation).
      names: the class names; ``nc = len(names)``.
      source: what was read, for messages (``"data.yaml 'val'"``).
      shapes: COCO only: ``(N, 2)`` int ``[h, w]`` the JSON declares for each
        image (the labels are normalised by it); ``None`` elsewhere.
    """

    files: tuple
    labels: tuple
    names: tuple
    source: str
    shapes: np.ndarray | None = None

    @property
    def nc(self) -> int:
        return len(self.names)

    def __len__(self):
        return len(self.files)


# ----------------------------------------------------------------- labels


def read_label_file(path: Path, nc: int | None) -> np.ndarray:
    """Read one YOLO label file.

    Args:
      path: the ``.txt`` file.
      nc: if given, class ids must be ``< nc``.

    Returns:
      ``(n, 5)`` float32 ``[class, cx, cy, w, h]`` normalised, clipped to
      ``[0, 1]``, duplicates removed (first occurrences, file order).

    Raises:
      DataError ``path:line: ...`` for an unreadable file, a row that is
      neither a box nor a polygon, a non-numeric field, a class id that is
      not a non-negative integer or is ``>= nc``, a value outside
      ``[-0.01, 1.01]``, or a file mixing boxes and polygons.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read label file {path}: {_one_line(e)}") from e
    rows, kinds = [], set()
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DataError(
                f"{path}:{lineno}: expected 5 fields 'class cx cy w h' (or a polygon 'class x1 y1 x2 y2 x3 y3 ...'), "
                f"got {len(fields)}: {line.strip()!r}"
            )
        try:
            vals = np.asarray([float(f) for f in fields])
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: non-numeric field in {line.strip()!r}") from e
        c = vals[0]
        if not np.isfinite(c) or c != int(c) or c < 0:
            raise DataError(f"{path}:{lineno}: class id must be a non-negative integer, got {fields[0]!r}")
        if nc is not None and c >= nc:
            raise DataError(f"{path}:{lineno}: class id {int(c)} >= nc={nc}")
        coords = vals[1:]
        if not np.all(np.isfinite(coords)) or np.any(coords < -0.01) or np.any(coords > 1.01):
            what = "box" if len(fields) == 5 else "polygon"
            raise DataError(f"{path}:{lineno}: {what} {fields[1:]} is not normalised {'cx cy w h' if what == 'box' else 'x y'} in [0, 1]")
        if len(fields) == 5:
            kinds.add("box")
            rows.append(vals)
        else:  # upstream segments2boxes: the polygon's min/max, as cxcywh
            kinds.add("polygon")
            xy = coords.reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            rows.append(np.asarray([c, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]))
        if len(kinds) > 1:
            raise DataError(f"{path}:{lineno}: the file mixes box rows and polygon rows")
    lab = np.asarray(rows, np.float32).reshape(-1, 5)
    lab[:, 1:] = np.clip(lab[:, 1:], 0.0, 1.0)
    _, first = np.unique(lab, axis=0, return_index=True)
    return lab[np.sort(first)]


def label_path(image: Path) -> Path:
    """Upstream's ``img2label_paths`` for one image: the last ``/images/`` of
    the path becomes ``/labels/`` and the extension ``.txt`` (no ``/images/``:
    the ``.txt`` next to the image)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(os.fspath(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def _is_image(p) -> bool:
    return os.fspath(p).rpartition(".")[-1].lower() in IMG_FORMATS


def _default_names(labels, nc: int | None) -> tuple:
    top = max((int(lab[:, 0].max()) + 1 for lab in labels if len(lab)), default=1)
    return tuple(str(i) for i in range(nc if nc is not None else top))


# ------------------------------------------------------------ plain layout


def _plain_split_dirs(root: Path, split: str):
    """``(images_dir, labels_dir)`` for ``split``: ``root/images/<split>`` if it
    exists (the ultralytics layout), else ``root/images`` for both splits."""
    if (root / "images" / split).is_dir():
        images = root / "images" / split
    elif (root / "images").is_dir() and not any(p.is_dir() for p in (root / "images").iterdir()):
        images = root / "images"
    elif (root / "images").is_dir():
        raise DataError(f"dataset {root}: no '{split}' split (expected {root / 'images' / split})")
    else:
        raise DataError(f"dataset {root}: no images directory (expected {root / 'images' / split} or {root / 'images'})")
    return images, root / "labels" / images.relative_to(root / "images")


def discover_plain(root, split: str, *, nc: int | None = None) -> SplitSpec:
    """The plain directory layout (see the module docstring).

    Raises:
      DataError naming the path/file for: a missing root, no images, no
      label files at all, ``classes.txt`` disagreeing with ``nc``, and any
      bad label line (:func:`read_label_file`).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a directory")
    names = None
    if (root / "classes.txt").is_file():
        names = tuple(n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip())
        if nc is not None and nc != len(names):
            raise DataError(f"{root / 'classes.txt'} lists {len(names)} classes but nc={nc}")
        nc = len(names)
    images_dir, labels_dir = _plain_split_dirs(root, split)
    files = sorted(p for p in images_dir.iterdir() if _is_image(p))
    if not files:
        raise DataError(f"dataset {root}: no images ({', '.join(sorted(IMG_FORMATS))}) in {images_dir}")
    if not labels_dir.is_dir() or not any(labels_dir.glob("*.txt")):
        raise DataError(f"dataset {root}: no label files (*.txt) in {labels_dir}")
    labels = []
    for f in files:
        lf = labels_dir / (f.stem + ".txt")
        labels.append(read_label_file(lf, nc) if lf.is_file() else np.zeros((0, 5), np.float32))
    return SplitSpec(tuple(files), tuple(labels), names or _default_names(labels, nc), f"{images_dir}")


# --------------------------------------------------------------- data.yaml

# ultralytics.data.utils.DATASET_KEY_TYPES, the keys a detection yaml uses.
_YAML_KEY_TYPES = {"path": (str,), "train": (str, list), "val": (str, list), "test": (str, list), "names": (list, dict)}


def _yaml_names(data: dict, file: Path) -> tuple:
    """``names``/``nc`` as upstream's ``check_det_dataset`` + ``check_class_names``."""
    names, nc = data.get("names"), data.get("nc")
    if names is None and "nc" not in data:
        raise DataError(f"{file}: needs 'names' (a list or an {{id: name}} dict) or 'nc'")
    if "nc" in data:
        try:
            if isinstance(nc, bool) or float(nc) != int(float(nc)):
                raise ValueError
            nc = int(float(nc))
        except (TypeError, ValueError):
            raise DataError(f"{file}: 'nc: {nc}' must be an integer") from None
    if names is None:
        return tuple(f"class_{i}" for i in range(nc))
    if nc is not None and len(names) != nc:
        raise DataError(f"{file}: 'names' has {len(names)} entries but 'nc: {nc}'")
    if isinstance(names, list):
        names = dict(enumerate(names))
    out = {}
    for k, v in names.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise DataError(f"{file}: 'names' key {k!r} is not an integer class id") from None
    names = out
    if not names:
        raise DataError(f"{file}: 'names' is empty (at least one class is needed)")
    if sorted(names) != list(range(len(names))):
        bad = sorted(set(names) - set(range(len(names))))
        raise DataError(
            f"{file}: 'names' has {len(names)} entries, so its ids must be 0-{len(names) - 1}; got id {bad[0]}"
        )
    return tuple(names[i] for i in range(len(names)))


def _yaml_root(data: dict, file: Path) -> Path:
    p = data.get("path")
    if not p:
        return file.parent
    p = Path(p).expanduser()
    if p.is_absolute() or p.exists():  # upstream: relative to the working directory
        return p.resolve()
    return (file.parent / p).resolve()  # instead of upstream's settings datasets_dir


def _list_file_images(txt: Path) -> list:
    try:
        lines = txt.read_text(encoding="utf-8-sig").strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read image list {txt}: {_one_line(e)}") from e
    out = []
    for x in (s.strip() for s in lines):
        if not x:
            continue
        if x.startswith("./"):  # upstream: relative to the list file
            out.append(str(txt.parent / x[2:]))
        elif Path(x).is_absolute() or Path(x).exists():
            out.append(x)
        else:  # upstream leaves it relative to the working directory; fall back to the list's folder
            out.append(str(txt.parent / x))
    return out


def discover_yaml(file, split: str, *, nc: int | None = None) -> SplitSpec:
    """An Ultralytics ``data.yaml`` (see the module docstring).

    Args:
      file: the yaml.
      split: ``"train"``, ``"val"`` (or ``"validation"``), ``"test"``...
      nc: if given, must agree with the yaml's classes.

    Raises:
      DataError naming the yaml key or file for: unreadable yaml, a key of the
      wrong type, a missing split key, a split path that does not exist, no
      images in a split, ``names``/``nc`` problems, and bad label lines.
    """
    import yaml

    file = Path(file)
    if not file.is_file():
        raise DataError(f"dataset file {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{file}: cannot read the yaml: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a mapping with 'path', 'train', 'val', 'names'")
    for key, types in _YAML_KEY_TYPES.items():
        if data.get(key) is not None and not isinstance(data[key], types):
            want = " or ".join(t.__name__ for t in types)
            raise DataError(f"{file}: '{key}' must be a {want}, not {type(data[key]).__name__}")
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    names = _yaml_names(data, file)
    if nc is not None and nc != len(names):
        raise DataError(f"{file}: the yaml has {len(names)} classes but nc={nc}")
    key = "val" if split == "validation" else split
    if not data.get(key):
        raise DataError(f"{file}: no '{key}:' split (a data.yaml needs 'train' and 'val')")
    root = _yaml_root(data, file)
    entries = data[key] if isinstance(data[key], list) else [data[key]]
    found = []
    for x in entries:
        if not isinstance(x, str):
            raise DataError(f"{file}: '{key}' entries must be paths, got {x!r}")
        p = (root / x).resolve()
        if not p.exists() and x.startswith("../"):
            p = (root / x[3:]).resolve()
        if not p.exists():
            raise DataError(f"{file}: '{key}' path {p} does not exist")
        if p.is_dir():
            found += [str(q) for q in p.rglob("*.*")]
        elif _is_image(p):
            found.append(str(p))
        else:
            found += _list_file_images(p)
    files = sorted(f for f in found if _is_image(f))
    if not files:
        raise DataError(f"{file}: no images ({', '.join(sorted(IMG_FORMATS))}) in '{key}' ({', '.join(map(str, entries))})")
    labels = []
    for f in files:
        lf = label_path(Path(f))
        labels.append(read_label_file(lf, len(names)) if lf.is_file() else np.zeros((0, 5), np.float32))
    return SplitSpec(tuple(Path(f) for f in files), tuple(labels), names, f"{file} '{key}'")


# -------------------------------------------------------------------- COCO


def _coco_split_json(root: Path, split: str) -> Path:
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not found:
        raise DataError(f"dataset {root}: no '{split}' split (expected {root / 'annotations' / f'instances_{split}*.json'})")
    if len(found) > 1:
        raise DataError(f"dataset {root}: several '{split}' annotation files ({', '.join(f.name for f in found)}); pass one JSON with --images")
    return found[0]


def _coco_images_dir(root: Path, ann: Path, split: str, first: str | None) -> Path:
    stem = ann.stem.removeprefix("instances_")
    cands = [root / stem, root / "images" / stem, root / split, root / "images" / split, root / "images", root]
    for d in cands:
        if d.is_dir() and (first is None or (d / first).is_file()):
            return d
    raise DataError(f"{ann}: cannot find its images: {first!r} is in none of {', '.join(str(d) for d in cands)}")


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the JSON: {_one_line(e)}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise DataError(f"{path}: not a COCO detection file (needs 'images', 'annotations' and 'categories' lists)")
    return data


def discover_coco(json_file, images_dir, *, nc: int | None = None, _data: dict | None = None) -> SplitSpec:
    """A COCO detection JSON and the folder its ``file_name`` s are relative to.

    ``_data``: the already parsed JSON (internal; a big file is read once).

    Raises:
      DataError naming the JSON for: unreadable JSON, missing keys, an image
      without ``width``/``height``, an annotation with a malformed ``bbox``, an
      unknown ``image_id`` or ``category_id``, no images, ``nc`` disagreeing
      with the categories.
    """
    json_file, images_dir = Path(json_file), Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"images directory {images_dir} does not exist")
    data = _data if _data is not None else _load_json(json_file)
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): i for i, c in enumerate(cats)}
        names = tuple(str(c["name"]) for c in cats)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{json_file}: every category needs an integer 'id' and a 'name'") from None
    if len(cat_index) != len(cats):
        raise DataError(f"{json_file}: duplicate category ids")
    if not names:
        raise DataError(f"{json_file}: no categories")
    if nc is not None and nc != len(names):
        raise DataError(f"{json_file}: {len(names)} categories but nc={nc}")
    if not data["images"]:
        raise DataError(f"{json_file}: lists no images")
    index, shapes, files = {}, [], []
    for img in data["images"]:
        try:
            index[img["id"]] = len(files)
            shapes.append((int(img["height"]), int(img["width"])))
            files.append(images_dir / img["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{json_file}: image {img.get('id', '?') if isinstance(img, dict) else img!r} needs 'id', 'file_name', 'width' and 'height'") from None
    rows = [[] for _ in files]
    for ann in data.get("annotations") or []:
        aid = ann.get("id", "?")
        if ann.get("iscrowd", 0):
            continue
        if ann.get("image_id") not in index:
            raise DataError(f"{json_file}: annotation {aid} refers to unknown image_id {ann.get('image_id')!r}")
        try:
            cls = cat_index[int(ann["category_id"])]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{json_file}: annotation {aid} has category_id {ann.get('category_id')!r}, not in 'categories'") from None
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise DataError(f"{json_file}: annotation {aid} has bbox {bbox!r}, expected [x, y, w, h] in pixels")
        i = index[ann["image_id"]]
        h, w = shapes[i]
        x, y, bw, bh = (float(v) for v in bbox)
        # YOLOX COCODataset: clip to the image; ultralytics convert_coco: drop w <= 0 or h <= 0.
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(w), x1 + max(0.0, bw)), min(float(h), y1 + max(0.0, bh))
        if x2 <= x1 or y2 <= y1:
            continue
        rows[i].append([cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
    labels = tuple(np.asarray(r, np.float32).reshape(-1, 5) for r in rows)
    return SplitSpec(tuple(files), labels, names, f"{json_file}", np.asarray(shapes, np.int64).reshape(-1, 2))


# ---------------------------------------------------------------- dispatch


def discover(data, split: str, *, images=None, nc: int | None = None) -> SplitSpec:
    """Find split ``split`` of the dataset ``data``.

    Args:
      data: a ``.yaml``/``.yml`` file (Ultralytics), a ``.json`` file (COCO,
        with ``images``), a directory holding ``annotations/instances_*.json``
        (COCO) or ``images/`` (plain layout).
      split: ``"train"``, ``"val"``... (ignored for a single COCO JSON: the
        file is the split).
      images: the images folder of a single COCO JSON.
      nc: optional expected number of classes (checked against the names).

    Returns:
      :class:`SplitSpec`.
    """
    p = Path(data)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return discover_yaml(p, split, nc=nc)
    if suffix == ".json":
        if not p.is_file():
            raise DataError(f"dataset file {p} does not exist")
        if images is None:
            raise DataError(f"{p}: a COCO JSON needs its images folder (--images DIR)")
        return discover_coco(p, images, nc=nc)
    if p.is_dir() and (p / "annotations").is_dir() and not (p / "labels").is_dir():
        ann = _coco_split_json(p, split)
        js = _load_json(ann)
        first = next((img.get("file_name") for img in js["images"][:1] if isinstance(img, dict)), None)
        return discover_coco(ann, images or _coco_images_dir(p, ann, split, first), nc=nc, _data=js)
    return discover_plain(p, split, nc=nc)
