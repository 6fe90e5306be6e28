"""Hostile and broken exports: each is refused precisely, and everything good beside it still loads.

Exports come from other organizations' systems. Each test builds the small valid export of
``test_ingest_bad_input`` (3 Patients, 3 Encounters, 4 Observations), adds one hostile thing, ingests it and
checks what was refused (reason, file, line), that every good resource loaded, and that the run reconciles; or,
for a broken manifest, that the run fails with one line naming the problem before anything is recorded.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from odyssey_batch.ingest import begin_run, commit_run, ingest, stage_files
from odyssey_batch.ingest.discover import ManifestError, plan_export
from odyssey_batch.ingest.validate import MAX_DEPTH
from odyssey_batch.storage.location import LocalLocation, UnsafeName, escapes, unsafe_segments
from odyssey_batch.warehouse import connect
from tests.test_ingest_bad_input import (
    ALL,
    ENCOUNTERS,
    OBSERVATIONS,
    PATIENTS,
    _version,
    assert_reconciled,
    base_files,
    counts_of,
    dump,
    loaded_ids,
    manifest,
    ndjson_bytes,
    only_quarantined,
    patient,
    quarantine,
    where,
    without,
    write_export,
)


@pytest.fixture
def run(db_url, settings, tmp_path):
    """Write an export into tmp_path/<name> and ingest it, with optional setting overrides (size limits)."""

    def go(files: dict, name: str = "export", **overrides):
        return ingest(str(write_export(tmp_path / name, files)), settings.with_overrides(**overrides), url=db_url)

    return go


def nothing_recorded(query) -> None:
    """A refused export leaves no run, no file, no quarantine row and no resource behind."""
    for table in ("ops.ingest_run", "ops.ingest_file", "ops.quarantine", "fhir.resource", "staging.resource"):
        assert query(f"SELECT count(*) FROM {table}") == [(0,)], table


def file_rows(query, run_id: int) -> list[tuple]:
    """(source, line_no, reason, error) of the run's file problems."""
    return query(
        """SELECT source, line_no, reason, error FROM ops.quarantine
           WHERE run_id = %s AND kind = 'file' ORDER BY source""",
        (run_id,),
    )


# ----------------------------------------------------------------------------------------------------------------
# Links and names
# ----------------------------------------------------------------------------------------------------------------


def test_links_are_refused_and_never_read(run, query, tmp_path):
    outside = write_export(tmp_path / "outside", {"Patient.ndjson": [dump(patient("px", "1970-01-01", "male"))]})
    export = write_export(tmp_path / "export", base_files())
    (export / "Condition.ndjson").symlink_to(outside / "Patient.ndjson")  # a file outside
    (export / "more").symlink_to(outside)  # a folder outside
    (export / "Observation.001.ndjson").symlink_to(export / "Observation.ndjson")  # a file inside
    (export / "dangling.ndjson").symlink_to(tmp_path / "nowhere.ndjson")

    result = run({})

    assert file_rows(query, result.run_id) == [
        ("Condition.ndjson", None, "symlink", "a symbolic link to a path outside the folder: links are never followed"),
        ("Observation.001.ndjson", None, "symlink",
         "a symbolic link to a path inside the folder: links are never followed"),
        ("dangling.ndjson", None, "symlink", "a symbolic link to a path outside the folder: links are never followed"),
        ("more", None, "symlink", "a symbolic link to a path outside the folder: links are never followed"),
    ]  # fmt: skip
    assert loaded_ids(query) == ALL  # px, only reachable through the links, did not load
    assert query("SELECT file FROM ops.ingest_file WHERE run_id = %s ORDER BY 1", (result.run_id,)) == [
        ("Encounter.ndjson",),
        ("Observation.ndjson",),
        ("Patient.ndjson",),
    ]
    assert counts_of(result) == (10, 10, 0, 0, 4)
    assert_reconciled(result, query)


def test_a_symlinked_manifest_refuses_the_export(db_url, settings, query, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_bytes(manifest({"Patient.ndjson": 3}))
    export = write_export(tmp_path / "export", base_files())
    (export / "manifest.json").symlink_to(outside / "manifest.json")

    with pytest.raises(ManifestError) as error:
        ingest(str(export), settings, url=db_url)

    assert str(error.value) == (
        "manifest.json is refused (symlink): a symbolic link to a path outside the folder: links are never followed"
    )
    nothing_recorded(query)


def test_a_file_swapped_for_a_link_after_listing_is_refused_when_opened(db_url, settings, query, tmp_path):
    outside = write_export(tmp_path / "outside", {"Observation.ndjson": [dump(OBSERVATIONS[0] | {"id": "ox"})]})
    export = write_export(tmp_path / "export", base_files())
    location = LocalLocation(export)
    plan = plan_export(location)
    (export / "Observation.ndjson").unlink()
    (export / "Observation.ndjson").symlink_to(outside / "Observation.ndjson")  # after the listing

    conn = connect(db_url)
    try:
        run_id = begin_run(conn, location.uri, plan)
        stage_files(conn, run_id, location, plan.files, settings)
        counts = commit_run(conn, run_id)
    finally:
        conn.close()

    assert file_rows(query, run_id) == [
        ("Observation.ndjson", 0, "symlink", "a symbolic link: links are never followed")
    ]
    assert loaded_ids(query) == without(Observation=ALL["Observation"])
    assert (counts["records"], counts["loaded"], counts["file_problems"]) == (6, 6, 1)


def test_open_reads_only_regular_files_inside_the_location(tmp_path):
    root = write_export(tmp_path / "root", {"a.ndjson": b"{}\n"})
    (root / "sub").mkdir()
    (root / "sub" / "b.ndjson").write_bytes(b"[]\n")
    (root / "linked").symlink_to(root / "sub")
    (root / "link.ndjson").symlink_to(root / "a.ndjson")
    os.mkfifo(root / "pipe.ndjson")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    location = LocalLocation(root)

    with location.open("sub/b.ndjson") as fh:
        assert fh.read() == b"[]\n"
    with location.open("./sub//b.ndjson") as fh:  # harmless spellings of a name inside
        assert fh.read() == b"[]\n"
    for name, reason in [
        ("../secret.txt", "unsafe-name"),
        ("sub/../../secret.txt", "unsafe-name"),
        (str(tmp_path / "secret.txt"), "unsafe-name"),
        ("link.ndjson", "symlink"),
        ("linked/b.ndjson", "symlink"),
        ("pipe.ndjson", "special-file"),  # refused at once: opening a FIFO does not wait for a writer
        ("sub", "special-file"),
    ]:
        with pytest.raises(UnsafeName) as error, location.open(name):
            pass
        assert error.value.entry.reason == reason, name

    listing = location.listing()
    assert [f.name for f in listing.files] == ["a.ndjson", "sub/b.ndjson"]
    assert [(r.name, r.reason) for r in listing.refused] == [
        ("link.ndjson", "symlink"),
        ("linked", "symlink"),
        ("pipe.ndjson", "special-file"),
    ]
    assert location.list_files() == listing.files


def test_names_that_could_leave_a_location():
    for name in ["a/../b", "../b", "/etc/passwd", "a/.."]:
        assert escapes(name) and unsafe_segments(name), name
    for name in ["a//b", "./a", "a/./b", "a/"]:
        assert unsafe_segments(name) and not escapes(name), name
    for name in ["a", "a/b.ndjson", "a..b/c...ndjson", ".hidden/x"]:
        assert not unsafe_segments(name) and not escapes(name), name


def test_file_names_that_are_not_utf8_are_refused_and_shown_escaped(run, query, tmp_path):
    export = write_export(tmp_path / "export", base_files())
    stray = dump(OBSERVATIONS[0] | {"id": "ox"}).encode() + b"\n"
    (Path(os.fsdecode(bytes(export) + b"/Observation-\xff.ndjson"))).write_bytes(stray)
    folder = Path(os.fsdecode(bytes(export) + b"/late-\xe9t\xe9"))
    folder.mkdir()
    (folder / "Observation.ndjson").write_bytes(stray)

    result = run({})

    assert file_rows(query, result.run_id) == [
        ("Observation-\\xff.ndjson", None, "file-name-not-utf8", "name is not valid UTF-8 (shown with \\x escapes)"),
        ("late-\\xe9t\\xe9", None, "file-name-not-utf8", "name is not valid UTF-8 (shown with \\x escapes)"),
    ]
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (10, 10, 0, 0, 2)
    assert_reconciled(result, query)


def test_special_files_are_refused(run, query, tmp_path):
    export = write_export(tmp_path / "export", base_files())
    os.mkfifo(export / "Condition.ndjson")  # reading it would block forever

    result = run({})

    assert file_rows(query, result.run_id) == [
        ("Condition.ndjson", None, "special-file", "not a regular file (a FIFO, socket or device)")
    ]
    assert loaded_ids(query) == ALL
    assert_reconciled(result, query)


def test_an_export_of_nothing_but_refused_entries_fails_clearly(db_url, settings, query, tmp_path):
    outside = write_export(tmp_path / "outside", base_files())
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").symlink_to(outside / "Patient.ndjson")

    with pytest.raises(FileNotFoundError) as error:
        ingest(str(export), settings, url=db_url)

    assert str(error.value) == (
        f"no FHIR files (*.ndjson[.gz], *.json[.gz]) found in {LocalLocation(export).uri}; 1 entries refused, "
        "e.g. Patient.ndjson: a symbolic link to a path outside the folder: links are never followed"
    )
    nothing_recorded(query)


# ----------------------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------------------

BASE = "https://ehr.example.org/fhir/bulkfiles/5f0b"


def _manifest(**changes) -> dict:
    out = json.loads(manifest({"Patient.ndjson": 3, "Encounter.ndjson": 3, "Observation.ndjson": 4}))
    out.update(changes)
    return out


def _output(**entry) -> list[dict]:
    """The base manifest's outputs, the Observation entry changed (a None value removes the field)."""
    outputs = _manifest()["output"]
    outputs[2] = {k: v for k, v in {**outputs[2], **entry}.items() if v is not None}
    return outputs


MALFORMED_MANIFESTS = {
    "invalid JSON": (b'{"output": [',
                     "manifest.json is not valid JSON: unexpected end of data: line 1 column 13 (char 12)"),
    "not an object": (b"[]", "manifest.json is not a JSON object"),
    "output not a list": (_manifest(output={"url": "x"}),
                          "manifest.json: 'output' must be a list, not {\"url\":\"x\"}"),
    "error not a list": (_manifest(error="none"), "manifest.json: 'error' must be a list, not \"none\""),
    "entry not an object": (_manifest(output=[*_output()[:2], "Observation.ndjson"]),
                            'manifest.json: output[2] must be an object, not "Observation.ndjson"'),
    "url missing": (_manifest(output=_output(url=None)), "manifest.json: output[2].url is missing"),
    "url not a string": (_manifest(output=_output(url=7)), "manifest.json: output[2].url 7 is not a URL"),
    "count a string": (_manifest(output=_output(count="4")),
                       'manifest.json: output[2].count "4" is not a whole number'),
    "count negative": (_manifest(output=_output(count=-1)), "manifest.json: output[2].count -1 is not a whole number"),
    "count a boolean": (_manifest(output=_output(count=True)),
                        "manifest.json: output[2].count true is not a whole number"),
    "type unknown": (_manifest(output=_output(type="Observaton")),
                     'manifest.json: output[2].type "Observaton" is not a FHIR resource type'),
    "transactionTime not a date": (_manifest(transactionTime="yesterday"),
                                   'manifest.json: transactionTime "yesterday" is not an instant with a time zone '
                                   "(2024-08-02T01:00:00Z)"),
    "transactionTime a number": (_manifest(transactionTime=20240802),
                                 "manifest.json: transactionTime 20240802 is not an instant with a time zone "
                                 "(2024-08-02T01:00:00Z)"),
    "transactionTime without a zone": (_manifest(transactionTime="2024-08-02T01:00:00"),
                                       'manifest.json: transactionTime "2024-08-02T01:00:00" is not an instant with a '
                                       "time zone (2024-08-02T01:00:00Z)"),
    "file listed twice": (_manifest(output=[*_output(), _output()[0]]),
                          "manifest.json: Patient.ndjson is listed twice"),
    "url a local file": (_manifest(output=_output(url="file:///etc/passwd")),
                         'manifest.json: output[2].url "file:///etc/passwd" is neither an http(s) URL nor a relative '
                         "path in the export"),
    "url an absolute path": (_manifest(output=_output(url="/etc/Observation.ndjson")),
                             'manifest.json: output[2].url "/etc/Observation.ndjson" is an absolute path: only files '
                             "inside the export are read"),
    "url with ..": (_manifest(output=_output(url="../other/Observation.ndjson")),
                    "manifest.json: output[2].url \"../other/Observation.ndjson\" contains '..': only files inside "
                    "the export are read"),
    "http url with ..": (_manifest(output=_output(url=f"{BASE}/../../Observation.ndjson")),
                         f"manifest.json: output[2].url \"{BASE}/../../Observation.ndjson\" contains '..': only files "
                         "inside the export are read"),
    "http url with escaped ..": (_manifest(output=_output(url=f"{BASE}/%2e%2e/Observation.ndjson")),
                                 f"manifest.json: output[2].url \"{BASE}/%2e%2e/Observation.ndjson\" contains '..': "
                                 "only files inside the export are read"),
    "error url with ..": (_manifest(error=[{"type": "OperationOutcome", "url": "..\\..\\errors.ndjson"}]),
                          "manifest.json: error[0].url \"..\\\\..\\\\errors.ndjson\" contains '..': only files "
                          "inside the export are read"),
}  # fmt: skip


def test_malformed_manifests_refuse_the_export_with_one_line(db_url, settings, query, tmp_path):
    for case, (content, message) in MALFORMED_MANIFESTS.items():
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        export = write_export(tmp_path / case.replace(" ", "-"), {**base_files(), "manifest.json": data})

        with pytest.raises(ManifestError) as error:
            ingest(str(export), settings, url=db_url)

        assert str(error.value) == message, case
    nothing_recorded(query)


def test_manifest_larger_than_the_resource_limit_is_refused(db_url, settings, query, tmp_path):
    data = json.dumps(_manifest(request="x" * 5000)).encode()
    export = write_export(tmp_path / "export", {**base_files(), "manifest.json": data})

    with pytest.raises(ManifestError) as error:
        ingest(str(export), settings.with_overrides(max_resource_bytes=4096), url=db_url)

    assert str(error.value) == "manifest.json is larger than 4,096 bytes (ODYSSEY_MAX_RESOURCE_BYTES)"
    nothing_recorded(query)


def test_a_well_formed_manifest_with_relative_urls_and_no_counts_loads(run, query):
    outputs = [{"type": t, "url": f"./{t}.ndjson"} for t in ("Patient", "Encounter", "Observation")]
    result = run({**base_files(), "manifest.json": json.dumps(_manifest(output=outputs)).encode()})

    assert loaded_ids(query) == ALL
    assert counts_of(result) == (10, 10, 0, 0, 0)
    assert_reconciled(result, query)


# ----------------------------------------------------------------------------------------------------------------
# The command line: one line, no traceback, a non-zero exit
# ----------------------------------------------------------------------------------------------------------------


def cli_ingest(folder: Path, db_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80", "ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"),
           "ODYSSEY_INGEST_WORKERS": "1"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "odyssey_batch.cli.main", "ingest", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_broken_exports_with_one_line(db_url, query, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_bytes(manifest({"Patient.ndjson": 3}))
    cases = {
        "count": (json.dumps(_manifest(output=_output(count="4"))).encode(),
                  'ingest failed: manifest.json: output[2].count "4" is not a whole number'),
        "brackets": (json.dumps(_manifest(output=[{"url": "[red]x[/red]", "type": "[bold]"}])).encode(),
                     'ingest failed: manifest.json: output[0].type "[bold]" is not a FHIR resource type'),
        "link": (outside / "manifest.json", "ingest failed: manifest.json is refused (symlink): a symbolic link to a "
                                            "path outside the folder: links are never followed"),
    }  # fmt: skip
    for name, (content, line) in cases.items():
        export = write_export(tmp_path / name, base_files())
        if isinstance(content, Path):
            (export / "manifest.json").symlink_to(content)
        else:
            (export / "manifest.json").write_bytes(content)

        proc = cli_ingest(export, db_url, tmp_path)

        assert proc.returncode == 1, (name, proc.stderr)
        assert proc.stderr.splitlines() == [line], name  # one line however narrow the terminal
        assert "Traceback" not in proc.stdout + proc.stderr
    nothing_recorded(query)


def test_cli_loads_the_good_part_of_a_hostile_export(db_url, query, tmp_path):
    outside = write_export(tmp_path / "outside", {"Patient.ndjson": [dump(patient("px", "1970-01-01", "male"))]})
    files = base_files()
    files["Observation.ndjson"].append("[" * 100_000 + "]" * 100_000)
    export = write_export(tmp_path / "export", files)
    (export / "Condition.ndjson").symlink_to(outside / "Patient.ndjson")

    proc = cli_ingest(export, db_url, tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "11 resources read = 10 loaded" in proc.stdout
    assert "symlink 1" in proc.stdout and "too-deeply-nested 1" in proc.stdout
    assert loaded_ids(query) == ALL


# ----------------------------------------------------------------------------------------------------------------
# Nesting
# ----------------------------------------------------------------------------------------------------------------


def nested_extension(levels: int) -> dict:
    """An extension holding an extension ... ``levels`` deep (2 JSON levels each: object and array)."""
    ext: dict = {"url": "http://example.org/leaf", "valueString": "leaf"}
    for _ in range(levels - 1):
        ext = {"url": "http://example.org/node", "extension": [ext]}
    return ext


def nested_bundle(levels: int) -> dict:
    bundle: dict = {"resourceType": "Bundle", "id": "b0", "type": "collection"}
    for i in range(1, levels):
        bundle = {"resourceType": "Bundle", "id": f"b{i}", "type": "collection", "entry": [{"resource": bundle}]}
    return bundle


def test_deeply_nested_ndjson_lines_are_quarantined(run, query):
    files = base_files()
    deep_array = "[" * 100_000 + "]" * 100_000
    deep_object = '{"a":' * 100_000 + "1" + "}" * 100_000
    too_deep = patient("p4", "1999-01-01", "female") | {"extension": [nested_extension(60)]}  # 2 + 120 levels
    deep_enough = patient("p5", "1999-01-01", "female") | {"extension": [nested_extension(40)]}  # 2 + 80 levels
    files["Patient.ndjson"] += [deep_array, deep_object, dump(too_deep), dump(deep_enough)]

    result = run(files)

    rows = quarantine(query, result.run_id)
    assert [(r["line_no"], r["reason"], r["resource_id"]) for r in rows] == [
        (4, "too-deeply-nested", None),
        (5, "too-deeply-nested", None),
        (6, "too-deeply-nested", "p4"),
    ]
    assert rows[0]["error"].startswith("invalid JSON: depth limit exceeded") and rows[0]["raw_text"] == deep_array
    assert rows[1]["raw_text"] == deep_object
    assert rows[2]["error"] == f"JSON objects and arrays nest more than {MAX_DEPTH} levels deep"
    assert json.loads(rows[2]["raw_text"]) == too_deep
    assert loaded_ids(query) == {**ALL, "Patient": ["p1", "p2", "p3", "p5"]}
    assert counts_of(result) == (14, 11, 3, 0, 0)
    assert_reconciled(result, query)


def test_deeply_nested_bundles_are_quarantined(run, query):
    files = base_files()
    del files["Patient.ndjson"]
    too_deep = nested_bundle(200)  # 600 JSON levels: orjson parses it, validating it would recurse
    entries = [{"resource": PATIENTS[0]}, {"resource": too_deep}, {"resource": PATIENTS[1]}, 7, {"resource": 7},
               {"resource": PATIENTS[2]}]  # fmt: skip
    files["patients.json"] = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()
    files["unparseable.json"] = b'{"resourceType": "Bundle", "entry": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    result = run(files)

    rows = quarantine(query, result.run_id)
    assert [(r["source"], r["line_no"], r["kind"], r["reason"], r["resource_id"]) for r in rows] == [
        ("patients.json", 2, "line", "too-deeply-nested", "b199"),
        ("patients.json", 4, "line", "not-a-resource", None),
        ("patients.json", 5, "line", "not-a-resource", None),
        ("unparseable.json", 1, "file", "too-deeply-nested", None),
    ]
    assert rows[0]["resource_type"] == "Bundle" and rows[0]["raw_text"] is None
    assert rows[1]["error"] == "Bundle.entry[3] is not a JSON object" and rows[1]["raw_text"] == "7"
    assert rows[2]["error"] == "expected a JSON object, got int" and rows[2]["raw_text"] == "7"
    assert rows[3]["error"].startswith("file is not valid JSON: depth limit exceeded")
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (13, 10, 3, 0, 1)
    assert_reconciled(result, query)


def test_a_bundle_nested_within_the_limit_loads(run, query):
    files = base_files()
    files["nested.json"] = json.dumps(nested_bundle(20)).encode()  # 58 levels: odd, but valid

    result = run(files)

    assert quarantine(query, result.run_id) == []
    # The document's one entry, a Bundle nesting 18 more, is loaded as the resource it is.
    assert query("SELECT resource_id FROM fhir.resource WHERE resource_type = 'Bundle'") == [("b18",)]
    assert counts_of(result) == (11, 11, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# Size limits
# ----------------------------------------------------------------------------------------------------------------


def padded(resource: dict, size: int) -> str:
    """The resource as one NDJSON line of exactly ``size`` bytes (padding in code.text)."""
    out = copy.deepcopy(resource)
    out["code"]["text"] = ""
    pad = size - len(dump(out).encode())
    assert pad >= 0
    out["code"]["text"] = "x" * pad
    line = dump(out)
    assert len(line.encode()) == size
    return line


def test_a_line_over_the_resource_limit_is_quarantined_without_holding_it(run, query):
    files = base_files()
    at_limit = padded(OBSERVATIONS[0], 8192)
    over = padded(OBSERVATIONS[1], 8193)
    huge = padded(OBSERVATIONS[2], 3_000_000)
    files["Observation.ndjson"] = [at_limit, over, huge, dump(OBSERVATIONS[3])]

    result = run(files, max_resource_bytes=8192, ingest_workers=2)  # TooLarge crosses to a worker process

    rows = quarantine(query, result.run_id)
    assert [where(r) for r in rows] == [
        ("Observation.ndjson", 2, "line", "too-large", None),
        ("Observation.ndjson", 3, "line", "too-large", None),
    ]
    assert rows[0]["error"] == (
        "line is 8,193 bytes, more than the 8,192 a resource may have (ODYSSEY_MAX_RESOURCE_BYTES); "
        "its first 4,096 bytes are kept"
    )
    assert rows[1]["error"].startswith("line is 3,000,000 bytes, more than the 8,192")
    assert rows[0]["raw_text"] == over[:4096] and rows[1]["raw_text"] == huge[:4096]
    assert loaded_ids(query) == without(Observation=["o2", "o3"])  # the line after the huge one loaded
    assert counts_of(result) == (10, 8, 2, 0, 0)
    assert_reconciled(result, query)


def test_a_file_over_the_file_limit_loads_the_lines_within_it(run, query):
    files = base_files()
    lines = [dump(o) for o in OBSERVATIONS]
    limit = len(ndjson_bytes(lines[:3]))  # exactly the first three lines with their newlines

    result = run({**files, "Observation.ndjson": lines}, max_file_bytes=limit)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 4, "file", "file-too-large", None)
    assert row["error"] == (
        f"file is larger than {limit:,} bytes uncompressed (ODYSSEY_MAX_FILE_BYTES); line 4 and after were not read"
    )
    assert loaded_ids(query) == without(Observation=["o4"])
    assert counts_of(result) == (9, 9, 0, 0, 1)
    assert_reconciled(result, query)


def gzip_bomb(head: bytes, expanded: int) -> bytes:
    """``head`` followed by ``expanded`` zero bytes without a newline, gzipped (about 1000:1) piece by piece."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [out.compress(head)]
    block = bytes(1 << 20)
    for _ in range(expanded // len(block)):
        parts.append(out.compress(block))
    parts.append(out.flush())
    return b"".join(parts)


def test_a_gzip_bomb_is_refused_quickly_in_bounded_memory(run, query):
    files = base_files()
    del files["Observation.ndjson"]
    head = ndjson_bytes([dump(o) for o in OBSERVATIONS[:3]])
    bomb = gzip_bomb(head, 256 << 20)  # 256 MiB of zeros
    assert len(bomb) < 1 << 20
    files["Observation.ndjson.gz"] = bomb

    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = run(files, max_resource_bytes=1 << 20, max_file_bytes=4 << 20)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson.gz", 4, "file", "file-too-large", None)
    assert row["error"] == (
        "file is larger than 4,194,304 bytes uncompressed (ODYSSEY_MAX_FILE_BYTES); line 4 and after were not read"
    )
    assert loaded_ids(query) == without(Observation=["o4"])
    assert counts_of(result) == (9, 9, 0, 0, 1)
    assert_reconciled(result, query)
    assert seconds < 10, seconds  # stopped at 4 MiB, not after expanding 512 MiB
    assert peak < 24 << 20, peak  # a few line buffers, never the expanded file


def test_a_document_over_the_limit_is_refused_unread(run, query):
    files = base_files()
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": p | {"id": f"q{i}"}} for i, p in enumerate(PATIENTS * 40)]}  # fmt: skip
    data = gzip.compress(json.dumps(bundle).encode(), mtime=0)
    files["more-patients.json.gz"] = data

    result = run(files, max_resource_bytes=16_384)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("more-patients.json.gz", 1, "file", "too-large", None)
    assert row["error"] == (
        "document is larger than 16,384 bytes uncompressed (ODYSSEY_MAX_RESOURCE_BYTES, or ODYSSEY_MAX_FILE_BYTES "
        "if smaller): a JSON document is parsed whole, so it was not loaded"
    )
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (10, 10, 0, 0, 1)
    assert_reconciled(result, query)


# ----------------------------------------------------------------------------------------------------------------
# Duplicates with different content
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "last_updated"),
    [("3", "2024-07-01T04:00:00Z"), (None, "2024-07-01T04:00:00Z"), ("3", None), (None, None)],
)
def test_equally_new_copies_that_differ_keep_the_latest_and_quarantine_the_other(run, query, version, last_updated):
    first = _version(OBSERVATIONS[0], version, last_updated)
    second = _version(OBSERVATIONS[0], version, last_updated, status="amended")
    files = base_files()
    files["Observation.ndjson"][0] = dump(second)  # Observation.ndjson comes after Observation.001.ndjson
    files["Observation.001.ndjson"] = [dump(first)]

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.001.ndjson", 1, "line", "conflicting-duplicate", "o1")
    shown = "-" if last_updated is None else "2024-07-01 04:00:00+00"
    assert row["error"] == (
        "conflicts with another copy of Observation/o1 in the same export (Observation.ndjson, line 1) that is as "
        f"new (versionId {version or '-'}, lastUpdated {shown}) but differs; the copy latest in the export was kept"
    )
    assert json.loads(row["raw_text"]) == first
    assert query("SELECT status FROM ehr.observation WHERE observation_id = 'o1'") == [("amended",)]
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (11, 10, 1, 0, 0)
    assert result.counts["quarantine_reasons"] == {"conflicting-duplicate": 1}
    assert_reconciled(result, query)


def test_conflicting_copies_give_the_same_result_every_time(run, query):
    copies = [_version(ENCOUNTERS[0], "1", None, status=s) for s in ("planned", "finished", "cancelled")]
    files = base_files()
    files["Encounter.ndjson"][0] = dump(copies[0])
    files["Encounter.ndjson"] += [dump(copies[1]), dump(copies[2])]

    first = run(files, name="day1")
    again = run(files, name="day2")

    for result in (first, again):
        rows = quarantine(query, result.run_id)
        assert [(r["line_no"], r["reason"]) for r in rows] == [
            (1, "conflicting-duplicate"),
            (4, "conflicting-duplicate"),
        ]
    assert query("SELECT status FROM ehr.encounter WHERE encounter_id = 'e1'") == [("cancelled",)]
    assert (again.counts["loaded"], again.counts["unchanged"]) == (0, 10)


# ----------------------------------------------------------------------------------------------------------------
# Control characters
# ----------------------------------------------------------------------------------------------------------------


def test_control_characters_in_strings_are_quarantined(run, query):
    files = base_files()
    bell = copy.deepcopy(PATIENTS[2])
    bell["name"][0]["family"] = "Fam\u0007ily"
    escape = copy.deepcopy(OBSERVATIONS[3])
    escape["code"]["text"] = "Glucose \u001b[31mred"
    backspace = copy.deepcopy(OBSERVATIONS[2])
    backspace["code"]["coding"][0]["display"] = "Potassium\b"
    allowed = copy.deepcopy(OBSERVATIONS[1])
    allowed["code"]["text"] = "Sodium\tSerPl\r\nline two"
    windows_path = copy.deepcopy(OBSERVATIONS[0])
    windows_path["code"]["text"] = "C:\\bin\\file"  # a backslash before b and f: no control character
    files["Patient.ndjson"][2] = dump(bell)
    files["Observation.ndjson"] = [dump(r) for r in (windows_path, allowed, backspace, escape)]

    result = run(files)

    rows = quarantine(query, result.run_id)
    assert [(r["source"], r["line_no"], r["reason"], r["resource_id"], r["error"]) for r in rows] == [
        ("Observation.ndjson", 3, "control-character", "o3",
         "Observation.code.coding[0].display contains the control character U+0008; FHIR strings hold no character "
         "below U+0020 but tab, CR and LF"),
        ("Observation.ndjson", 4, "control-character", "o4",
         "Observation.code.text contains the control character U+001B; FHIR strings hold no character below U+0020 "
         "but tab, CR and LF"),
        ("Patient.ndjson", 3, "control-character", "p3",
         "Patient.name[0].family contains the control character U+0007; FHIR strings hold no character below U+0020 "
         "but tab, CR and LF"),
    ]  # fmt: skip
    assert [json.loads(r["raw_text"]) for r in rows] == [backspace, escape, bell]
    assert loaded_ids(query) == without(Patient=["p3"], Observation=["o3", "o4"])
    assert query(
        "SELECT resource_id, body->'code'->>'text' FROM fhir.resource WHERE resource_id IN ('o1', 'o2') ORDER BY 1"
    ) == [("o1", "C:\\bin\\file"), ("o2", "Sodium\tSerPl\r\nline two")]  # kept exactly
    assert counts_of(result) == (10, 7, 3, 0, 0)
    assert_reconciled(result, query)


def test_control_characters_in_a_bundle_and_raw_control_bytes(run, query):
    files = base_files()
    bell = copy.deepcopy(PATIENTS[2])
    bell["name"][0]["given"] = ["Te\u0001st"]
    del files["Patient.ndjson"]
    files["patients.json"] = json.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in (*PATIENTS[:2], bell)]}
    ).encode()
    raw = dump(OBSERVATIONS[3]).replace("Glucose", "Glu\x02cose").encode()  # a raw control byte: not JSON
    files["Observation.ndjson"][3] = raw

    result = run(files)

    rows = quarantine(query, result.run_id)
    assert [(r["source"], r["line_no"], r["reason"], r["resource_id"]) for r in rows] == [
        ("Observation.ndjson", 4, "invalid-json", None),
        ("patients.json", 3, "control-character", "p3"),
    ]
    assert rows[0]["raw_text"] == raw.decode()
    assert rows[1]["error"].startswith("Patient.name[0].given[0] contains the control character U+0001")
    assert json.loads(rows[1]["raw_text"]) == bell
    assert loaded_ids(query) == without(Patient=["p3"], Observation=["o4"])
    assert_reconciled(result, query)
