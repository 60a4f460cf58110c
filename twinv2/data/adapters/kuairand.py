"""KuaiRand (Pure / 1K / 27K) -> the canonical model (docs/data.md, "KuaiRand").

--src is a directory with one or more `log_*.csv` (one row per exposure of a video to a user) and
`video_features_basic*.csv` (one row per video). Mapping:
    items        video_id -> item_id, author_id, category = first id of `tag` (unknown_category when
                 the tag is empty), duration_ms = video_duration (else the mean duration_ms the logs
                 give for the video, else the median of the table)
    behaviours   exposures the user played: is_click == 1 or play_time_ms > 0; play_ms = play_time_ms,
                 duration_ms = the log's duration_ms (else the item's), cross feature liked = is_like
    impressions  every exposure with ts >= history_end, label = is_click
    ts           time_ms
Log rows whose video is not in the video table are quarantined (unknown_item).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twinv2.data.adapters.common import (Adapter, Block, FileCount, LineFormat, Quarantine, as_int,
                                         fetch_lines, read_lines, require_columns, split_header)

LOG_COLUMNS = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
               "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
               "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab"]
LOG_KINDS = {"user_id": "int", "video_id": "int", "time_ms": "num", "is_click": "num", "is_like": "num?",
             "play_time_ms": "num?", "duration_ms": "num?"}
VIDEO_COLUMNS = ["video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status",
                 "video_duration", "server_width", "server_height", "music_id", "music_type", "tag"]
VIDEO_KINDS = {"video_id": "int", "author_id": "int", "video_duration": "num?", "tag": "ids?"}


class KuaiRand(Adapter):
    name = "kuairand"
    cross = ("liked",)
    ts_field, ts_unit_ms, item_what = "time_ms", 1, "video_id"

    def discover(self) -> None:
        if not self.src.is_dir():
            raise FileNotFoundError(f"{self.src}: expected a KuaiRand directory holding log_*.csv and "
                                    f"video_features_basic*.csv")
        self.logs = sorted(self.src.glob("log_*.csv"))
        self.videos = sorted(self.src.glob("video_features_basic*.csv"))
        self.item_files = self.videos
        if not self.logs:
            raise FileNotFoundError(f"{self.src}: no log_*.csv file (KuaiRand interaction logs) found")
        if not self.videos:
            raise FileNotFoundError(f"{self.src}: no video_features_basic*.csv file found; it gives each "
                                    f"video's author, tag (category) and duration")
        self.meta.update({
            "label": "is_click of every exposure after history_end",
            "behaviors": "exposures with is_click == 1 or play_time_ms > 0",
            "completion_proxy": "none needed: play_ms = play_time_ms, duration_ms = duration_ms of the log",
            "category": "first id of the video's tag list",
        })

    # ------------------------------------------------------------ items

    def read_items(self, quarantine: Quarantine, counts: dict[str, FileCount]) -> pd.DataFrame:
        frames = []
        for f in self.videos:
            def make_format(first: bytes | None, f=f) -> LineFormat:
                names = split_header(first, f, ",")
                require_columns(f, names, ["video_id", "author_id", "video_duration", "tag"])
                return LineFormat(f, names, VIDEO_KINDS, ",", quoted=True)

            fc = counts.setdefault(str(f), FileCount())
            quarantine.watch(f, ",", 0)
            for block in read_lines(f, make_format, True, quarantine, fc, int(self.params.get("chunk_bytes", 32 << 20))):
                block = block.reject_negative(["video_id", "author_id"], quarantine, f)
                block = block.reject_int32("video_duration", block.table.column("video_duration").to_numpy(
                    zero_copy_only=False), quarantine, f, "items.duration_ms")
                first = pd.Series(block.table.column("tag").to_pylist(), dtype=object).str.split(",").str[0]
                tag = pd.to_numeric(first.where(first.fillna("").str.len() > 0), errors="coerce").to_numpy(np.float64)
                with np.errstate(invalid="ignore"):
                    neg = tag < 0
                if neg.any():
                    block = block.reject(neg, quarantine, f, "negative_id",
                                         [f"field 'tag': first tag {x:.0f} is negative; tag ids must be >= 0"
                                          for x in tag[neg]])
                    tag = tag[~neg]
                block = block.reject_int32("tag", tag, quarantine, f, "items.category")
                t = block.table
                vid = t.column("video_id").to_numpy()
                df = pd.DataFrame({"item_id": vid, "author_id": t.column("author_id").to_numpy(),
                                   "tag": t.column("tag").to_pylist(),
                                   "video_duration": t.column("video_duration").to_numpy(zero_copy_only=False)})
                df["file"], df["line"] = str(f), block.lines
                frames.append(df)
        if not frames:
            return pd.DataFrame({"item_id": np.zeros(0, np.int64)})
        items = pd.concat(frames, ignore_index=True)
        dup = items.duplicated("item_id", keep="first").to_numpy()
        for f, rows in items.loc[dup].groupby("file"):
            texts = fetch_lines(Path(f), rows["line"].to_numpy())
            for r, text in zip(rows.itertuples(), texts):
                quarantine.add(f, r.line, text, "duplicate_item", f"video_id {r.item_id} already defined")
        items = items.loc[~dup].reset_index(drop=True)
        first_tag = items["tag"].str.split(",").str[0]
        has_tag = first_tag.fillna("").str.len() > 0
        tags = pd.to_numeric(first_tag.where(has_tag), errors="coerce")
        # KuaiRand tag ids start at 1 (1..68 in KuaiRand-Pure): 0 is free for "unknown"
        unknown = 0 if not (tags == 0).any() else int(tags.max()) + 1
        items["category"] = tags.fillna(unknown).astype(np.int64)
        self.meta["unknown_category"] = unknown
        self.notes["items_without_tag"] = int((~has_tag).sum())
        self.items_known = np.sort(items["item_id"].to_numpy(np.int64))
        self._items = items[["item_id", "author_id", "category", "video_duration"]]
        self._log_dur: list[pd.Series] = []
        return self._items

    def after_events(self, items: pd.DataFrame) -> pd.DataFrame:
        """duration_ms: the table's video_duration, else the mean duration_ms the logs give for the video,
        else the median over the table."""
        dur = items["video_duration"].copy()
        missing = dur.isna() | (dur <= 0)
        if self._log_dur:
            g = pd.concat(self._log_dur).groupby(level=0).sum()
            dur = dur.where(~missing, items["item_id"].map(g["s"] / g["n"]))
        still = dur.isna() | (dur <= 0)
        fill = float(dur[~still].median()) if (~still).any() else 0.0
        dur = dur.where(~still, fill)
        self.notes["items_duration_from_logs"] = int((missing & ~still).sum())
        self.notes["items_duration_median_filled"] = int(still.sum())
        self._dur_map = pd.Series(dur.to_numpy(), index=items["item_id"].to_numpy())
        return items.assign(duration_ms=as_int(dur)).drop(columns=["video_duration"])

    # ------------------------------------------------------------ logs

    def event_files(self):
        def fmt_for(path: Path):
            def make_format(first: bytes | None) -> LineFormat:
                names = split_header(first, path, ",")
                require_columns(path, names, list(LOG_KINDS))
                return LineFormat(path, names, LOG_KINDS, ",")
            return make_format

        return [(p, True, fmt_for(p)) for p in self.logs]

    def to_events(self, block: Block, file: Path, quarantine: Quarantine):
        block = block.reject_negative(["user_id", "video_id"], quarantine, file)
        block = block.reject_bad_ts("time_ms", block.table.column("time_ms").to_numpy(), quarantine, file)
        for c in ("play_time_ms", "duration_ms"):
            block = block.reject_int32(c, block.table.column(c).to_numpy(zero_copy_only=False), quarantine, file,
                                       f"behaviors.{'play_ms' if c == 'play_time_ms' else c}")
        block = self.reject_unknown_items(block, "video_id", quarantine, file)
        t = block.table

        def col(name, fill=np.nan):
            return t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

        click, play, dur, like = col("is_click"), col("play_time_ms"), col("duration_ms"), col("is_like")
        bad = (play < 0) | (dur < 0) | ~np.isin(click, (0, 1))
        if bad.any():
            block = block.reject(bad, quarantine, file, "bad_value",
                                 "expected is_click in {0,1} and non-negative play_time_ms, duration_ms")
            t = block.table
            click, play, dur, like = (x[~bad] for x in (click, play, dur, like))
        vid = t.column("video_id").to_numpy()
        ok = np.isfinite(dur) & (dur > 0)
        g = pd.DataFrame({"s": dur[ok], "n": 1.0}, index=vid[ok]).groupby(level=0).sum()
        self._log_dur.append(g)             # per-video sum and count: the mean is chunking-independent
        play = np.nan_to_num(play, nan=0.0)
        ev = pd.DataFrame({
            "user_id": t.column("user_id").to_numpy(),
            "item_id": vid,
            "ts": as_int(t.column("time_ms").to_numpy()),
            "play_ms": np.round(play).astype(np.int64),           # checked above: fits int32
            "duration_ms": np.where(ok, np.round(np.nan_to_num(dur)), -1).astype(np.int64),  # -1: the item's
            "liked": (np.nan_to_num(like) > 0).astype(np.int8),
            "beh": (click == 1) | (play > 0),
            "imp": True,
            "label": (click == 1).astype(np.int8),
        })
        return block, ev

    def finalize(self, ev: pd.DataFrame, bounds: dict[str, int]) -> pd.DataFrame:
        miss = ev["duration_ms"].to_numpy() < 0
        if miss.any():
            ev.loc[miss, "duration_ms"] = as_int(ev.loc[miss, "item_id"].map(self._dur_map).to_numpy())
        ev["play_ms"] = ev["play_ms"].clip(upper=2**31 - 1).astype(np.int32)
        ev["duration_ms"] = ev["duration_ms"].clip(upper=2**31 - 1).astype(np.int32)
        return ev
