"""Row accounting: every input row is read, then skipped, quarantined, removed by a named step, or written.

The preprocessing job records, per step, the rows that came in, the rows it
removed (by reason) and the rows that went out, and per input file the rows
read, skipped and quarantined (by reason), removed by later steps and written
to ``events/``. Two identities must hold, and the job fails naming the step
(or the file) when one does not:

* per step: ``rows_in == rows_out + sum(removed)``, and ``rows_in`` equals the
  previous step's ``rows_out`` (nothing lost between steps);
* per file: ``rows_read == skipped + quarantined + removed + written``; summed
  over files, ``rows_read`` is the first step's ``rows_in`` and ``written`` the
  last step's ``rows_out`` (the rows in ``events/``).

A step's figures come from counts the job makes anyway (table counts after
sessionizing and after every filter, the size of what a filter removes, the
rows of the written table), so a step that loses or duplicates rows breaks an
identity instead of passing unnoticed. The section is written to
``manifest.json`` as ``accounting`` and checked again by the ``accounting``
quality gate (``expectations/accounting.json``). No Spark import here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class RowAccountingError(RuntimeError):
    """The rows of a step (or file) do not add up: rows were lost or duplicated without being counted."""


def _total(removed: dict[str, int]) -> int:
    return int(sum(removed.values()))


def _fmt(removed: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in removed.items()) or "nothing"


@dataclass
class Ledger:
    """Collects the accounting of one preprocessing run; :meth:`step` checks as it goes."""

    steps: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)

    def step(self, name: str, removed: dict[str, int] | None = None, rows_out: int | None = None,
             rows_in: int | None = None) -> dict:
        """Record a step and check it at once (raises :class:`RowAccountingError` naming it).

        ``rows_in`` defaults to the previous step's ``rows_out``; ``rows_out``, when not
        counted by the step itself, is derived as ``rows_in - removed`` (marked
        ``"derived": true``): the next independently counted step then closes the chain.
        """
        removed = {k: int(v) for k, v in (removed or {}).items()}
        prev = self.steps[-1] if self.steps else None
        if rows_in is None:
            if prev is None:
                raise ValueError("the first step needs rows_in")
            rows_in = prev["rows_out"]
        derived = rows_out is None
        if derived:
            rows_out = rows_in - _total(removed)
        rec = {"step": name, "rows_in": int(rows_in), "removed": removed, "rows_out": int(rows_out)}
        if derived:
            rec["derived"] = True
        if prev is not None and rec["rows_in"] != prev["rows_out"]:
            raise RowAccountingError(
                f"row accounting: step '{name}' starts with {rec['rows_in']} rows, but the previous step "
                f"'{prev['step']}' ended with {prev['rows_out']}")
        bad = [k for k, v in removed.items() if v < 0]
        if rec["rows_out"] < 0 or bad:
            raise RowAccountingError(f"row accounting: step '{name}' has a negative count "
                                     f"(rows out {rec['rows_out']}, removed {_fmt(removed)})")
        if rec["rows_in"] != rec["rows_out"] + _total(removed):
            diff = rec["rows_in"] - rec["rows_out"] - _total(removed)
            raise RowAccountingError(
                f"row accounting does not add up at step '{name}': rows in {rec['rows_in']} != rows out "
                f"{rec['rows_out']} + removed {_total(removed)} ({_fmt(removed)}); "
                f"{abs(diff)} row(s) {'lost' if diff > 0 else 'duplicated'} without being counted")
        self.steps.append(rec)
        return rec

    def add_file(self, path: str, rows_read: int, skipped: dict[str, int], quarantined: dict[str, int],
                 written: int) -> dict:
        """Record one input file; ``removed`` (by steps after the read) is what remains."""
        rec = {"file": path, "rows_read": int(rows_read), "skipped": dict(skipped),
               "quarantined": dict(quarantined), "written": int(written)}
        rec["removed"] = rec["rows_read"] - _total(skipped) - _total(quarantined) - rec["written"]
        self.files.append(rec)
        return rec

    def check_files(self) -> None:
        """Per file and summed over files (see the module docstring); raises naming the file."""
        if not self.steps:
            raise ValueError("no steps recorded")
        for f in self.files:
            if f["removed"] < 0:
                raise RowAccountingError(
                    f"row accounting does not add up for {f['file']}: {f['rows_read']} rows read, "
                    f"{_total(f['skipped'])} skipped, {_total(f['quarantined'])} quarantined, but "
                    f"{f['written']} written ({-f['removed']} more rows out than in)")
        first, last = self.steps[0], self.steps[-1]
        read = sum(f["rows_read"] for f in self.files)
        written = sum(f["written"] for f in self.files)
        removed_files = sum(_total(f["skipped"]) + _total(f["quarantined"]) + f["removed"] for f in self.files)
        removed_steps = sum(_total(s["removed"]) for s in self.steps)
        if read != first["rows_in"]:
            raise RowAccountingError(f"row accounting: the input files hold {read} rows, but step "
                                     f"'{first['step']}' counted {first['rows_in']}")
        if written != last["rows_out"]:
            raise RowAccountingError(f"row accounting: per file {written} rows were written, but step "
                                     f"'{last['step']}' wrote {last['rows_out']}")
        if removed_files != removed_steps:  # follows from the two above and the step chain; kept explicit
            raise RowAccountingError(f"row accounting: files account for {removed_files} removed rows, "
                                     f"steps for {removed_steps}")

    def to_dict(self) -> dict:
        totals = {"rows_read": self.steps[0]["rows_in"] if self.steps else 0,
                  "removed": sum(_total(s["removed"]) for s in self.steps),
                  "written": self.steps[-1]["rows_out"] if self.steps else 0}
        return {"identity": "per step: rows_in == rows_out + sum(removed) and rows_in == previous rows_out; "
                            "per file: rows_read == skipped + quarantined + removed + written",
                "steps": self.steps, "files": self.files, "totals": totals}
