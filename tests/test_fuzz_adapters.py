"""Fuzzing the adapters with mutated real files (hypothesis): bit flips, truncations, byte overwrites and
header-field changes. Contract: every mutated file is either read or refused with AdapterError; nothing else
escapes, nothing hangs (a SIGALRM guard fails the example after a few seconds). Then ~20 mutated files go
through a real worker in one job: every failure is recorded on its item and the job ends.

Counts of what was tried are printed at the end of the module (run with ``-s``) and written to
``$TILESEG_FUZZ_REPORT`` when set (docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import AdapterError
from tests.fixtures.bad_input.corpus import exercise, make_seeds, make_series

FORMATS = ["jpeg", "png", "webp", "bmp", "tiff", "geotiff", "dicom", "dicom_multiframe"]
EXAMPLES = int(os.environ.get("TILESEG_FUZZ_EXAMPLES", "120"))
HANG_SECONDS = 10
CRASHERS = Path(__file__).resolve().parent / "fixtures" / "bad_input" / "crashers"

TALLY: Counter = Counter()


class Hang(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    rows = {f"{fmt}/{outcome}": n for (fmt, outcome), n in sorted(TALLY.items())}
    if rows:
        print("\nfuzz tally:", json.dumps(rows, indent=1))
        if os.environ.get("TILESEG_FUZZ_REPORT"):
            Path(os.environ["TILESEG_FUZZ_REPORT"]).write_text(json.dumps(rows, indent=1))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def _on_alarm(*_: object) -> None:
    raise Hang(f"no answer within {HANG_SECONDS} s")


def guarded(path: Path) -> str:
    """Run the adapter contract on ``path`` under a hang guard; returns 'read' or 'refused'."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(HANG_SECONDS)
    try:
        exercise(path)
        return "read"
    except AdapterError as exc:
        assert str(exc).strip(), "an AdapterError without a message"
        return "refused"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# Mutations: (kind, parameters) drawn by hypothesis, applied deterministically to the seed bytes.
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF]
INTERESTING16 = [b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x80\x00", b"\x00\x01"]
mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("bitflip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=8)),
    st.tuples(st.just("header_bitflip"), st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 7)),
                                                  min_size=1, max_size=4)),
    st.tuples(st.just("header_field"), st.integers(0, 1023), st.sampled_from(INTERESTING16 + [bytes([b]) for b in
                                                                                              INTERESTING])),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("duplicate"), st.floats(0, 1), st.integers(1, 256)),
)


def mutate(data: bytes, m: tuple) -> bytes:
    b = bytearray(data)
    n = len(b)
    kind = m[0]
    if kind == "truncate":
        return bytes(b[: int(m[1] * (n - 1))])
    if kind == "bitflip":
        for pos, bit in m[1]:
            b[min(n - 1, int(pos * n))] ^= 1 << bit
    elif kind == "header_bitflip":
        for pos, bit in m[1]:
            b[pos % n] ^= 1 << bit
    elif kind == "header_field":  # e.g. a TIFF tag value, PNG IHDR size, DICOM Rows/VR/length
        pos = m[1] % n
        b[pos:pos + len(m[2])] = m[2]
    elif kind == "overwrite":
        pos = int(m[1] * (n - 1))
        b[pos:pos + len(m[2])] = m[2]
    elif kind == "delete":
        pos = int(m[1] * (n - 1))
        del b[pos:pos + m[2]]
    elif kind == "duplicate":
        pos = int(m[1] * (n - 1))
        b[pos:pos] = b[pos:pos + m[2]]
    return bytes(b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_adapter(fmt: str, seeds: dict[str, Path], tmp_path: Path) -> None:
    data = seeds[fmt].read_bytes()
    target = tmp_path / f"fuzz{seeds[fmt].suffix}"

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(m=mutation)
    def run(m: tuple) -> None:
        target.write_bytes(mutate(data, m))
        try:
            outcome = guarded(target)
        except Exception as exc:
            TALLY[(fmt, f"ESCAPED {type(exc).__name__}")] += 1
            raise
        TALLY[(fmt, outcome)] += 1
        TALLY[(fmt, f"kind:{m[0]}")] += 1

    run()


@given(m=mutation, which=st.integers(0, 2))
@settings(max_examples=max(20, EXAMPLES // 3), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_fuzz_dicom_series(m: tuple, which: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    """One slice of a three-slice series mutated: the series opens with its good slices or is refused."""
    folder = make_series(tmp_path_factory.mktemp("series"), n=3)
    victim = sorted(folder.glob("*.dcm"))[which]
    victim.write_bytes(mutate(victim.read_bytes(), m))
    try:
        TALLY[("dicom_series", guarded(folder))] += 1
    except Exception as exc:
        TALLY[("dicom_series", f"ESCAPED {type(exc).__name__}")] += 1
        raise


@pytest.mark.parametrize("path", sorted(CRASHERS.glob("*")), ids=lambda p: p.name)
def test_known_crashers_raise_adapter_error(path: Path) -> None:
    """Files an earlier fuzz run found escaping the contract (TypeError, CRSError, CPLE_AppDefinedError,
    NotImplementedError, BytesLengthException, struct.error): each must be refused with AdapterError."""
    guarded(path)


# Through the real worker ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_fuzzed_files_in_one_job_are_all_recorded(tiny_models: Path, tmp_path: Path, seeds: dict[str, Path]
                                                  ) -> None:
    from core import jobs
    from core.db import session_scope
    from tests.test_bad_input import run_job_with_worker

    rng = random.Random(5)
    inp = tmp_path / "in"
    inp.mkdir()
    kinds = ["truncate", "bitflip", "header_field", "overwrite", "delete"]
    names = []
    for k in range(21):
        fmt = FORMATS[k % len(FORMATS)]
        kind = kinds[k % len(kinds)]
        m = {"truncate": ("truncate", rng.uniform(0.05, 0.95)),
             "bitflip": ("bitflip", [(rng.random(), rng.randrange(8)) for _ in range(4)]),
             "header_field": ("header_field", rng.randrange(256), b"\xff\xff"),
             "overwrite": ("overwrite", rng.random(), bytes(rng.randrange(256) for _ in range(16))),
             "delete": ("delete", rng.random(), 32)}[kind]
        p = inp / f"m{k:02d}-{kind}-{fmt}{seeds[fmt].suffix}"
        p.write_bytes(mutate(seeds[fmt].read_bytes(), m))
        names.append(p.name)
    good = inp / "zz-good.png"
    good.write_bytes(seeds["png"].read_bytes())

    # One input per file: a folder holding .dcm files would be read as one DICOM series.
    job_id = run_job_with_worker(sorted(inp.iterdir()), tmp_path)
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        items, _ = jobs.list_items(s, job_id, limit=1000)
    assert job.status in ("partial", "succeeded"), (job.status, job.error)
    assert job.items_done == job.items_total == len(items) >= len(names) + 1
    seen = {Path(i.source).name for i in items}
    assert set(names) | {good.name} <= seen  # every file became at least one item: nothing silently dropped
    for it in items:
        assert it.status in ("succeeded", "failed"), (it.source, it.status)
        if it.status == "failed":
            assert it.error and Path(it.source).name in it.error, (it.source, it.error)
        else:
            assert it.artifacts
    assert job.items_failed == sum(i.status == "failed" for i in items) > 0
    TALLY[("worker_job", "items")] += len(items)
    TALLY[("worker_job", "failed")] += job.items_failed
