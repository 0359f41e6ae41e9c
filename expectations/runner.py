"""Data-quality gates: validate a hand-over of the Parquet contract with Great Expectations.

Run it::

    python -m expectations.runner --suite all --data OUT            # every gate over a preprocess output
    python -m expectations.runner --suite sessions --data OUT/splits/time/test --param min_session_length=2
    python -m expectations.runner --suite splits --data OUT/splits/time --manifest OUT/manifest.json
    python -m expectations.runner --suite model_inputs --data OUT/splits/time
    python -m expectations.runner --suite accounting --data OUT      # row accounting of manifest.json

Exit status 0 = every gate passed, 1 = a gate failed (the error names the table,
the expectation, the observed value and a few offending rows), 2 = the input is
not readable as the data contract at all.

Suites are the JSON files next to this module (``raw_events``, ``sessions``,
``splits``, ``model_inputs``, ``accounting``), each a GX ``ExpectationSuite`` whose
expectations carry ``meta.frame``: the derived frame (see ``derive.py``) they
are checked on. Thresholds are GX suite parameters (``{"$PARAMETER": ...}``)
filled from :class:`GateParams`.

Outputs, next to the data (``OUT/quality`` when the data lies under a folder
with a ``manifest.json``, else ``<data>/../quality``)::

    quality/<suite>/<table>/result.json     full GX validation results + the failures
    quality/<suite>/<table>/data_docs/      HTML Data Docs of that one gate (standalone runs)
    quality/data_docs/index.html            Data Docs of every gate (run_all_gates)

Engine and memory: GX runs on pandas. A gate never loads a whole table: it
reads only the columns it needs, one at a time, through pyarrow (Parquet
column projection) and hands GX narrow derived frames (~30 bytes per event);
cross-table gates work on distinct ids or per-session rows. Measured with
``python -m expectations.bench_memory --events 31700000`` (YOOCHOOSE size, 2
shared cores at load ~9, 2026-11-23): raw_events 3.8 GB peak RSS / 171 s,
sessions 3.9 GB / 132 s; at 3.17M events 0.8 GB / 22 s each (0.34 GB of it is
the GX import). That is below the Spark job's 8 GB budget, so the Spark
datasource (a JVM per process, ~9 s start) is not used; the pandas path is
taken for every size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from expectations import derive as D
from spark_jobs import contract as C

log = logging.getLogger("expectations.runner")
# GX logs every registered closure at INFO on import, and must not try to phone home from a pipeline.
for _name in ("great_expectations", "great_expectations.data_context.types.base"):
    logging.getLogger(_name).setLevel(logging.WARNING)
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SUITE_DIR = Path(__file__).resolve().parent
SUITES = ("raw_events", "sessions", "splits", "model_inputs", "accounting")

#: Columns GX reports for each offending row, per derived frame.
INDEX_COLUMNS = {
    "raw_events.schema": ["column"],
    "raw_events.events": ["session_id", "seq"],
    "sessions.events": ["session_id", "seq"],
    "sessions.sessions": ["session_id"],
    "splits.counts": ["source", "table", "figure"],
    "splits.membership": ["session_id", "tables"],
    "splits.eval_items": ["table", "item_id"],
    "splits.leakage": ["check", "earlier", "later"],
    "splits.recent": ["table", "oldest_kept_start", "newest_dropped_start"],
    "model_inputs.item_index_schema": ["column"],
    "model_inputs.item_index": ["item_id"],
    "model_inputs.indexed_items": ["table", "item_id"],
    "model_inputs.user_index": ["user_id"],
    "accounting.ledger": ["kind", "name"],
}


# --------------------------------------------------------------------------- parameters
@dataclass
class GateParams:
    """Thresholds of the gates (all overridable: ``--param name=value`` on the CLI)."""

    #: Plausible event-time range (ISO-8601 or epoch seconds). The defaults cover every
    #: public dataset used here (MovieLens 1997 .. trivago 2018) and the generator.
    ts_min: str = "1990-01-01T00:00:00+00:00"
    ts_max: str = "2040-01-01T00:00:00+00:00"
    #: Allowed share of exact-duplicate events (same session, user, item and ts).
    max_duplicate_fraction: float = 0.01
    #: Minimum session length of events / training tables; None = the preprocess
    #: parameter ``min_session_length`` from manifest.json (values < 1 mean 1).
    min_session_length: int | None = None
    #: Minimum session length of valid/test (GRU4Rec drops shorter evaluation sessions).
    min_eval_session_length: int = 2
    #: Offending rows to show per failed expectation.
    partial_unexpected_count: int = 5

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "GateParams":
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown gate parameter(s) {unknown}; known: {sorted(known)}")
        out = {}
        for k, v in values.items():
            if isinstance(v, str) and k != "ts_min" and k != "ts_max":
                v = None if v.lower() in ("", "none", "null") else (float(v) if "." in v or "e" in v else int(v))
            out[k] = v
        return cls(**out)


def _params(p: GateParams | dict | None) -> GateParams:
    return p if isinstance(p, GateParams) else GateParams.from_mapping(p)


# --------------------------------------------------------------------------- results
@dataclass
class Failure:
    """One failed expectation: enough to act on without opening the Data Docs."""

    suite: str
    table: str
    frame: str
    expectation: str
    gate: str
    kwargs: dict
    observed: Any
    unexpected_count: int | None
    element_count: int | None
    offending: list

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k not in ("batch_id",))
        head = f"[{self.suite}] table '{self.table}': {self.gate} -- {self.expectation}({args}) on frame '{self.frame}'"
        if self.unexpected_count is not None:
            pct = 100.0 * self.unexpected_count / self.element_count if self.element_count else float("nan")
            obs = f"{self.unexpected_count} of {self.element_count} rows unexpected ({pct:.4g}%)"
        else:
            obs = f"observed value {self.observed!r}"
        rows = "; ".join(json.dumps(r, default=str) for r in self.offending) if self.offending else "-"
        return f"{head}\n      observed: {obs}\n      offending rows: {rows}"


@dataclass
class GateResult:
    suite: str
    table: str
    success: bool
    failures: list[Failure]
    skipped: dict[str, str]
    statistics: dict
    result_path: Path | None = None
    data_docs_index: Path | None = None
    parameters: dict = field(default_factory=dict)


class GateFailed(RuntimeError):
    """A quality gate failed: the message names table, expectation, observed value, offending rows."""

    def __init__(self, results: list[GateResult], data_docs_index: Path | None = None):
        self.results = [r for r in results if not r.success]
        self.data_docs_index = data_docs_index
        lines = [f"{len(self.results)} quality gate(s) failed:"]
        for r in self.results:
            lines.append(f"  gate '{r.suite}' on table '{r.table}' failed "
                         f"({r.statistics.get('unsuccessful_expectations')} of "
                         f"{r.statistics.get('evaluated_expectations')} expectations):")
            lines += [f"    - {f.describe()}" for f in r.failures]
            if r.result_path:
                lines.append(f"    full result: {r.result_path}")
        docs = data_docs_index or next((r.data_docs_index for r in self.results if r.data_docs_index), None)
        if docs:
            lines.append(f"  Data Docs: {docs}")
        super().__init__("\n".join(lines))


@dataclass
class AllGatesResult:
    success: bool
    results: list[GateResult]
    data_docs_index: Path
    quality_dir: Path


# --------------------------------------------------------------------------- suites
def load_suite(name: str):
    """The suite JSON as a ``gx.ExpectationSuite`` (GX validates every expectation's kwargs)."""
    import great_expectations as gx

    p = SUITE_DIR / f"{name}.json"
    if not p.exists():
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    raw = json.loads(p.read_text())
    return gx.ExpectationSuite(name=raw["name"], expectations=raw["expectations"], meta=raw.get("meta", {}))


def suite_frames(name: str) -> dict[str, list[dict]]:
    """Expectation configurations of a suite grouped by the derived frame they check."""
    s = load_suite(name)
    out: dict[str, list[dict]] = {}
    for e in s.to_json_dict()["expectations"]:
        frame = e.get("meta", {}).get("frame")
        if not frame:
            raise ValueError(f"suite {name}: expectation {e['type']} has no meta.frame")
        e.pop("id", None)
        out.setdefault(frame, []).append(e)
    return out


# --------------------------------------------------------------------------- the GX session
class QualityRun:
    """One ephemeral GX context: every validation of one run goes into the same Data Docs."""

    def __init__(self, quality_dir: str | Path):
        import great_expectations as gx

        # GX sets its own logger levels on import; quiet them afterwards (no INFO noise per run).
        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.gx = gx
        self.quality_dir = Path(quality_dir)
        self.ctx = gx.get_context(mode="ephemeral")
        try:  # no tqdm bars in logs / CI output
            self.ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        self.ds = self.ctx.data_sources.add_pandas("frames")
        self._n = 0
        self._names: set[str] = set()
        self.results: list[GateResult] = []

    def validate(self, suite: str, table: str, frames: dict[str, pd.DataFrame], parameters: dict,
                 skipped: dict[str, str] | None = None, pcount: int = 5) -> GateResult:
        """Validate each derived frame against its part of ``suite``; write result.json."""
        skipped = dict(skipped or {})
        by_frame = suite_frames(suite)
        failures: list[Failure] = []
        frame_results: dict[str, dict] = {}
        stats = {"evaluated_expectations": 0, "successful_expectations": 0, "unsuccessful_expectations": 0}
        for frame, exps in by_frame.items():
            if frame not in frames:
                skipped.setdefault(frame, "not applicable to this table")
                continue
            df = frames[frame]
            self._n += 1
            # GX turns "." in names into folders and rejects "/" in Data Docs file names.
            name = f"{suite}-{frame}-{_slug(table).replace('.', '_')}"
            if name in self._names:
                name = f"{name}-{self._n}"
            self._names.add(name)
            gsuite = self.ctx.suites.add(self.gx.ExpectationSuite(name=name, expectations=exps))
            bd = self.ds.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
            vd = self.ctx.validation_definitions.add(self.gx.ValidationDefinition(name=name, data=bd, suite=gsuite))
            idx = [c for c in INDEX_COLUMNS.get(f"{suite}.{frame}", []) if c in df.columns]
            rf = {"result_format": "SUMMARY", "partial_unexpected_count": pcount}
            if idx:
                rf["unexpected_index_column_names"] = idx
            res = vd.run(batch_parameters={"dataframe": df}, expectation_parameters=parameters, result_format=rf)
            frame_results[frame] = res.to_json_dict()
            for er in res.results:
                stats["evaluated_expectations"] += 1
                if er.success:
                    stats["successful_expectations"] += 1
                    continue
                stats["unsuccessful_expectations"] += 1
                failures.append(_failure(suite, table, frame, er, pcount, df, idx))
        result = GateResult(suite=suite, table=table, success=not failures, failures=failures, skipped=skipped,
                            statistics=stats, parameters=parameters)
        out = self.quality_dir / suite / _slug(table) / "result.json"
        C.write_text(out, json.dumps({
            "suite": suite, "table": table, "success": result.success, "statistics": stats,
            "parameters": parameters, "skipped": skipped,
            "failures": [dataclasses.asdict(f) for f in failures],
            "frames": frame_results,
        }, indent=2, default=str))
        result.result_path = out
        self.results.append(result)
        return result

    def build_docs(self, dest: Path) -> Path:
        """Render the Data Docs of every validation so far into ``dest`` (atomically)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        name = f"site_{uuid.uuid4().hex[:8]}"
        self.ctx.add_data_docs_site(site_name=name, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(tmp)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        try:
            self.ctx.build_data_docs(site_names=[name])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        C.replace_dir(tmp, dest)
        return dest / "index.html"


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


def _failure(suite: str, table: str, frame: str, er, pcount: int, df: pd.DataFrame | None = None,
             idx: list[str] | None = None) -> Failure:
    cfg = er.expectation_config
    r = er.result or {}
    exc = getattr(er, "exception_info", None) or {}
    if exc.get("raised_exception"):
        observed = f"error: {exc.get('exception_message')}"
    else:
        observed = r.get("observed_value")
    offending = r.get("partial_unexpected_index_list") or r.get("partial_unexpected_list") or []
    flag = (cfg.meta or {}).get("offending_rows_where")
    if not offending and flag and df is not None and flag in df.columns:
        # Aggregate expectations (a mean, a fraction) name no rows: show the flagged ones.
        offending = df.loc[df[flag] != 0, [*(idx or []), flag]].head(pcount).to_dict("records")
    return Failure(suite=suite, table=table, frame=frame, expectation=cfg.type,
                   gate=(cfg.meta or {}).get("gate", cfg.type),
                   kwargs=_jsonable({k: v for k, v in cfg.kwargs.items() if k != "batch_id"}),
                   observed=_jsonable(observed), unexpected_count=r.get("unexpected_count"),
                   element_count=r.get("element_count"), offending=_jsonable(list(offending)[:pcount]))


def _slug(table: str) -> str:
    return table.strip("/").replace("/", "__").replace(" ", "_") or "table"


# --------------------------------------------------------------------------- locating things
def find_out_dir(path: str | Path) -> Path | None:
    """The preprocess output folder (the nearest ancestor holding manifest.json), if any."""
    p = Path(path).resolve()
    for q in [p, *p.parents]:
        if (q / C.MANIFEST).is_file():
            return q
    return None


def _label(path: Path, out: Path | None) -> str:
    if out is not None:
        try:
            return str(path.resolve().relative_to(out)) or "."
        except ValueError:
            pass
    return path.name


def _quality_dir(data, out_dir) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if isinstance(data, (str, Path)):
        out = find_out_dir(data)
        return (out if out is not None else Path(data).resolve().parent) / "quality"
    raise ValueError("out_dir is required when validating an in-memory table")


def _min_session_length(p: GateParams, manifest: dict) -> int:
    v = p.min_session_length
    if v is None:
        v = (manifest.get("parameters") or {}).get("min_session_length") or 1
    return max(int(v), 1)


def _finish(run: QualityRun, result: GateResult, own_run: bool, raise_on_failure: bool) -> GateResult:
    if own_run:
        result.data_docs_index = run.build_docs(run.quality_dir / result.suite / _slug(result.table) / "data_docs")
    if raise_on_failure and not result.success:
        raise GateFailed([result])
    return result


# --------------------------------------------------------------------------- gates
def validate_table(data, suite: str, *, params: GateParams | dict | None = None, out_dir=None,
                   table: str | None = None, min_session_length: int | None = None,
                   run: QualityRun | None = None, raise_on_failure: bool = True) -> GateResult:
    """Validate one events table (a Parquet folder/file, a pyarrow Table or a DataFrame)
    with ``raw_events`` or ``sessions``. Returns the :class:`GateResult`; raises
    :class:`GateFailed` on failure unless ``raise_on_failure=False``."""
    p = _params(params)
    if suite not in ("raw_events", "sessions"):
        if suite in ("splits", "model_inputs"):
            raise ValueError(f"suite {suite!r} validates a split folder: use validate_split_dir / "
                             f"validate_model_inputs (CLI: --suite {suite} --data OUT/splits/<name>)")
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    own = run is None
    run = run or QualityRun(_quality_dir(data, out_dir))
    out = find_out_dir(data) if isinstance(data, (str, Path)) else None
    label = table or (_label(Path(data), out) if isinstance(data, (str, Path)) else "dataframe")
    manifest = D.load_json(out / C.MANIFEST) if out else {}
    if suite == "raw_events":
        frames = {"schema": D.schema_frame(D.table_schema(data), C.EVENT_SCHEMA), "events": D.events_frame(data)}
        ps = {"ts_min_s": D.parse_ts(p.ts_min) / D.US, "ts_max_s": D.parse_ts(p.ts_max) / D.US,
              "max_duplicate_fraction": float(p.max_duplicate_fraction)}
        skipped = {}
    else:
        schema = D.table_schema(data)
        missing = [c for c in ("session_id", "seq", "ts") if c not in schema.names]
        if missing:
            raise D.ContractError(f"table '{label}' lacks column(s) {missing} needed by the sessions gate")
        sf = D.session_frames(data)
        frames = {"events": sf.events, "sessions": sf.sessions}
        msl = min_session_length if min_session_length is not None else _min_session_length(p, manifest)
        ps = {"min_session_length": int(msl)}
        skipped = {}
    result = run.validate(suite, label, frames, ps, skipped, p.partial_unexpected_count)
    return _finish(run, result, own, raise_on_failure)


def _split_meta(split_dir: Path) -> dict:
    return D.load_json(split_dir / C.SPLIT_META) if (split_dir / C.SPLIT_META).is_file() else {}


def validate_split_dir(split_dir, manifest_path=None, *, params: GateParams | dict | None = None, out_dir=None,
                       run: QualityRun | None = None, raise_on_failure: bool = True) -> GateResult:
    """The ``splits`` gate over one SPLIT_DIR: counts vs split.json and manifest.json,
    session membership, valid/test items in the index, the time cut, recent fractions."""
    p = _params(params)
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise D.ContractError(f"split folder {split_dir} does not exist")
    out = find_out_dir(split_dir)
    manifest_path = Path(manifest_path) if manifest_path else (out / C.MANIFEST if out else None)
    own = run is None
    run = run or QualityRun(_quality_dir(split_dir, out_dir))
    label = _label(split_dir, out)
    meta = _split_meta(split_dir)
    manifest = D.load_json(manifest_path) if manifest_path else {}
    tables = D.split_tables(split_dir)
    skipped: dict[str, str] = {}

    observed = {t: D.observed_counts(split_dir / t) for t in tables}
    for t, key in ((C.ITEM_INDEX, "n_items"), (C.USER_INDEX, "n_users")):
        if (split_dir / t).is_dir():
            observed[t] = {"rows": D.count_rows(split_dir / t)}
    stated: dict[str, tuple[str, dict]] = {}

    def with_index_counts(m: dict) -> dict:
        s = dict(m.get("tables") or {})
        for t, key in ((C.ITEM_INDEX, "n_items"), (C.USER_INDEX, "n_users")):
            if key in m:
                s[t] = {"rows": m[key]}
        return s

    in_split = list(observed)
    if meta:
        stated["split.json"] = (str(split_dir / C.SPLIT_META), with_index_counts(meta), in_split)
    else:
        skipped["counts[split.json]"] = f"{split_dir / C.SPLIT_META} is absent"
    if manifest:
        mm = (manifest.get("splits") or {}).get(split_dir.name)
        mt = with_index_counts(mm) if mm else {}
        scope = list(in_split)
        events_dir = Path(manifest_path).parent / C.EVENTS_DIR
        if "events" in manifest and events_dir.is_dir():  # OUT/events, the table the splits came from
            observed["../events"] = D.observed_counts(events_dir)
            mt["../events"] = manifest["events"]
            scope.append("../events")
        stated["manifest.json"] = (str(manifest_path), mt, scope)
    else:
        skipped["counts[manifest.json]"] = "no manifest.json"
    frames = {"counts": D.counts_frame(observed, stated), "membership": D.membership_frame(split_dir)}
    if (split_dir / C.ITEM_INDEX).is_dir():
        frames["eval_items"] = D.eval_items_frame(split_dir, D.item_index_ids(split_dir))
    else:
        raise D.ContractError(f"split folder {split_dir} has no {C.ITEM_INDEX}/ table")
    if meta.get("global_cut") or meta.get("cut_ts") or meta.get("valid_cut_ts"):
        lk = D.leakage_frame(split_dir, meta)
        if len(lk):
            frames["leakage"] = lk
        else:
            skipped["leakage"] = "no time cut stated for tables present"
    else:
        skipped["leakage"] = (f"split '{meta.get('strategy', split_dir.name)}' has no time cut "
                              f"(split.json global_cut={meta.get('global_cut')!r}, cut_ts={meta.get('cut_ts')!r})")
    rec = D.recent_frame(split_dir, tables)
    if len(rec):
        frames["recent"] = rec
    else:
        skipped["recent"] = "no train_recent_<k> tables"
    result = run.validate("splits", label, frames, {}, skipped, p.partial_unexpected_count)
    return _finish(run, result, own, raise_on_failure)


def validate_model_inputs(split_dir, *, params: GateParams | dict | None = None, out_dir=None,
                          run: QualityRun | None = None, raise_on_failure: bool = True) -> GateResult:
    """The ``model_inputs`` gate: the item (and user) index and every split table mapped to
    indices: indices in ``[0, n_items)``, unique, never NaN."""
    p = _params(params)
    split_dir = Path(split_dir)
    idx_path = split_dir / C.ITEM_INDEX
    if not idx_path.is_dir() and not idx_path.is_file():
        raise D.ContractError(f"split folder {split_dir} has no {C.ITEM_INDEX}/ table")
    out = find_out_dir(split_dir)
    own = run is None
    run = run or QualityRun(_quality_dir(split_dir, out_dir))
    label = _label(split_dir, out)
    meta = _split_meta(split_dir)
    index = D.index_frame(idx_path, "item_id", "item_idx", "support")
    n_items = int(meta.get("n_items", len(index)))
    frames = {"item_index_schema": D.schema_frame(D.table_schema(idx_path), C.ITEM_INDEX_SCHEMA),
              "item_index": index, "indexed_items": D.indexed_items_frame(split_dir, index)}
    ps = {"n_items": n_items}
    skipped = {}
    upath = split_dir / C.USER_INDEX
    if upath.exists() and D.count_rows(upath):
        users = D.index_frame(upath, "user_id", "user_idx", "n_sessions")
        frames["user_index"] = users
        ps["n_users"] = int(meta.get("n_users", len(users)))
    else:
        skipped["user_index"] = "no users in this split"
    result = run.validate("model_inputs", label, frames, ps, skipped, p.partial_unexpected_count)
    return _finish(run, result, own, raise_on_failure)


def validate_accounting(out, *, params: GateParams | dict | None = None, out_dir=None,
                        run: QualityRun | None = None, raise_on_failure: bool = True) -> GateResult:
    """The ``accounting`` gate on a preprocess output ``OUT``: every row read is skipped,
    quarantined, removed by a named step or written (``manifest.json`` ``accounting``), the
    steps chain, and the last step's rows are the rows of ``OUT/events``. A failure names
    the step (or file) in its offending rows."""
    p = _params(params)
    out = Path(out).resolve()
    if not (out / C.MANIFEST).is_file():
        raise D.ContractError(f"{out} is not a preprocess output: {C.MANIFEST} is missing")
    manifest = D.load_json(out / C.MANIFEST)
    own = run is None
    run = run or QualityRun(_quality_dir(out, out_dir))
    events = out / C.EVENTS_DIR
    n_events = D.count_rows(events) if events.exists() else None
    skipped = {} if events.exists() else {"gap_out[events]": f"{events} is absent"}
    result = run.validate("accounting", "manifest.json", {"ledger": D.ledger_frame(manifest, n_events)}, {},
                          skipped, p.partial_unexpected_count)
    return _finish(run, result, own, raise_on_failure)


def run_all_gates(out, *, params: GateParams | dict | None = None, quality_dir=None,
                  raise_on_failure: bool = True) -> AllGatesResult:
    """Every gate over a preprocess output ``OUT``; one Data Docs site for all of them.

    accounting on ``manifest.json``; raw_events + sessions on ``OUT/events``; sessions on every split table; splits and
    model_inputs on every ``OUT/splits/<name>``. All gates run (so the report lists
    every problem); then :class:`GateFailed` is raised if any failed. Returns the
    results and ``data_docs_index`` (``OUT/quality/data_docs/index.html``).
    """
    p = _params(params)
    out = Path(out).resolve()
    if not (out / C.MANIFEST).is_file():
        raise D.ContractError(f"{out} is not a preprocess output: {C.MANIFEST} is missing")
    manifest = D.load_json(out / C.MANIFEST)
    qdir = Path(quality_dir) if quality_dir else out / "quality"
    run = QualityRun(qdir)
    msl = _min_session_length(p, manifest)
    kw = dict(params=p, run=run, raise_on_failure=False)
    validate_accounting(out, **kw)
    events = out / C.EVENTS_DIR
    validate_table(events, "raw_events", **kw)
    validate_table(events, "sessions", min_session_length=msl, **kw)
    for sd in sorted(d for d in (out / C.SPLITS_DIR).glob("*") if d.is_dir()):
        for t in D.split_tables(sd):
            m = max(msl, p.min_eval_session_length) if t in (C.VALID, C.TEST) else msl
            validate_table(sd / t, "sessions", min_session_length=m, **kw)
        validate_split_dir(sd, out / C.MANIFEST, **kw)
        validate_model_inputs(sd, **kw)
    docs = run.build_docs(qdir / "data_docs")
    res = AllGatesResult(success=all(r.success for r in run.results), results=run.results,
                         data_docs_index=docs, quality_dir=qdir)
    C.write_text(qdir / "summary.json", json.dumps({
        "success": res.success, "data_docs_index": str(docs),
        "gates": [{"suite": r.suite, "table": r.table, "success": r.success, "result": str(r.result_path),
                   "failed": [f.gate for f in r.failures], "skipped": r.skipped} for r in run.results],
    }, indent=2))
    if raise_on_failure and not res.success:
        raise GateFailed(run.results, docs)
    return res


def gates_for_demo(out, params: GateParams | dict | None = None) -> Path:
    """Run every gate over ``OUT`` (raising :class:`GateFailed` on failure) and return the
    Data Docs index to print: ``print(f"Data Docs: {gates_for_demo(out)}")``."""
    return run_all_gates(out, params=params).data_docs_index


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m expectations.runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, choices=[*SUITES, "all"])
    ap.add_argument("--data", required=True, help="events table, split folder, or OUT for --suite all / accounting")
    ap.add_argument("--manifest", help="manifest.json (default: found above --data)")
    ap.add_argument("--out-dir", help="where result.json and Data Docs go (default: OUT/quality)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help=f"gate threshold, one of {[f.name for f in dataclasses.fields(GateParams)]}")
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    kv = {}
    for it in a.param:
        if "=" not in it:
            raise SystemExit(f"--param expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        kv[k] = v
    try:
        params = GateParams.from_mapping(kv)
        if a.suite == "all":
            res = run_all_gates(a.data, params=params, quality_dir=a.out_dir)
            print(f"all {len(res.results)} gates passed; Data Docs: {res.data_docs_index}")
            return 0
        if a.suite == "accounting":
            r = validate_accounting(a.data, params=params, out_dir=a.out_dir)
        elif a.suite in ("raw_events", "sessions"):
            r = validate_table(a.data, a.suite, params=params, out_dir=a.out_dir)
        elif a.suite == "splits":
            r = validate_split_dir(a.data, a.manifest, params=params, out_dir=a.out_dir)
        else:
            r = validate_model_inputs(a.data, params=params, out_dir=a.out_dir)
        print(f"gate '{r.suite}' passed on '{r.table}' ({r.statistics['evaluated_expectations']} expectations; "
              f"skipped: {r.skipped or 'none'}); result: {r.result_path}; Data Docs: {r.data_docs_index}")
        return 0
    except GateFailed as e:
        print(str(e), file=sys.stderr)
        return 1
    except (D.ContractError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
