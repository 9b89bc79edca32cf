"""File readers: each dataset layout into one RawData, in file order, unfiltered.

Every problem a user can cause (missing file, wrong columns, bad values) is
raised as DataError with the file, column and value in the message.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

_log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
# Items CSV columns whose '|'-separated values are the item's categories (first found wins).
CATEGORY_COLUMNS = ("categories", "category", "genres", "genre")
# MovieLens age bands (ML-1m codes them by their lower bound; ML-100k gives raw ages).
AGE_BANDS = ((1, "1-17"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"))
# Occupation codes of ML-1m users.dat, from its README.
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip


class DataError(ValueError):
    """User-facing data problem; message names the file/column/value."""


@dataclass(frozen=True, eq=False)
class RawData:
    """One dataset as read: interactions in file order, items in file order."""

    name: str
    interactions: pd.DataFrame  # user_id, item_id (str), timestamp (numeric)[, rating (float)]
    items: pd.DataFrame  # item_id (str) + text columns (str)
    categories: tuple[tuple[str, ...], ...]  # per row of items
    user_attributes: pd.DataFrame | None  # index = external user id
    default_text_columns: tuple[str, ...] | None  # None = every items column but item_id
    interactions_source: str
    items_source: str


def builtin_data_dir(name: str):
    """Folder of a shipped dataset.

    Flower app bundles carry only source and text files, so when the apps run from a
    bundle the data is found through the installed ``fedenc`` distribution instead
    (a wheel install, or the source tree of an editable one).
    """
    here = resources.files("common").joinpath("datasets", name)
    if here.joinpath("ratings.dat.gz").is_file():
        return here
    import json
    from importlib import metadata
    from pathlib import Path

    try:
        dist = metadata.distribution("fedenc")
    except metadata.PackageNotFoundError:
        dist = None
    candidates = []
    if dist is not None:
        candidates.append(Path(str(dist.locate_file(f"common/datasets/{name}"))))
        direct_url = dist.read_text("direct_url.json")
        if direct_url:
            url = json.loads(direct_url).get("url", "")
            if url.startswith("file://"):
                candidates.append(Path(url[len("file://") :]) / "common" / "datasets" / name)
    for candidate in candidates:
        if (candidate / "ratings.dat.gz").is_file():
            return candidate
    raise DataError(f"the built-in dataset {name!r} is not installed; run `pip install -e .` in the fedenc folder")


def read_movietweetings() -> RawData:
    """The shipped MovieTweetings 100K snapshot (ratings.dat.gz, movies.dat.gz)."""
    root = builtin_data_dir("movietweetings")
    ratings = root.joinpath("ratings.dat.gz")
    movies = root.joinpath("movies.dat.gz")
    interactions = _read_double_colon(
        io.BytesIO(gzip.decompress(ratings.read_bytes())), ["user_id", "item_id", "rating", "timestamp"]
    )
    items = _read_movies_dat(gzip.decompress(movies.read_bytes()).decode("utf-8"))
    return RawData(
        name="movietweetings",
        interactions=interactions,
        items=items.drop(columns="categories"),
        categories=tuple(items["categories"]),
        user_attributes=None,
        default_text_columns=("title", "genres"),
        interactions_source=str(ratings),
        items_source=str(movies),
    )


def read_movielens(directory: Path) -> RawData:
    """A MovieLens download: ml-100k (u.data, u.item, u.genre, u.user) or ml-1m (*.dat)."""
    if not directory.is_dir():
        raise DataError(f"{directory}: MovieLens directory not found")
    if (directory / "u.data").exists():
        return _read_ml100k(directory)
    if (directory / "ratings.dat").exists():
        return _read_ml1m(directory)
    raise DataError(f"{directory}: not a MovieLens directory (expected u.data of ml-100k or ratings.dat of ml-1m)")


def _read_ml100k(directory: Path) -> RawData:
    data = _existing(directory / "u.data")
    interactions = pd.read_csv(
        data, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
        dtype={"user_id": str, "item_id": str},
    )  # fmt: skip
    genres = pd.read_csv(_existing(directory / "u.genre"), sep="|", header=None, names=["name", "index"])
    genre_names = list(genres.sort_values("index")["name"])
    item_path = _existing(directory / "u.item")
    raw_items = pd.read_csv(item_path, sep="|", header=None, dtype=str, encoding="latin-1")
    if raw_items.shape[1] != 5 + len(genre_names):
        raise DataError(f"{item_path}: expected {5 + len(genre_names)} '|'-separated fields, got {raw_items.shape[1]}")
    flags = raw_items.iloc[:, 5:].to_numpy() == "1"
    categories = tuple(tuple(g for g, f in zip(genre_names, row, strict=True) if f) for row in flags)
    users = pd.read_csv(
        _existing(directory / "u.user"), sep="|", header=None,
        names=["user_id", "age", "gender", "occupation", "zip"], dtype=str,
    )  # fmt: skip
    bounds = [b for b, _ in AGE_BANDS]
    labels = [label for _, label in AGE_BANDS]
    ages = np.searchsorted(bounds, users["age"].astype(int).to_numpy(), side="right") - 1
    users["age"] = [labels[max(a, 0)] for a in ages]
    return RawData(
        name="movielens-100k",
        interactions=interactions,
        items=pd.DataFrame({"item_id": raw_items[0], "title": raw_items[1], "genres": [", ".join(c) for c in categories]}),
        categories=categories,
        user_attributes=users.set_index("user_id")[["occupation", "age", "gender"]],
        default_text_columns=("title", "genres"),
        interactions_source=str(data),
        items_source=str(item_path),
    )


def _read_ml1m(directory: Path) -> RawData:
    data = _existing(directory / "ratings.dat")
    interactions = _read_double_colon(data, ["user_id", "item_id", "rating", "timestamp"])
    movies = _existing(directory / "movies.dat")
    items = _read_movies_dat(movies.read_bytes().decode("latin-1"))
    users = _read_double_colon(_existing(directory / "users.dat"), ["user_id", "gender", "age", "occupation", "zip"])
    band = dict(AGE_BANDS)
    users["age"] = users["age"].map(lambda a: band.get(int(a), "unknown"))
    users["occupation"] = users["occupation"].map(
        lambda o: ML1M_OCCUPATIONS[int(o)] if 0 <= int(o) < len(ML1M_OCCUPATIONS) else "unknown"
    )
    return RawData(
        name="movielens-1m",
        interactions=interactions,
        items=items.drop(columns="categories"),
        categories=tuple(items["categories"]),
        user_attributes=users.set_index("user_id")[["occupation", "age", "gender"]],
        default_text_columns=("title", "genres"),
        interactions_source=str(data),
        items_source=str(movies),
    )


def _read_double_colon(source, names: list[str]) -> pd.DataFrame:
    # '::'-separated files with no ':' inside fields: the fast C parser on ':' sees an
    # empty column between fields, which usecols skips. (Titles contain ':', so movies
    # files go through _read_movies_dat instead.)
    try:
        frame = pd.read_csv(
            source, sep=":", header=None, usecols=range(0, 2 * len(names), 2), names=range(2 * len(names) - 1),
            dtype=str, encoding="latin-1",
        )  # fmt: skip
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{source}: not a '::'-separated file with fields {', '.join(names)} ({e})") from e
    frame.columns = names
    for numeric in ("rating", "timestamp"):
        if numeric in frame:
            frame[numeric] = _numeric(frame[numeric], str(source), numeric)
    return frame


def _read_movies_dat(text: str) -> pd.DataFrame:
    """``id::Title (Year)::Genre|Genre`` lines; titles may contain ':' and genres may be empty."""
    ids, titles, genres, categories = [], [], [], []
    for line in text.splitlines():
        if not line:
            continue
        item_id, title, genre = line.split("::", 2)
        cats = tuple(g for g in genre.split("|") if g)
        ids.append(item_id)
        titles.append(title)
        genres.append(", ".join(cats))
        categories.append(cats)
    return pd.DataFrame({"item_id": ids, "title": titles, "genres": genres, "categories": categories})


def read_csv_pair(interactions_path: Path, items_path: Path) -> RawData:
    """An interactions CSV (user_id,item_id,timestamp[,rating][,site]) and an items CSV (item_id,...)."""
    frame = _read_table(interactions_path, INTERACTION_COLUMNS)
    interactions = frame[list(INTERACTION_COLUMNS)].copy()
    interactions["timestamp"] = parse_timestamps(frame["timestamp"], str(interactions_path))
    if "rating" in frame:
        interactions["rating"] = _numeric(frame["rating"], str(interactions_path), "rating")
    extra = [c for c in frame.columns if c not in (*INTERACTION_COLUMNS, "rating")]
    attributes = None
    if extra:
        times, source = interactions["timestamp"], str(interactions_path)
        attributes = pd.DataFrame({c: per_user_values(frame["user_id"], frame[c], times, source) for c in extra})

    items = _read_table(items_path, ("item_id",))
    duplicated = items["item_id"][items["item_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{items_path}: item_id {duplicated.iloc[0]!r} appears more than once")
    category_column = next((c for c in CATEGORY_COLUMNS if c in items), None)
    if category_column is None:
        categories = tuple(() for _ in range(len(items)))
    else:
        categories = tuple(tuple(c.strip() for c in v.split("|") if c.strip()) for v in items[category_column])
    return RawData(
        name=f"csv:{interactions_path.name}",
        interactions=interactions,
        items=items,
        categories=categories,
        user_attributes=attributes,
        default_text_columns=None,
        interactions_source=str(interactions_path),
        items_source=str(items_path),
    )


def per_user_values(users: pd.Series, values: pd.Series, times, source: str) -> pd.Series:
    """One value per user from a per-interaction column (real logs record e.g. the country
    of every visit): the user's most frequent value, ties going to the most recent one.
    Logs one line when some users had several values. Indexed by user id, in order of
    first appearance.

    >>> sites = pd.Series(["fr", "de", "de", "fr"], name="site")
    >>> per_user_values(pd.Series(["u", "u", "u", "v"]), sites, [1, 2, 3, 4], "x").tolist()
    ['de', 'fr']
    """
    rows = pd.DataFrame({"user": users.to_numpy(), "value": values.to_numpy(), "time": np.asarray(times),
                         "row": np.arange(len(users))})
    per_pair = rows.groupby(["user", "value"], sort=False).agg(n=("row", "size"), time=("time", "max"), row=("row", "max"))
    best = per_pair.reset_index().sort_values(["n", "time", "row"], ascending=False).drop_duplicates("user")
    varying = int((per_pair.groupby(level="user", sort=False).size() > 1).sum())
    if varying:
        _log.warning("%s: column %r varies within %d user(s); each gets their most frequent value (ties: the most recent)",
                     source, values.name, varying)
    return best.set_index("user")["value"].reindex(pd.unique(users.to_numpy()))


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        # All strings: ids keep leading zeros; empty cells stay "" instead of NaN.
        frame = pd.read_csv(_existing(path), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as CSV ({e})") from e
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column {', '.join(map(repr, missing))} (found: {', '.join(frame.columns)}; "
            f"expected {', '.join(required)})"
        )
    return frame


def parse_timestamps(column: pd.Series, source: str) -> np.ndarray:
    """Unix seconds, or any date string pandas parses; numbers are tried first.

    >>> parse_timestamps(pd.Series(["1970-01-01T00:00:10Z", "1970-01-02"]), "x.csv").tolist()
    [10.0, 86400.0]
    """
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(dtype=np.float64)
    dates = pd.to_datetime(column, errors="coerce", utc=True, format="mixed")
    if dates.notna().all():
        return (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    bad = numbers.isna() & dates.isna()
    if not bad.any():
        raise DataError(f"{source}: column 'timestamp' mixes unix seconds and date strings; use one form")
    row = int(np.flatnonzero(bad.to_numpy())[0])
    raise DataError(
        f"{source}: column 'timestamp' has a value that is neither unix seconds nor a date: "
        f"{column.iloc[row]!r} (data row {row + 1})"
    )


def _numeric(column: pd.Series, source: str, name: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise DataError(f"{source}: column {name!r} has a non-numeric value {column.iloc[row]!r} (data row {row + 1})")
    return values.astype(np.float64)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path
