"""MovieLens in its common layouts -> the canonical model (docs/data.md, "MovieLens").

Layouts (detected from --src, a directory or the ratings file itself):
    ml100k   u.data  (tab: user item rating timestamp, no header)  + u.item (|, latin-1, 19 genre flags)
    recbole  X.inter (tab, typed header `user_id:token ...`)        + X.item (tab, `class`/`genre` token_seq)
    ml1m     ratings.dat (`::`, no header)                          + movies.dat (`::`, latin-1, A|B genres)
    csv      ratings.csv (header userId,movieId,rating,timestamp)  + movies.csv (quoted titles, A|B genres)

Mapping: every rating is a behaviour (play_ms = rating / 5 * duration, duration fixed, cross feature
`rating`); a rating with ts >= history_end is also an impression, label = rating >= label_min_rating.
Category = the first genre, in the fixed vocabulary GENRES below; author_id = 0 (MovieLens has none).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from twinv2.data.adapters.common import (Adapter, Block, FileCount, LineFormat, Quarantine, as_int,
                                         read_small_lines, require_columns, split_header)
from twinv2.data.adapters.lines import undecodable
from twinv2.errors import DataError

# 0 = no/unknown genre; 1..18 in the order of ml-100k's u.genre flags; 19 = IMAX (ml-latest only).
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western", "IMAX"]
GENRE_ID = {g.lower(): i for i, g in enumerate(GENRES)}
GENRE_ID.update({"(no genres listed)": 0, "children": GENRE_ID["children's"]})   # ml-20m+ spellings

LAYOUTS = {   # layout: (ratings file name or suffix, item file name or suffix)
    "ml100k": ("u.data", "u.item"),
    "recbole": (".inter", ".item"),
    "ml1m": ("ratings.dat", "movies.dat"),
    "csv": ("ratings.csv", "movies.csv"),
}


def _id_error(value: str, field: str) -> tuple[str, str] | None:
    """None for an item id that is a non-negative integer fitting int64, else (reason, detail)."""
    if not value.isdigit():
        if value.startswith("-") and value[1:].isdigit():
            return "negative_id", f"field {field!r}: {value[:80]} is negative; ids must be >= 0"
        return "not_numeric", f"field {field!r}: expected an integer, got {value[:80]!r}"
    if int(value) >= 9_000_000_000_000_000_000:
        return "overflow", f"field {field!r}: {value[:80]} does not fit a 64-bit integer"
    return None


def genre_id(name: str) -> int:
    return GENRE_ID.get(name.strip().lower(), 0)


class MovieLens(Adapter):
    name = "movielens"
    cross = ("rating",)
    ts_field, ts_unit_ms, item_what = "timestamp", 1000, "movie id"

    def discover(self) -> None:
        src = self.src
        if src.is_dir():
            found = []
            for layout, (r, i) in LAYOUTS.items():
                if r.startswith("."):
                    found += [(layout, p) for p in sorted(src.glob(f"*{r}"))]
                elif (src / r).is_file():
                    found.append((layout, src / r))
            if not found:
                raise FileNotFoundError(
                    f"{src}: no MovieLens ratings file found; expected one of u.data (ml-100k), *.inter "
                    f"(RecBole), ratings.dat (ml-1m) or ratings.csv (ml-latest/ml-20m/25m/32m)")
            if len(found) > 1:
                raise DataError(f"{src}: several MovieLens ratings files {[str(p) for _, p in found]}; "
                                f"pass the one to ingest as --src")
            self.layout, self.ratings = found[0]
        elif src.is_file():
            for layout, (r, _) in LAYOUTS.items():
                if src.name == r or (r.startswith(".") and src.suffix == r):
                    self.layout, self.ratings = layout, src
                    break
            else:
                raise DataError(f"{src}: not a MovieLens ratings file; expected u.data, *.inter, "
                                f"ratings.dat or ratings.csv")
        else:
            raise FileNotFoundError(f"{src}: no such file or directory (MovieLens ratings file or its directory)")
        item_name = LAYOUTS[self.layout][1]
        self.item_file = (self.ratings.with_suffix(item_name) if item_name.startswith(".")
                          else self.ratings.parent / item_name)
        self.item_files = [self.item_file]
        if not self.item_file.is_file():
            raise FileNotFoundError(f"{self.item_file}: missing; the {self.layout} layout needs it beside "
                                    f"{self.ratings.name} for the movies' genres")
        p = self.params.get("movielens", {}) or {}
        self.duration_ms = int(p.get("duration_ms", 6_000_000))
        self.label_min = float(p.get("label_min_rating", 4.0))
        self.meta.update({"layout": self.layout, "category_vocabulary": GENRES,
                          "label": f"rating >= {self.label_min}",
                          "completion_proxy": f"duration_ms = {self.duration_ms}; play_ms = rating / 5 * duration_ms",
                          "author": "author_id = 0 (MovieLens has no author)"})

    # ------------------------------------------------------------ items

    def read_items(self, quarantine: Quarantine, counts: dict[str, FileCount]) -> pd.DataFrame:
        f = self.item_file
        fc = counts.setdefault(str(f), FileCount())
        rows: dict[int, int] = {}
        self._undecodable_text = 0
        for lineno, item, cat, err in self._item_lines(f, quarantine, fc):
            if err is not None:
                quarantine.add(f, lineno, self._raw_text, err[0], err[1])
            elif item in rows:
                quarantine.add(f, lineno, self._raw_text, "duplicate_item", f"movie id {item} already defined")
            else:
                rows[item] = cat
        self.items_known = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
        if self._undecodable_text:      # e.g. a Latin-1 byte in a title: the title is not read, the movie is kept
            self.notes["items_undecodable_text_kept"] = self._undecodable_text
        return pd.DataFrame({"item_id": self.items_known, "author_id": 0,
                             "category": np.fromiter(rows.values(), dtype=np.int32, count=len(rows)),
                             "duration_ms": self.duration_ms})

    def _item_lines(self, f: Path, quarantine: Quarantine, fc: FileCount):
        if self.layout == "ml100k":      # id|title|release|video release|url|19 flags, latin-1
            quarantine.watch(f, "|", 0)
            for lineno, text in read_small_lines(f, "latin-1", quarantine, fc, header=False):
                self._raw_text = text
                parts = text.split("|")
                if len(parts) != 24:
                    yield lineno, None, None, ("field_count", f"expected 24 fields separated by '|' "
                                                              f"(id, title, dates, url, 19 genre flags), got {len(parts)}")
                    continue
                flags = parts[5:]
                if _id_error(parts[0], "movie id"):
                    yield lineno, None, None, _id_error(parts[0], "movie id")
                elif any(x not in ("0", "1") for x in flags):
                    yield lineno, None, None, ("bad_value", "genre flags: expected 19 values 0/1")
                else:
                    on = [i for i, x in enumerate(flags) if x == "1"]
                    # flag 0 is "unknown": the first real genre wins, unknown only if it is the only flag
                    real = [i for i in on if i > 0]
                    yield lineno, int(parts[0]), (real[0] if real else 0), None
        elif self.layout == "recbole":
            first = open(f, "rb").readline()
            names = [c.split(":")[0] for c in split_header(first, f, "\t")]
            require_columns(f, names, ["item_id"])
            gcol = next((c for c in ("class", "genre", "genres") if c in names), None)
            if gcol is None:
                raise DataError(f"{f}: header {names} has no genre column; expected 'class:token_seq' or 'genre:token_seq'")
            ii, gi = names.index("item_id"), names.index(gcol)
            quarantine.watch(f, "\t", ii)
            for lineno, text in read_small_lines(f, "utf-8", quarantine, fc, header=True):
                self._raw_text = text
                parts = text.split("\t")
                if len(parts) != len(names):
                    yield lineno, None, None, ("field_count", f"expected {len(names)} tab-separated fields "
                                                              f"({', '.join(names)}), got {len(parts)}")
                elif undecodable(parts[ii]) or undecodable(parts[gi]):
                    yield lineno, None, None, ("bad_encoding", f"field {names[ii if undecodable(parts[ii]) else gi]!r}"
                                                               f" is not UTF-8 text")
                elif _id_error(parts[ii], "item_id"):
                    yield lineno, None, None, _id_error(parts[ii], "item_id")
                else:
                    self._undecodable_text += undecodable(text)
                    toks = parts[gi].split()
                    yield lineno, int(parts[ii]), (genre_id(toks[0]) if toks else 0), None
        else:                            # ml1m movies.dat (::, latin-1) or movies.csv (quoted csv)
            dat = self.layout == "ml1m"
            quarantine.watch(f, "::" if dat else ",", 0)
            cols = ["MovieID", "Title", "Genres"] if dat else ["movieId", "title", "genres"]
            for lineno, text in read_small_lines(f, "latin-1" if dat else "utf-8", quarantine, fc, header=not dat):
                self._raw_text = text
                parts = text.split("::") if dat else next(csv.reader(io.StringIO(text)), [])
                if len(parts) != 3:
                    yield lineno, None, None, ("field_count", "expected 3 fields (movie id, title, genres "
                                                              f"A|B), got {len(parts)}")
                elif undecodable(parts[0]) or undecodable(parts[2]):
                    yield lineno, None, None, ("bad_encoding", f"field {cols[0 if undecodable(parts[0]) else 2]!r} "
                                                               f"is not UTF-8 text")
                elif _id_error(parts[0], "movieId"):
                    yield lineno, None, None, _id_error(parts[0], "movieId")
                else:
                    self._undecodable_text += undecodable(parts[1])
                    yield lineno, int(parts[0]), genre_id(parts[2].split("|")[0]), None

    # ------------------------------------------------------------ ratings

    def event_files(self):
        layout, path = self.layout, self.ratings
        if layout == "ml100k":
            names, kinds, delim, header = ["user_id", "item_id", "rating", "ts"], None, "\t", False
        elif layout == "ml1m":
            names, delim, header = ["user_id", "item_id", "rating", "ts"], "::", False
        elif layout == "csv":
            names, delim, header = None, ",", True
        else:
            names, delim, header = None, "\t", True
        std = {"userId": "user_id", "movieId": "item_id", "timestamp": "ts", "rating": "rating",
               "user_id": "user_id", "item_id": "item_id"}

        def make_format(first: bytes | None) -> LineFormat:
            cols, labels = names, {"ts": "timestamp"}     # no header: the names of the MovieLens README
            if first is not None:
                raw = [c.split(":")[0] for c in split_header(first, path, delim)]
                require_columns(path, raw, ["userId", "movieId", "rating", "timestamp"] if layout == "csv"
                                else ["user_id", "item_id", "rating", "timestamp"])
                cols = [std.get(c, c) for c in raw]
                labels = {std.get(c, c): c for c in raw}   # details name the file's own header
            return LineFormat(path, cols, {"user_id": "int", "item_id": "int", "rating": "num", "ts": "num"}, delim,
                              labels=labels)

        return [(path, header, make_format)]

    def to_events(self, block: Block, file: Path, quarantine: Quarantine):
        block = block.reject_negative(["user_id", "item_id"], quarantine, file)
        t = block.table
        rating = t.column("rating").to_numpy()
        bad = (rating < 0) | (rating > 10)
        block = block.reject(bad, quarantine, file, "bad_value",
                             f"field {block.label('rating')!r}: expected 0..10 (MovieLens uses 0.5-5)")
        block = block.reject_bad_ts("ts", np.round(block.table.column("ts").to_numpy()) * 1000.0, quarantine, file,
                                    unit="s")
        block = self.reject_unknown_items(block, "item_id", quarantine, file)
        t = block.table
        rating = t.column("rating").to_numpy().astype(np.float32)
        ev = pd.DataFrame({
            "user_id": t.column("user_id").to_numpy(),
            "item_id": t.column("item_id").to_numpy(),
            "ts": as_int(t.column("ts").to_numpy()) * 1000,      # seconds -> ms (checked above: no overflow)
            "play_ms": np.round(np.minimum(rating, 5.0) / 5.0 * self.duration_ms).astype(np.int32),
            "duration_ms": np.int32(self.duration_ms),
            "rating": rating,
            "beh": True, "imp": True,
            "label": (rating >= self.label_min).astype(np.int8),
        })
        return block, ev
